"""Re-convergence drafting in the fast engine: same output as one-token decoding, fewer forwards."""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import pytest
import torch

from cft.artifacts import load_records
from cft.decoding import engine
from cft.decoding.api import DecodeConfig, decode
from cft.decoding.engine import DraftIndex
from cft.identify import IdentifyConfig, identify, without_margins
from cft.models import load_model
from cft.prompts import render_ids
from cft.testbed.problems import generate_split
from cft.verify import extract_answer
from tests.conftest import generation, poison_new_buffers, write_jsonl
from tests.test_identify import _fake_correct


def test_draft_index_prefers_longest_suffix_and_the_match_at_or_after_the_cursor():
    seq = [1, 2, 3, 9, 5, 2, 3, 4, 6, 2, 3, 4, 7]
    index = DraftIndex(seq, ngram=3)
    # (5, 2, 3) occurs once: what followed it there
    assert index.propose([8, 5, 2, 3], cursor=0, size=3) == (7, [4, 6, 2])
    # (9, 2, 3) occurs nowhere, (2, 3) three times: the first at or after the cursor, else the last
    assert index.propose([9, 2, 3], cursor=5, size=2) == (7, [4, 6])
    assert index.propose([9, 2, 3], cursor=8, size=2) == (11, [4, 7])
    assert index.propose([9, 2, 3], cursor=12, size=2) == (11, [4, 7])
    # drafts stop at the end of the original (a suffix that ends it proposes nothing), as does an unknown token
    assert index.propose([3, 4, 6], cursor=0, size=9) == (9, [2, 3, 4, 7])
    assert index.propose([4, 7], cursor=0, size=5) == (0, [])
    assert index.propose([42], cursor=3, size=5) == (3, [])


def test_draft_index_pool_of_decoded_continuations_wins_on_a_longer_match_and_never_spans_two():
    index = DraftIndex([1, 2, 3, 9, 5, 2, 3, 4, 6, 2, 3, 4, 7], ngram=3)
    index.add([9, 2, 3, 8, 8])
    index.add([])  # a branch that decoded nothing adds nothing
    # (9, 2, 3) is in the pool only: its continuation, up to the end of that continuation (no pool position)
    assert index.propose([5, 9, 2, 3], cursor=5, size=4) == (None, [8, 8])
    # a tie (2, 3 in both) goes to the original, at the cursor
    assert index.propose([7, 2, 3], cursor=8, size=2) == (11, [4, 7])
    # the pool's longer match ends its continuation: the original's shorter one proposes (here nothing)
    assert index.propose([2, 3, 8, 8], cursor=5, size=4) == (5, [])
    index.add([4, 6, 5, 1])
    assert index.propose([0, 4, 6], cursor=0, size=4) == (9, [2, 3, 4, 7])  # (4, 6): a tie, the original's
    assert index.propose([3, 4, 6, 5], cursor=0, size=4) == (None, [1])  # the latest continuation, not past it


def _labels(tmp_path, monkeypatch, model, tok, records, draft: int | None, engine_name="fast", max_new_tokens=32, **kw):
    """Labels by ``engine_name`` with ``draft`` tokens a step (None: tuned), and the fast engine's counts."""
    if engine_name == "fast":
        kw["draft"] = draft
    folder = tmp_path / f"{engine_name}-{draft}"
    folder.mkdir(parents=True)
    out = folder / "labels.jsonl"
    cfg = IdentifyConfig(model="m", input=str(write_jsonl(folder / "gen.jsonl", records)), out=str(out),
                         engine=engine_name, max_new_tokens=max_new_tokens, **kw)
    summary = identify(cfg, model=model, tok=tok)
    stats = summary["engine"]
    return load_records(out, "labels"), stats and SimpleNamespace(**{**stats, "widths": {
        int(k): v for k, v in stats["widths"].items()}})


