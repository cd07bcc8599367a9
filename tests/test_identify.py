"""Stage B: the critical rule on a hand-built model, and exactness of the fast engine."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

import cft.identify as ident
from cft import models, verify
from cft.artifacts import InputError, load_records, read_meta, write_meta
from cft.cli import main
from cft.decoding.api import DecodeConfig, decode
from cft.identify import IdentifyConfig, identify, merge_shards, token_kind, without_margins
from cft.prompts import render_ids
from cft.protocol import ranked, true_ranks
from tests.conftest import generation, write_jsonl

# Next-token table of a bigram model: token -> its rank-1, rank-2, rank-3 successors.  Greedy from the
# prompt's last token ("\n") it writes " The answer is 7." and stops.
EOS = "<|im_end|>"
BIGRAM = {
    "\n": [" The", " Now", EOS],  # " Now" -> " answer is 7." still right: " The" is replaceable
    " Now": [" answer", EOS, "."],
    " The": [" answer", " has", "."],  # " has" and "." end without an answer: " answer" is critical
    " has": [EOS, ".", " is"],
    " answer": [" is", " gives", "."],  # "answer gives 7." still ends in 7: " is" is replaceable
    " gives": [" ", EOS, "."],
    " is": [" ", "\n", "."],  # "\n" restarts " The answer is 7.": " " is replaceable
    " ": ["7", "8", "9"],  # 8 and 9 are wrong answers: "7" is critical
    "7": [".", "0", "1"],  # 70 and 71 are wrong: "." is critical
    "8": [".", EOS, "0"],
    "9": [".", EOS, "0"],
    "0": [".", EOS, "1"],
    "1": [".", EOS, "0"],
    ".": [EOS, " ", "\n"],
}
EXPECTED_TOKENS = [" The", " answer", " is", " ", "7", ".", EOS]
EXPECTED_CRITICAL = [0, 1, 0, 0, 1, 1, 0]  # the final EOS is not tested


def bigram_model(tok, table: dict | None = None, scores: dict | None = None) -> LlamaForCausalLM:
    """A Llama whose attention and MLP outputs are zero: the logits depend on the current token only.

    ``table`` (default BIGRAM) gives each token's rank-1..3 successors, scored 10, 9, 8 unless
    ``scores`` gives a token other scores (equal scores make exact ties).
    """
    table, scores = table or BIGRAM, scores or {}
    vocab = len(tok)
    hidden = vocab + (-vocab % 8)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        model.model.layers[0].input_layernorm.weight.fill_(1.0)
        model.model.layers[0].post_attention_layernorm.weight.fill_(1.0)
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        head = model.lm_head.weight  # (vocab, hidden); RMSNorm turns one-hot e_i into sqrt(hidden) * e_i
        for src, nexts in table.items():
            i = tok.convert_tokens_to_ids(_tok(tok, src))
            for score, nxt in zip(scores.get(src, (10.0, 9.0, 8.0)), nexts):
                head[tok.convert_tokens_to_ids(_tok(tok, nxt)), i] = score / math.sqrt(hidden)
    return model


def _tok(tok, text: str) -> str:
    """The vocabulary entry for a piece of text that the tokenizer keeps as one token."""
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == 1, f"{text!r} is not a single token"
    return tok.convert_ids_to_tokens(ids[0])


@pytest.fixture(scope="module")
def bigram(testbed_tokenizer):
    return bigram_model(testbed_tokenizer), testbed_tokenizer


def labels_for(tmp_path, model, tok, records, engine, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    gen = write_jsonl(tmp_path / f"gen-{engine}.jsonl", records)
    out = tmp_path / f"labels-{engine}.jsonl"
    cfg = IdentifyConfig(model="hand-built", input=str(gen), out=str(out), engine=engine, max_new_tokens=32, **kw)
    summary = identify(cfg, model=model, tok=tok)
    return load_records(out, "labels"), summary


def test_bigram_model_decodes_the_designed_response(bigram):
    model, tok = bigram
    out = decode(model, tok, [render_ids(tok, "q")], DecodeConfig(max_new_tokens=20))[0][0]
    assert [tok.decode([i]) for i in out.ids] == EXPECTED_TOKENS
    assert out.text == " The answer is 7."


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_critical_rule_on_hand_built_model(tmp_path, bigram, engine):
    model, tok = bigram
    response = [tok.convert_tokens_to_ids(_tok(tok, t)) for t in EXPECTED_TOKENS]
    labels, summary = labels_for(tmp_path, model, tok, [generation(tok, "q", response, "7")], engine)
    (rec,) = labels
    assert rec["critical"] == EXPECTED_CRITICAL
    assert rec["eligible"] == [1, 1, 1, 1, 1, 1, 0]
    assert rec["greedy"] is True
    # the alternatives are the rank-2 and rank-3 successors, in rank order
    assert [b["token"] for b in rec["branches"][1]] == [tok.convert_tokens_to_ids(_tok(tok, t)) for t in (" has", ".")]
    # "7" -> "8" continues greedily "8." and answers 8
    eight = rec["branches"][4][0]
    assert eight["answer"] == "8" and eight["ok"] is False
    assert tok.decode(eight["ids"]) == ".<|im_end|>"
    text = rec["response"]
    assert [text[s:e] for s, e in rec["critical_spans"]] == [" answer", "7", "."]
    assert summary["critical_fraction"] == pytest.approx(3 / 6)


def test_fast_engine_skips_rank3_after_success_reference_runs_all(tmp_path, bigram):
    model, tok = bigram
    response = [tok.convert_tokens_to_ids(_tok(tok, t)) for t in EXPECTED_TOKENS]
    fast, _ = labels_for(tmp_path, model, tok, [generation(tok, "q", response, "7")], "fast")
    ref, _ = labels_for(tmp_path, model, tok, [generation(tok, "q", response, "7")], "reference")
    # position 0: rank-2 " Now" succeeds, so the fast engine never runs rank 3
    assert fast[0]["branches"][0][0]["ok"] is True and fast[0]["branches"][0][1]["ok"] is None
    assert ref[0]["branches"][0][1]["ok"] is not None


def test_non_greedy_response_is_reported_and_uses_top_k_minus_y(tmp_path, bigram):
    model, tok = bigram
    ids = [tok.convert_tokens_to_ids(_tok(tok, t)) for t in [" The", " answer", " gives", " ", "7", ".", EOS]]
    (rec,), summary = labels_for(tmp_path, model, tok, [generation(tok, "q", ids, "7")], "fast")
    assert rec["greedy"] is False and rec["greedy_mismatches"] == [2]
    # at the mismatch y_t = " gives" (rank 2), so the alternatives are ranks 1 and 3: " is" and "."
    assert [b["token"] for b in rec["branches"][2]] == [tok.convert_tokens_to_ids(_tok(tok, t)) for t in (" is", ".")]
    assert [b["rank"] for b in rec["branches"][2]] == [1, 3]  # true ranks, not 2 and 3
    assert [b["rank"] for b in rec["branches"][1]] == [2, 3]
    assert summary["not_greedy"] == 1


def _fake_correct(tok, model_dir, tmp_path, n=6, max_new_tokens=30, edit=None):
    """Responses of a random model, each made 'correct' by taking its own answer as gold (``edit``: applied
    to the model first)."""
    from cft.models import load_model
    from cft.testbed.problems import generate_split
    from cft.verify import extract_answer

    model, tok = load_model(str(model_dir))
    if edit is not None:
        edit(model)
    problems = generate_split("train", n)
    prompts = [render_ids(tok, p.question) for p in problems]
    outs = decode(model, tok, prompts, DecodeConfig(max_new_tokens=max_new_tokens))
    records = [generation(tok, p.question, o[0].ids, extract_answer(o[0].text) or "none", rid=f"r{i}")
               for i, (p, o) in enumerate(zip(problems, outs))]
    return model, tok, records


def test_fast_engine_equals_reference_token_for_token(tmp_path, random_model_dir, testbed_tokenizer):
    model, tok, records = _fake_correct(testbed_tokenizer, random_model_dir, tmp_path)
    ref, _ = labels_for(tmp_path, model, tok, records, "reference")
    fast, _ = labels_for(tmp_path, model, tok, records, "fast", batch_size=7)  # small batch: many refills
    assert [r["critical"] for r in ref] == [r["critical"] for r in fast]
    compared = 0
    for r, f in zip(ref, fast):
        for br, bf in zip(r["branches"], f["branches"]):
            for a, b in zip(br, bf):
                if b["ok"] is not None:
                    assert (a["ids"], a["ok"], a["answer"]) == (b["ids"], b["ok"], b["answer"])
                    compared += 1
    assert compared > 100


def test_shards_merge_to_single_process_labels(tmp_path, random_model_dir, testbed_tokenizer):
    model, tok, records = _fake_correct(testbed_tokenizer, random_model_dir, tmp_path, n=5, max_new_tokens=12)
    gen = write_jsonl(tmp_path / "gen.jsonl", records)
    single = tmp_path / "single.jsonl"
    identify(IdentifyConfig(model=str(random_model_dir), input=str(gen), out=str(single), max_new_tokens=12),
             model=model, tok=tok)
    sharded = tmp_path / "sharded.jsonl"
    for i in range(2):
        identify(IdentifyConfig(model=str(random_model_dir), input=str(gen), out=str(sharded), max_new_tokens=12,
                                num_shards=2, shard_index=i), model=model, tok=tok)
    merge_shards(str(sharded), 2)
    got, want = load_records(sharded, "labels"), load_records(single, "labels")
    assert [without_margins(r) for r in got] == [without_margins(r) for r in want]
    assert_margins_close(got, want)
    assert read_meta(sharded)["summary"]["responses"] == len(records)


def test_approximations_are_recorded(tmp_path, bigram):
    model, tok = bigram
    response = [tok.convert_tokens_to_ids(_tok(tok, t)) for t in EXPECTED_TOKENS]
    gen = write_jsonl(tmp_path / "gen.jsonl", [generation(tok, "q", response, "7")])
    out = tmp_path / "approx.jsonl"
    identify(IdentifyConfig(model="hand-built", input=str(gen), out=str(out), skip_confident=0.0), model=model, tok=tok)
    (rec,) = load_records(out, "labels")
    assert rec["eligible"] == [0] * 7 and rec["critical"] == [0] * 7
    assert read_meta(out)["config"]["approximations"] == ["skip_confident"]


def test_token_kind():
    assert [token_kind(t) for t in ["7", " 12", " +", " =", "*", " apples", ".", " "]] == [
        "digit", "digit", "operator", "operator", "operator", "other", "other", "other"]


def test_fast_engine_out_of_memory_halves_the_batch_same_labels(tmp_path, random_model_dir, testbed_tokenizer):
    model, tok, records = _fake_correct(testbed_tokenizer, random_model_dir, tmp_path, n=3, max_new_tokens=16)
    want, _ = labels_for(tmp_path, model, tok, records, "fast", batch_size=16)
    forward = model.forward
    failures = []

    @functools.wraps(forward)  # keeps forward's signature, so the engine passes the cache the same way
    def small_memory(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 5:
            failures.append(kwargs["input_ids"].shape[0])
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    model.forward = small_memory
    try:
        got, _ = labels_for(tmp_path / "oom", model, tok, records, "fast", batch_size=16)
    finally:
        model.forward = forward
    assert failures == [16, 8]  # halved twice, then the batch of 4 fits
    assert [r["critical"] for r in got] == [r["critical"] for r in want]
    assert [without_margins(r) for r in got] == [without_margins(r) for r in want]
    assert_margins_close(got, want)


def assert_margins_close(got: list[dict], want: list[dict]) -> None:
    """Branch margins from differently batched steps agree to float32 rounding."""
    pairs = [(a["margin"], b["margin"]) for r, w in zip(got, want) for br, bw in zip(r["branches"], w["branches"])
             for a, b in zip(br, bw)]
    assert any(a is not None for a, _ in pairs)
    for a, b in pairs:
        assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, abs=1e-4))


# ---------------------------------------------------------------- ties, true ranks, margins


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40).flatmap(lambda v: st.tuples(
    st.lists(st.lists(st.integers(-2, 2), min_size=v, max_size=v), min_size=1, max_size=4),
    st.integers(1, v), st.integers(0, 3))))
def test_ranked_is_the_stable_order_minus_logit_then_id(case):
    rows, n, extra = case
    logits = torch.tensor(rows, dtype=torch.float32)  # few distinct values: ties everywhere
    vals, ids = ranked(logits, n, extra=extra)
    for r, (row, got_ids, got_vals) in enumerate(zip(rows, ids.tolist(), vals.tolist())):
        want = sorted(range(len(row)), key=lambda i: (-row[i], i))[:n]
        assert got_ids == want and got_vals == [row[i] for i in want]
        assert true_ranks(logits[r : r + 1], torch.tensor([want[-1]])).tolist() == [n]


@pytest.fixture(scope="module")
def tied(testbed_tokenizer):
    """The bigram model with an exact tie after " is": " " and "\\n" both score 10."""
    tok = testbed_tokenizer
    return bigram_model(tok, scores={" is": (10.0, 10.0, 8.0)}), tok


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_exact_tie_goes_to_the_lower_id_in_ranks_greedy_check_and_decoding(tmp_path, tied, engine):
    model, tok = tied
    space, newline = (tok.convert_tokens_to_ids(_tok(tok, t)) for t in (" ", "\n"))
    first, second = sorted((space, newline))
    ids = lambda *ts: [tok.convert_tokens_to_ids(_tok(tok, t)) for t in ts]  # noqa: E731
    prefix = ids(" The", " answer", " is")
    records = [generation(tok, "q", prefix + [y] + ids("7", ".", EOS), "7", rid=f"r{y}") for y in (first, second)]
    labels, summary = labels_for(tmp_path, model, tok, records, engine, crosscheck=0)
    low, high = labels
    assert 3 not in low["greedy_mismatches"] and 3 in high["greedy_mismatches"]
    assert [(b["token"], b["rank"]) for b in low["branches"][3]] == [(second, 2), (ids(".")[0], 3)]
    assert [(b["token"], b["rank"]) for b in high["branches"][3]] == [(first, 1), (ids(".")[0], 3)]
    # branches through " is" meet the tie while decoding: margin 0, a near-tie, decoded to the lower id
    through = [b for rec in labels for br in rec["branches"][:2] for b in br if b["ids"] and b["margin"] == 0.0]
    assert through and summary["near_ties"] >= len(through)
    assert all(first in b["ids"] and second not in b["ids"][: b["ids"].index(first) + 1] for b in through)
    if engine == "fast":
        assert summary["crosschecked"] >= summary["near_ties"] > 0 and summary["disagreements"] == 0


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_margins_are_recorded_by_both_engines(tmp_path, bigram, engine):
    model, tok = bigram
    response = [tok.convert_tokens_to_ids(_tok(tok, t)) for t in EXPECTED_TOKENS]
    (rec,), summary = labels_for(tmp_path, model, tok, [generation(tok, "q", response, "7")], engine)
    margins = [b["margin"] for br in rec["branches"] for b in br if b["ok"] is not None]
    # every decoded step chooses between successors scored 10 and 9 (RMSNorm's eps: 0.9998, recorded as the
    # power of ten below it); a branch that ended at once (rank-3 EOS at position 0, which only the reference
    # engine runs) has none
    assert {m for m in margins if m is not None} == {0.1}
    assert (None in margins) == (engine == "reference")
    assert all((b["margin"] is None) == (not b["ids"]) for br in rec["branches"] for b in br if b["ok"] is not None)
    # last tested alternative (rank 3, score 8) against the next token (every other token scores 0)
    assert rec["alt_margin"][:6] == [pytest.approx(8.0, abs=1e-2)] * 6 and rec["alt_margin"][6] is None
    assert summary["near_ties"] == 0 and summary["near_tie_positions"] == 0


def test_crosscheck_reports_disagreements_and_whether_they_are_near_ties(tmp_path, bigram, monkeypatch, capsys):
    model, tok = bigram
    response = [tok.convert_tokens_to_ids(_tok(tok, t)) for t in EXPECTED_TOKENS]
    records = [generation(tok, "q", response, "7")]
    real = ident.reference_branch

    def flipped(model, tok, proto, prompt_ids, response, t):  # a reference path that answers 9 after "8"
        cont, margin = real(model, tok, proto, prompt_ids, response, t)
        eight = tok.convert_tokens_to_ids(_tok(tok, "8"))
        return ([tok.convert_tokens_to_ids(_tok(tok, "9"))] + cont if response[-1] == eight else cont), margin

    monkeypatch.setattr(ident, "reference_branch", flipped)
    monkeypatch.setenv("CFT_PROGRESS_SECONDS", "0.0001")  # a log's timed progress lines
    _, clean = labels_for(tmp_path / "all", model, tok, records, "fast", crosscheck=1000)
    assert clean["crosschecked"] == clean["branches"] and clean["disagreements"] == 1
    assert f"crosscheck[reference]: {clean['branches']}/{clean['branches']} branch (100%)" in capsys.readouterr().err
    assert clean["disagreements_near_tie"] == 0  # margin 1.0 is no near-tie: an engine bug, reported as such
    (detail,) = clean["disagreement_details"]
    assert detail["position"] == 4 and detail["fast"]["answer"] == "8" and detail["reference"]["answer"] == "89"
    ident.print_summary({**clean, "seconds": 1.0, "decoded_tokens": 1, "tokens_per_second": 1.0})
    assert "WARNING: 1 disagreements between the engines are not near ties" in capsys.readouterr().out
    _, near = labels_for(tmp_path / "near", model, tok, records, "fast", crosscheck=0, tolerance=2.0)
    assert near["near_ties"] == near["crosschecked"] > 0  # tolerance 2 > every margin: all near-ties, no random ones
    assert near["disagreements"] == near["disagreements_near_tie"] == 1
    _, none = labels_for(tmp_path / "none", model, tok, records, "fast", crosscheck=2)
    assert none["crosschecked"] == 2
    assert read_meta(tmp_path / "none" / "labels-fast.jsonl")["summary"]["crosschecked"] == 2


# ---------------------------------------------------------------- verifier failure is unknown


def _failing_verifier(monkeypatch, fails_on: str, times: int):
    """Make grading of any text containing ``fails_on`` time out ``times`` times in a row; count the calls."""
    real = verify.grade_detailed
    calls = {"n": 0}

    def grade(text, gold):
        if fails_on in text:
            calls["n"] += 1
            if calls["n"] <= times:
                return verify.GradeResult(None, False, "none", timed_out=True)
        return real(text, gold)

    monkeypatch.setattr(verify, "grade_detailed", grade)
    return calls


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_verifier_failing_twice_is_unknown_not_wrong(tmp_path, bigram, monkeypatch, engine):
    model, tok = bigram
    response = [tok.convert_tokens_to_ids(_tok(tok, t)) for t in EXPECTED_TOKENS]
    calls = _failing_verifier(monkeypatch, "is 8", times=99)
    (rec,), summary = labels_for(tmp_path, model, tok, [generation(tok, "q", response, "7")], engine)
    eight, nine = rec["branches"][4]
    assert eight["ok"] is None and eight["verify_error"] == "timeout" and calls["n"] == 2  # retried once
    assert nine["ok"] is False and nine["verify_error"] == ""  # an unknown is no success: rank 3 still ran
    assert rec["critical"] == [0, 1, 0, 0, 0, 1, 0]  # "7" is no longer critical: unknown, not wrong
    assert summary["unknown_positions"] == 1 and summary["unknown_branches"] == 1
    assert all("verify_error" in b for br in rec["branches"] for b in br)


def test_verifier_failing_once_is_retried(tmp_path, bigram, monkeypatch):
    model, tok = bigram
    response = [tok.convert_tokens_to_ids(_tok(tok, t)) for t in EXPECTED_TOKENS]
    calls = _failing_verifier(monkeypatch, "is 8", times=1)
    (rec,), summary = labels_for(tmp_path, model, tok, [generation(tok, "q", response, "7")], "fast")
    assert rec["branches"][4][0]["ok"] is False and calls["n"] == 2
    assert rec["critical"] == EXPECTED_CRITICAL and summary["unknown_positions"] == 0


# ---------------------------------------------------------------- protocol, truncation, resume key


def _with_meta(path, max_new_tokens=32, stop_at_answer=True, dtype="float32"):
    write_meta(path, {"stage": "generate", "config": {"model": "hand-built", "template": "chat", "dtype": dtype,
                                                      "decode": {"max_new_tokens": max_new_tokens,
                                                                 "stop_at_answer": stop_at_answer}}})


def test_stage_a_protocol_is_inherited_and_a_conflict_refused(tmp_path, bigram):
    model, tok = bigram
    response = [tok.convert_tokens_to_ids(_tok(tok, t)) for t in EXPECTED_TOKENS]
    gen = write_jsonl(tmp_path / "gen.jsonl", [generation(tok, "q", response, "7")])
    _with_meta(gen, max_new_tokens=24, stop_at_answer=False)
    out = tmp_path / "L.jsonl"
    identify(IdentifyConfig(model="hand-built", input=str(gen), out=str(out)), model=model, tok=tok)
    cfg = read_meta(out)["config"]
    assert (cfg["max_new_tokens"], cfg["stop_at_answer"], cfg["dtype"], cfg["template"]) == (24, False, "float32",
                                                                                              "chat")
    assert cfg["protocol"]["source"] == "generations metadata" and cfg["protocol"]["forced"] == []
    with pytest.raises(InputError, match=r"max_new_tokens 16 \(Stage A: 24\).*--force-protocol"):
        identify(IdentifyConfig(model="hand-built", input=str(gen), out=str(out), max_new_tokens=16),
                 model=model, tok=tok)
    identify(IdentifyConfig(model="hand-built", input=str(gen), out=str(out), max_new_tokens=16, force_protocol=True),
             model=model, tok=tok)
    assert read_meta(out)["config"]["protocol"]["forced"] == ["max_new_tokens"]


def test_protocol_conflict_on_the_command_line_exits_2(tmp_path, testbed_tokenizer, capsys):
    tok = testbed_tokenizer
    gen = write_jsonl(tmp_path / "gen.jsonl", [generation(tok, "q", [5, 6], "7")])
    _with_meta(gen, dtype="float32")
    code = main(["identify", "--model", "testbed", "--device", "cpu", "--input", str(gen), "--out",
                 str(tmp_path / "L.jsonl"), "--dtype", "bfloat16", "--no-stop-at-answer"])
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error:" in line]  # the provenance check may add a warning
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "dtype 'bfloat16' (Stage A: 'float32')" in errors[0] and "stop_at_answer False (Stage A: True)" in errors[0]


def test_generations_without_metadata_warn_once(tmp_path, bigram, caplog):
    model, tok = bigram
    response = [tok.convert_tokens_to_ids(_tok(tok, t)) for t in EXPECTED_TOKENS]
    labels_for(tmp_path, model, tok, [generation(tok, "q", response, "7")], "fast")
    warnings = [r for r in caplog.records if "has no metadata" in r.getMessage()]
    assert len(warnings) == 1
    assert read_meta(tmp_path / "labels-fast.jsonl")["config"]["protocol"]["source"].startswith("defaults")


def test_truncated_responses_are_excluded_unless_kept(tmp_path, bigram):
    model, tok = bigram
    response = [tok.convert_tokens_to_ids(_tok(tok, t)) for t in EXPECTED_TOKENS]
    cut = {**generation(tok, "q", response[:5], "7", rid="cut"), "finish": "length"}
    records = [generation(tok, "q", response, "7"), cut]
    labels, summary = labels_for(tmp_path / "a", model, tok, records, "fast")
    assert [r["id"] for r in labels] == ["p0"] and summary["excluded_truncated"] == 1
    labels, summary = labels_for(tmp_path / "b", model, tok, records, "fast", keep_truncated=True)
    assert [r["id"] for r in labels] == ["p0", "cut"] and summary["excluded_truncated"] == 0


def test_resume_key_covers_settings_and_weights(testbed_tokenizer, bigram):
    model, tok = bigram
    rec = generation(tok, "q", [5, 6], "7")
    base = IdentifyConfig(model="m", input="i", out="o", max_new_tokens=32, stop_at_answer=True, dtype="float32")
    key = ident.label_key(rec, ident.label_params(base, model))
    other = bigram_model(tok)
    with torch.no_grad():  # a fine-tune changes most values of a tensor
        other.lm_head.weight.add_(torch.randn_like(other.lm_head.weight) * 1e-3)
    assert ident.label_key(rec, ident.label_params(base, other)) != key  # other weights
    assert models.weights_fingerprint(model) == models.weights_fingerprint(model)
    for change in ({"k": 4}, {"max_new_tokens": 33}, {"stop_at_answer": False}, {"include_eos": True},
                   {"dtype": "bfloat16"}, {"skip_confident": 0.9}, {"continuation_cap": 5}):
        changed = IdentifyConfig(**{**base.__dict__, **change})
        assert ident.label_key(rec, ident.label_params(changed, model)) != key, change
    for same in ({"engine": "reference"}, {"batch_size": 3}, {"crosscheck": 5}, {"out": "p"}):
        assert ident.label_key(rec, ident.label_params(IdentifyConfig(**{**base.__dict__, **same}), model)) == key


def test_cli_crosscheck_prints_agreement(tmp_path, random_model_dir, testbed_tokenizer, capsys):
    model, tok, records = _fake_correct(testbed_tokenizer, random_model_dir, tmp_path, n=3, max_new_tokens=12)
    gen = write_jsonl(tmp_path / "gen.jsonl", records)
    out = tmp_path / "L.jsonl"
    code = main(["identify", "--model", str(random_model_dir), "--device", "cpu", "--input", str(gen), "--out",
                 str(out), "--max-new-tokens", "12", "--crosscheck", "7"])
    printed = capsys.readouterr().out
    s = read_meta(out)["summary"]
    assert code == 0 and s["crosschecked"] == 7 + s["crosschecked_near_ties"] and s["disagreements"] == 0
    assert f"crosschecked {s['crosschecked']} branches with the reference engine: 0 disagreements" in printed
    assert "near ties (margin < 0.001)" in printed and "unknown positions (verifier failed twice): 0" in printed
