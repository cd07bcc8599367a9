"""Stage A decodes the model's own argmax path under pinned settings, on every zoo model and in bf16, on both
backends (the engine's continuous batching and transformers' generate): greedy outputs are the same tokens."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from cft import zoo
from cft.artifacts import load_records, read_meta
from cft.decoding import engine, trigger_tokens
from cft.decoding.api import DecodeConfig, decode
from cft.generate import GenerateConfig, generate
from cft.models import load_model, stop_token_ids, vocab_rows
from cft.prompts import render_ids
from cft.testbed.problems import generate_split
from tests.conftest import poison_new_buffers

NEAR_TIE = 1e-4  # top-1/top-2 logit gap under which a cached step and a full forward may pick differently (fp32)
HAS = 264  # " has" in the testbed tokenizer
PENALIZED = {"repetition_penalty": 1.1, "no_repeat_ngram_size": 3}
NEUTRAL = {"repetition_penalty": None, "do_sample": None, "temperature": None, "top_p": None, "top_k": None}


def _stage_a(tmp_path, model_dir, name: str, **decode_kw) -> tuple[list[list[int]], dict]:
    out = tmp_path / f"{name}.jsonl"
    generate(GenerateConfig(model=str(model_dir), data="testbed:test", out=str(out), limit=6, device="cpu",
                            decode=DecodeConfig(max_new_tokens=48, batch_size=3, **decode_kw)))
    return [r["response_ids"] for r in load_records(out, "generations")], read_meta(out)


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_checkpoint_generation_config_does_not_change_stage_a(tmp_path, zoo_model, backend):
    """Qwen2.5-Instruct ships repetition_penalty 1.1 (here with no_repeat_ngram_size 3 too): stage A ignores both."""
    penalized = zoo_model("qwen2.5", PENALIZED)
    plain = zoo_model("qwen2.5", NEUTRAL)
    # Fields whose neutral value is None are filled from the checkpoint unless generate sees only ours.
    hostile = zoo_model("qwen2.5", {"min_new_tokens": 40, "suppress_tokens": [2], "bad_words_ids": [[HAS]],
                                    "stop_strings": ["has"]})
    with_penalty, meta = _stage_a(tmp_path, penalized, "penalized", backend=backend)
    without, meta_plain = _stage_a(tmp_path, plain, "plain", backend=backend)
    assert with_penalty == without == _stage_a(tmp_path, hostile, "hostile", backend=backend)[0]
    assert meta["decoding"] == meta_plain["decoding"] and meta["decoding"]["backend"] == backend
    assert any(HAS in ids for ids in without)  # which bad_words_ids and stop_strings forbid
    settings = meta["decoding"]["generation_config"]
    assert settings["repetition_penalty"] == 1.0 and settings["no_repeat_ngram_size"] == 0
    assert settings["do_sample"] is False and settings["eos_token_id"] == [0, 2]

    # The settings do act when inherited: an unpinned greedy call decodes something else.
    model, tok = load_model(str(penalized), device="cpu")
    changed = 0
    for p, ids in zip(generate_split("test", 6), with_penalty):
        prompt = torch.tensor([render_ids(tok, p.question)])
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=len(ids), temperature=None, top_p=None, top_k=None)
        changed += out[0, prompt.shape[1]:].tolist() != ids
    assert changed > 0


@torch.inference_mode()
@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_greedy_is_the_teacher_forced_argmax_path(zoo_model, family):
    """Every response token is the argmax of one forward over prompt + response (left-padded batch, KV cache)."""
    model, tok = load_model(str(zoo_model(family)), device="cpu")
    prompts = [render_ids(tok, p.question) for p in generate_split("test", 4)]
    outs = decode(model, tok, prompts, DecodeConfig(max_new_tokens=48, batch_size=4))
    eos = stop_token_ids(tok, model)
    for prompt, (out,) in zip(prompts, outs):
        assert out.ids and (out.finish != "eos" or out.ids[-1] in eos)
        logits = model(torch.tensor([prompt + out.ids])).logits[0, len(prompt) - 1 : -1]
        top = logits.topk(2)
        for t, y in enumerate(out.ids):
            if top.indices[t, 0] != y:
                gap = (top.values[t, 0] - logits[t, y]).item()
                assert gap < NEAR_TIE, f"{family}: position {t} decoded {y}, argmax {top.indices[t, 0]} by {gap}"


@torch.inference_mode()
def test_sampled_id_past_the_tokenizer(zoo_model):
    """Phi-3 has more embedding rows than tokens: a sampled id past the tokenizer ends no answer, raises nothing."""
    model, tok = load_model(str(zoo_model("phi3")), device="cpu")
    size = vocab_rows(model)
    flags = trigger_tokens(tok, size)
    assert size > len(tok) and flags.shape == (size,) and not flags[len(tok):].any() and flags[: len(tok)].any()
    prompts = [render_ids(tok, p.question) for p in generate_split("test", 2)]
    head = model.get_output_embeddings().weight
    likely = model(torch.tensor([prompts[0]])).logits[0, -1].topk(size - len(tok)).indices
    head[len(tok):] = head[likely]  # the padding rows score like the likeliest real tokens
    outs = decode(model, tok, prompts, DecodeConfig(max_new_tokens=16, temperature=1.0, n=3, batch_size=6))
    assert any(t >= len(tok) for o in outs for s in o for t in s.ids)


def test_bfloat16_generate_on_testbed(tmp_path):
    out = tmp_path / "bf16.jsonl"
    summary = generate(GenerateConfig(model="testbed", data="testbed:test", out=str(out), limit=4, dtype="bfloat16",
                                      device="cpu", decode=DecodeConfig(max_new_tokens=96, batch_size=4)))
    records = load_records(out, "generations")
    assert summary["n"] == 4 and all(r["response_ids"] for r in records)
    assert read_meta(out)["environment"]["dtype"] == "bfloat16"
    assert sum(r["finish"] != "length" for r in records) >= 2  # it still writes whole solutions


# ---------------------------------------------------------------- the engine backend vs model.generate


def _both(model, tok, prompts, stats: engine.EngineStats | None = None, **kw) -> tuple[list, list]:
    cfg = DecodeConfig(**kw)
    return tuple(decode(model, tok, prompts, replace(cfg, backend=b), stats=stats) for b in ("hf", "engine"))


def _same(xs: list[list], ys: list[list]) -> bool:
    """The same outputs; entropy to ~1e-8 (another batch composition changes logits in the last bits)."""
    return all((a.ids, a.text, a.finish) == (b.ids, b.text, b.finish) and a.entropy == pytest.approx(b.entropy)
               for x, y in zip(xs, ys, strict=True) for a, b in zip(x, y, strict=True))


@pytest.fixture(scope="module")
def testbed():
    return load_model("testbed", device="cpu")


@pytest.mark.parametrize("kw", [{"max_new_tokens": 256, "batch_size": 16},  # refills rows: 40 prompts, 16 rows
                                {"max_new_tokens": 24, "batch_size": 64, "stop_at_answer": False, "n": 2}])
def test_engine_greedy_equals_generate_on_the_testbed(testbed, kw):
    model, tok = testbed
    prompts = [render_ids(tok, p.question) for p in generate_split("test", 40)]
    stats = engine.EngineStats()
    hf, eng = _both(model, tok, prompts, stats, **kw)
    assert eng == hf  # ids, text, finish reason; entropy None
    assert stats.rebases > 0 or kw["max_new_tokens"] < 256  # the window was moved back
    finishes = {o.finish for outs in hf for o in outs}
    assert finishes == ({"eos"} if kw["max_new_tokens"] == 256 else {"length"})  # whole solutions / cut short


def test_engine_buffers_start_uninitialised(testbed, monkeypatch):
    """Filled with NaN here: every column the window reaches is written or zeroed first, so nothing changes."""
    poison_new_buffers(monkeypatch, engine.PromptDecoder)
    model, tok = testbed
    prompts = [render_ids(tok, p.question) for p in generate_split("test", 40)]
    eng = decode(model, tok, prompts, DecodeConfig(max_new_tokens=256, batch_size=16, n=2, temperature=1.0))
    greedy_hf, greedy_eng = _both(model, tok, prompts, max_new_tokens=256, batch_size=16)
    assert greedy_eng == greedy_hf
    assert all(o.entropy is not None and o.entropy == o.entropy for outs in eng for o in outs)  # no NaN


@pytest.mark.parametrize("family, generation_config", [("qwen2.5", PENALIZED), ("gemma2", None), ("phi3", None)])
def test_engine_greedy_equals_generate_on_zoo_families(zoo_model, family, generation_config):
    """Padded vocabulary, pad == EOS and a checkpoint repetition penalty / n-gram ban (qwen2.5: neither acts);
    sliding windows and softcaps (gemma2, phi3). Where the outputs part, it must be a floating-point near-tie."""
    model, tok = load_model(str(zoo_model(family, generation_config)), device="cpu")
    prompts = [render_ids(tok, p.question) for p in generate_split("test", 12)]
    hf, eng = _both(model, tok, prompts, max_new_tokens=48, batch_size=5)
    for prompt, (a,), (b,) in zip(prompts, hf, eng):
        if a.ids == b.ids:
            assert a == b
            continue
        t = next(t for t, (x, y) in enumerate(zip(a.ids, b.ids)) if x != y)
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + a.ids[:t]])).logits[0, -1]
        gap = (logits[a.ids[t]] - logits[b.ids[t]]).abs().item()
        assert gap < NEAR_TIE, f"{family}: outputs part at {t} with a logit gap of {gap}"


def test_engine_sampling_is_reproducible_and_independent_of_the_batch(testbed):
    """One random stream per output (seed, prompt, sample index): the same outputs whatever the batch size or the
    order of the prompts; another seed gives other outputs. Entropy is recorded for every sampled output."""
    model, tok = testbed
    prompts = [render_ids(tok, p.question) for p in generate_split("test", 6)]
    cfg = DecodeConfig(max_new_tokens=64, temperature=1.0, n=4, seed=3, batch_size=24)
    first = decode(model, tok, prompts, cfg)
    assert decode(model, tok, prompts, cfg) == first

    stats = engine.EngineStats()
    assert _same(decode(model, tok, prompts, replace(cfg, batch_size=5), stats=stats), first)
    assert stats.batch_size == 5  # rows: the batch size, unless asked for more
    stats = engine.EngineStats()
    assert _same(decode(model, tok, prompts, replace(cfg, batch_size=5, rows=0), stats=stats), first)
    assert stats.batch_size > len(prompts) * cfg.n  # as many rows as memory holds (capped): more than requests,
    assert stats.batch_rows <= stats.forwards * len(prompts) * cfg.n  # but no step computes more rows than those
    assert _same(decode(model, tok, prompts, replace(cfg, rows=3)), first)
    assert _same(decode(model, tok, prompts[::-1], cfg), first[::-1])
    other = decode(model, tok, prompts, replace(cfg, seed=4))
    assert [o.ids for outs in other for o in outs] != [o.ids for outs in first for o in outs]
    samples = [o.ids for outs in first for o in outs]
    assert len(set(map(tuple, samples))) > len(prompts)  # the samples of one prompt differ
    assert all(o.entropy is not None and o.entropy >= 0 for outs in first for o in outs)


def test_engine_first_step_entropy_equals_generate(testbed):
    """With one new token both backends score the same distribution: equal entropies (temperature applied once)."""
    model, tok = testbed
    prompts = [render_ids(tok, p.question) for p in generate_split("test", 5)]
    hf, eng = _both(model, tok, prompts, max_new_tokens=1, temperature=0.7, n=2, stop_at_answer=False)
    for a, b in zip(hf, eng):
        assert [o.entropy for o in b] == pytest.approx([o.entropy for o in a], rel=1e-4, abs=1e-6)
        assert a[0].entropy == pytest.approx(a[1].entropy, rel=1e-6)


def test_engine_retries_with_fewer_rows_after_out_of_memory(testbed, monkeypatch):
    """A prefill or step over more than 3 rows runs out of memory: the engine halves its rows (restarted rows
    redraw the same random numbers) and prefills one prompt at a time; the outputs are unchanged."""
    model, tok = testbed
    prompts = [render_ids(tok, f"What is {i} + {i % 4}?") for i in range(6)]
    cfg = DecodeConfig(max_new_tokens=48, batch_size=8, temperature=1.0, n=2, seed=1)
    expected = decode(model, tok, prompts, cfg), decode(model, tok, prompts, replace(cfg, temperature=0.0))
    real, sizes = model.forward, []

    def forward(*args, input_ids, **kwargs):
        sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    assert _same(decode(model, tok, prompts, cfg), expected[0])
    assert decode(model, tok, prompts, replace(cfg, temperature=0.0)) == expected[1]
    assert {8, 4, 2, 1} <= set(sizes)  # steps of 8 and 4 rows failed, 2 ran; prefills of 4 prompts failed, 1 ran


def test_unsupported_model_falls_back_to_generate_with_a_note(tmp_path, caplog):
    """A layer kind the engine refuses (here chunked attention, as Llama-4 has): hf decodes, says so once, and the
    metadata records it."""
    model, tok = load_model("testbed", device="cpu")
    model.config.attention_chunk_size = 8
    out = tmp_path / "g.jsonl"
    with caplog.at_level(logging.WARNING):
        generate(GenerateConfig(model="testbed", data="testbed:test", out=str(out), limit=3,
                                decode=DecodeConfig(max_new_tokens=16)), model, tok)
    assert read_meta(out)["decoding"]["backend"] == "hf"
    notes = [r.getMessage() for r in caplog.records if "chunked attention" in r.getMessage()]
    assert len(notes) == 1 and "--backend hf" in notes[0]


@pytest.mark.slow
def test_engine_greedy_equals_generate_on_smollm2(smollm2_gguf):
    model, tok = load_model(str(smollm2_gguf), device="cpu")
    prompts = [render_ids(tok, p.question) for p in generate_split("test", 4)]
    hf, eng = _both(model, tok, prompts, max_new_tokens=48, batch_size=3)
    assert eng == hf