def _same(a: list[dict], b: list[dict]) -> int:
    """Assert identical labels and continuations of every branch both ran; returns how many were compared."""
    assert [r["critical"] for r in a] == [r["critical"] for r in b]
    compared = 0
    for ra, rb in zip(a, b):
        for ba, bb in zip(ra["branches"], rb["branches"]):
            for x, y in zip(ba, bb):
                if x["ok"] is not None and y["ok"] is not None:
                    assert (x["ids"], x["ok"], x["answer"]) == (y["ids"], y["ok"], y["answer"])
                    compared += 1
    return compared


def test_drafting_equals_one_token_decoding_and_the_reference(tmp_path, monkeypatch, random_model_dir,
                                                              testbed_tokenizer):
    model, tok, records = _fake_correct(testbed_tokenizer, random_model_dir, tmp_path, n=20, max_new_tokens=12)
    short = {"k": 2, "max_new_tokens": 16}  # one branch a position, short branches: a quick reference run
    ref, _ = _labels(tmp_path, monkeypatch, model, tok, records, 0, "reference", **short)
    off, off_stats = _labels(tmp_path, monkeypatch, model, tok, records, 0, batch_size=9, **short)
    on, on_stats = _labels(tmp_path, monkeypatch, model, tok, records, 4, batch_size=9, **short)
    assert len(ref) == 20
    assert _same(ref, off) > 150 and _same(off, on) > 150 and _same(ref, on) > 150
    assert [without_margins(r) for r in off] == [without_margins(r) for r in on]
    assert off_stats.tokens == on_stats.tokens and off_stats.tokens_per_forward == 1.0
    assert on_stats.forwards < off_stats.forwards and on_stats.tokens_per_forward > 1.0
    # every decoded branch carries its smallest top-1 minus top-2 logit gap
    margins = [b["margin"] for r in on for br in r["branches"] for b in br if b["ok"] is not None and b["ids"]]
    assert margins and all(m >= 0 for m in margins)


def test_drafting_on_testbed_responses_halves_the_steps(tmp_path, monkeypatch):
    """The trained testbed model rejoins its own solution: at least two tokens per row and forward."""
    model, tok = load_model("testbed")
    problems = generate_split("train", 24)
    outs = decode(model, tok, [render_ids(tok, p.question) for p in problems], DecodeConfig(max_new_tokens=160))
    records = [generation(tok, p.question, o[0].ids, extract_answer(o[0].text) or "none", rid=f"r{i}")
               for i, (p, o) in enumerate(zip(problems, outs))][:5]
    off, off_stats = _labels(tmp_path, monkeypatch, model, tok, records, 0, batch_size=32)
    on, on_stats = _labels(tmp_path, monkeypatch, model, tok, records, 6, batch_size=32)
    assert _same(off, on) > 100
    assert [without_margins(r) for r in off] == [without_margins(r) for r in on]
    assert on_stats.tokens == off_stats.tokens
    assert on_stats.tokens_per_forward >= 2.0, on_stats
    tuned, tuned_stats = _labels(tmp_path, monkeypatch, model, tok, records, None, batch_size=32)
    assert [without_margins(r) for r in off] == [without_margins(r) for r in tuned]  # widths change mid-run
    assert len(tuned_stats.widths) > 1 and tuned_stats.tokens == off_stats.tokens


def test_labels_are_the_same_bytes_whatever_the_draft_width_and_the_rows(tmp_path):
    """Margins included: a forward over k query columns, or over other rows, changes logits in the last bits, so the
    fast engine decodes a branch that met a gap within ``EXACT_BELOW`` again alone and recomputes a margin near a
    step of the recorded series in a forward of its branch alone. Three runs whose widths (tuned by timing, 0, 4)
    and rows differ write identical files."""
    model, tok = load_model("testbed")
    problems = generate_split("train", 12)
    outs = decode(model, tok, [render_ids(tok, p.question) for p in problems], DecodeConfig(max_new_tokens=160))
    records = [generation(tok, p.question, o[0].ids, extract_answer(o[0].text) or "none", rid=f"r{i}")
               for i, (p, o) in enumerate(zip(problems, outs))][:4]
    gen = write_jsonl(tmp_path / "gen.jsonl", records)
    files, widths = [], []
    for draft, rows in ((None, 32), (0, 7), (4, 19)):
        out = tmp_path / f"labels-{draft}-{rows}.jsonl"
        summary = identify(IdentifyConfig(model="m", input=str(gen), out=str(out), draft=draft, batch_size=rows,
                                          max_new_tokens=160), model=model, tok=tok)
        files.append(out.read_bytes())
        widths.append(summary["engine"]["widths"])
    assert files[1] == files[0] and files[2] == files[0]
    assert len({tuple(w) for w in widths}) == 3  # the steps did differ
    margins = [b["margin"] for line in files[0].splitlines() for br in json.loads(line)["branches"] for b in br
               if b["ids"]]
    assert margins and all(m is not None and m >= 0 for m in margins)


def test_shape_noise_bounds_the_margin_change_between_batchings(tmp_path, monkeypatch):
    """``SHAPE_NOISE`` is a measured bound, not a guess: the raw smallest gap of every branch, decoded at two draft
    widths and row counts and alone (``exact_margin``), moves by less than it (1e-5, the bound first assumed,
    did not hold: up to 7.8e-5 on 40 testbed responses)."""
    model, tok = load_model("testbed")
    problems = generate_split("train", 8, seed=5)
    outs = decode(model, tok, [render_ids(tok, p.question) for p in problems], DecodeConfig(max_new_tokens=120))
    records = [generation(tok, p.question, o[0].ids, extract_answer(o[0].text) or "none", rid=f"r{i}")
               for i, (p, o) in enumerate(zip(problems, outs))][:6]
    gen = write_jsonl(tmp_path / "gen.jsonl", records)
    raw: dict[str, dict] = {}
    settle = engine.BranchDecoder._settle

    def spy(self, work, t, j, cont, margin):
        if cont:
            alone = engine.exact_margin(self.model, self.prefix_kv[work.key], len(work.prompt_ids), t,
                                        work.alternatives[t][j], cont)
            raw.setdefault(self.tag, {})[(work.key, t, j)] = (margin, alone, tuple(cont))
        return settle(self, work, t, j, cont, margin)

    monkeypatch.setattr(engine.BranchDecoder, "_settle", spy)
    for draft, rows in ((0, 7), (4, 64)):
        monkeypatch.setattr(engine.BranchDecoder, "tag", (draft, rows), raising=False)
        identify(IdentifyConfig(model="m", input=str(gen), out=str(tmp_path / f"l{draft}.jsonl"), draft=draft,
                                batch_size=rows, max_new_tokens=120), model=model, tok=tok)
    a, b = raw[(0, 7)], raw[(4, 64)]
    same = [k for k in a if k in b and a[k][2] == b[k][2]]
    assert len(same) > 200
    noise = engine.SHAPE_NOISE[torch.float32]
    moved = [max(abs(a[k][0] - b[k][0]), abs(a[k][0] - a[k][1]), abs(b[k][0] - b[k][1])) for k in same]
    assert max(moved) < noise and any(m > 0 for m in moved)  # the shapes did change the last bits


def test_alone_branch_is_the_reference_decode():
    """The near-tie path: a branch decoded alone (batch 1, drafts from the original only) gives the reference's
    continuation, drafted or not."""
    from cft.protocol import Protocol, reference_branch, teacher_forced
    model, tok = load_model("testbed")
    problem = generate_split("train", 1, seed=3)[0]
    prompt = render_ids(tok, problem.question)
    response = decode(model, tok, [prompt], DecodeConfig(max_new_tokens=120))[0][0].ids
    for stop in (False, True):
        proto = Protocol(tok, model, IdentifyConfig(model="m", input="-", out="-", max_new_tokens=120,
                                                    stop_at_answer=stop))
        forced = teacher_forced(model, prompt, response, 2, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in forced.cache.layers]
        checked = 0
        for t in range(0, len(response), 2):
            alt = forced.ids[t][1] if forced.ids[t][0] == response[t] else forced.ids[t][0]
            if proto.stopped(response[:t] + [alt], 0, t):
                continue
            ref, ref_margin = reference_branch(model, tok, proto, prompt, response[:t] + [alt], t)
            for draft in (0, engine.ALONE_DRAFT):
                cont, margin = engine.alone_branch(model, proto, kv, prompt, response, t, alt, draft=draft)
                assert cont == ref and abs(margin - ref_margin) < engine.SHAPE_NOISE[torch.float32]
            checked += 1
        assert checked >= 10


def _tune(rates: dict[int, float], most: int, steps: int = 40) -> tuple[int | None, list[int]]:
    """Run a tuner on a machine where width w decodes ``rates[w]`` tokens a second; its choice and widths run."""
    tuner, run = engine.DraftTuner(most), []
    for _ in range(steps):
        w = tuner.choose()
        tuner.record(w, 1.0, rates[w] if w in run else 1e-3)  # a width's first step (its shapes' first use): junk
        run.append(w)
    return tuner.chosen, run


@pytest.mark.parametrize("rates,most,chosen", [
    ({0: 155, 1: 80, 2: 60, 4: 53}, 4, 0),  # SmolLM2 on a CPU: every draft column costs compute
    ({0: 7258, 1: 6998, 2: 7477, 4: 7402}, 4, 4),  # the testbed on a CPU: even, so the widest
    ({0: 100, 1: 160, 2: 210, 4: 260, 8: 300}, 8, 8),  # a GPU: columns nearly free
    ({0: 100, 1: 130, 2: 150, 4: 90, 8: 40}, 8, 2),  # a peak in between
    ({0: 100, 1: 60, 2: 95, 4: 30}, 4, 0),  # a slow width ends the trial of the wider ones
])
def test_draft_tuner_keeps_the_fastest_width_after_comparing_neighbouring_steps(rates, most, chosen):
    got, run = _tune(rates, most)
    assert got == chosen
    assert run[-10:] == [chosen] * 10
    assert run[:4] == [0, 0, 1, 1]  # narrowest first, each width an untimed then a timed step
    if rates[1] < 0.7 * rates[0]:  # width 1 is clearly slower: 2 and wider are never tried
        assert set(run) == {0, 1} and run[4:] == [0] * (len(run) - 4)
    slow = [w for w in rates if w > chosen and rates[w] < 0.7 * max(v for u, v in rates.items() if u < w)]
    assert not [w for w in run if slow and w > slow[0]]  # nothing past the first slow width is tried


def test_draft_tuner_fixed_width_and_no_drafts():
    fixed = engine.DraftTuner(4, fixed=True)
    assert [fixed.choose() for _ in range(5)] == [4] * 5
    none = engine.DraftTuner(0)
    assert [none.choose() for _ in range(5)] == [0] * 5


def test_many_holes_force_rebases_that_squeeze_them_out(tmp_path, monkeypatch, random_model_dir, testbed_tokenizer):
    """Long drafts, mostly rejected, on short rows: the window fills with holes and is rebased often."""
    model, tok, records = _fake_correct(testbed_tokenizer, random_model_dir, tmp_path, n=4, max_new_tokens=12)
    off, _ = _labels(tmp_path, monkeypatch, model, tok, records, 0, batch_size=6)
    on, stats = _labels(tmp_path, monkeypatch, model, tok, records, 12, batch_size=6)
    assert stats.rebases >= 3
    assert stats.query_columns > 2 * stats.forwards  # wide steps whose rejected columns became holes
    assert [without_margins(r) for r in off] == [without_margins(r) for r in on]


def _twin_tokens(model) -> None:
    """Every odd token's output row equals the even one's before it: every greedy step is an exact tie."""
    with torch.no_grad():
        weight = model.get_output_embeddings().weight
        weight[1::2] = weight[0:-1:2]


def test_exact_ties_pick_the_lowest_id_as_generate_does(tmp_path, monkeypatch, random_model_dir, testbed_tokenizer):
    model, tok, records = _fake_correct(testbed_tokenizer, random_model_dir, tmp_path, n=3, max_new_tokens=10,
                                        edit=_twin_tokens)
    short = {"k": 2, "max_new_tokens": 12}
    ref, _ = _labels(tmp_path, monkeypatch, model, tok, records, 0, "reference", **short)
    fast, stats = _labels(tmp_path, monkeypatch, model, tok, records, 2, batch_size=5, **short)
    assert _same(ref, fast) > 20 and stats.forwards > 5
    margins = [b["margin"] for r in fast for br in r["branches"] for b in br if b["ids"]]
    assert margins and set(margins) == {0.0}  # every step was a tie
    assert all(t % 2 == 0 for r in fast for br in r["branches"] for b in br for t in b["ids"] or [])


def test_unwritten_cache_columns_are_never_read(tmp_path, monkeypatch, random_model_dir, testbed_tokenizer):
    """The buffers start uninitialised: filled with NaN here, no label or continuation may change."""
    model, tok, records = _fake_correct(testbed_tokenizer, random_model_dir, tmp_path, n=4, max_new_tokens=12)
    want, _ = _labels(tmp_path, monkeypatch, model, tok, records, 3, batch_size=5)
    poison_new_buffers(monkeypatch, engine.BranchDecoder)
    got, stats = _labels(tmp_path / "nan", monkeypatch, model, tok, records, 3, batch_size=5)
    assert stats.rebases >= 1 and stats.forwards > 10
    assert [without_margins(r) for r in got] == [without_margins(r) for r in want]


def test_out_of_memory_halving_with_drafting(tmp_path, monkeypatch, random_model_dir, testbed_tokenizer):
    model, tok, records = _fake_correct(testbed_tokenizer, random_model_dir, tmp_path, n=3, max_new_tokens=16)
    want, _ = _labels(tmp_path, monkeypatch, model, tok, records, 4, batch_size=16)
    forward = model.forward
    failures = []

    @functools.wraps(forward)  # keeps forward's signature, so the engine passes the cache the same way
    def small_memory(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 5:
            failures.append(tuple(kwargs["input_ids"].shape))
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", small_memory)
    got, stats = _labels(tmp_path / "oom", monkeypatch, model, tok, records, 4, batch_size=16)
    assert [b for b, _ in failures] == [16, 8] and failures[0][1] > 1  # a drafted step failed, then halved twice
    assert stats.tokens_per_forward > 1.0
    assert [without_margins(r) for r in got] == [without_margins(r) for r in want]


@pytest.mark.parametrize("draft,ngram", [(-1, 3), (2, 0)])
def test_bad_draft_settings_are_refused(random_model_dir, draft, ngram):
    model, tok = load_model(str(random_model_dir))
    cfg = IdentifyConfig(model="m", input="i", out="o")
    with pytest.raises(ValueError, match="draft="):
        engine.BranchDecoder(model, tok, cfg, proto=None, draft=draft, ngram=ngram)


def test_rebase_right_aligns_every_rows_valid_columns_in_order():
    """Holes (mask 0) are squeezed out; each row's valid columns keep their order and end at max_len."""
    decoder = engine.BranchDecoder.__new__(engine.BranchDecoder)
    decoder.max_len, decoder.stats = 6, engine.EngineStats()
    decoder.window = engine.Window(3, 10)
    mask = torch.zeros(2, 16, dtype=torch.long)
    mask[0, [3, 5, 6, 9]] = 1
    mask[1, [4, 8]] = 1
    keys = torch.arange(16.0).repeat(2, 1, 1)[..., None].expand(2, 1, 16, 2).clone()  # key value = column index
    decoder.groups, decoder.bufs = [[0]], [torch.stack([keys, keys + 100])]  # one layer: its keys and values
    decoder.cache = SimpleNamespace(layers=[engine.WindowLayer(*decoder.bufs[0], decoder.window)])
    decoder.mbuf = mask
    decoder.rebase(0)
    assert (decoder.window.s, decoder.window.w) == (2, 6)
    assert decoder.mbuf.tolist() == [[0, 0, 1, 1, 1, 1] + [0] * 10, [0, 0, 0, 0, 1, 1] + [0] * 10]
    layer = decoder.cache.layers[0]
    assert layer.keys[0, 0, :, 0].tolist() == [3, 5, 6, 9]
    assert layer.keys[1, 0, 2:, 0].tolist() == [4, 8]
    assert layer.values[0, 0, :, 1].tolist() == [103, 105, 106, 109]
    assert decoder.stats.rebases == 1
