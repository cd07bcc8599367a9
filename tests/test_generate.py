"""Stage A decodes the model's own argmax path under pinned settings, on every zoo model and in bf16."""

from __future__ import annotations

import pytest
import torch

from cft import zoo
from cft.artifacts import load_records, read_meta
from cft.generate import DecodeConfig, GenerateConfig, decode, generate, trigger_tokens
from cft.models import load_model, stop_token_ids, vocab_rows
from cft.prompts import render_ids
from cft.testbed.problems import generate_split

NEAR_TIE = 1e-4  # top-1/top-2 logit gap under which a cached step and a full forward may pick differently (fp32)
HAS = 264  # " has" in the testbed tokenizer
NEUTRAL = {"repetition_penalty": None, "do_sample": None, "temperature": None, "top_p": None, "top_k": None}


def _stage_a(tmp_path, model_dir, name: str, **decode_kw) -> tuple[list[list[int]], dict]:
    out = tmp_path / f"{name}.jsonl"
    generate(GenerateConfig(model=str(model_dir), data="testbed:test", out=str(out), limit=6, device="cpu",
                            decode=DecodeConfig(max_new_tokens=48, batch_size=3, **decode_kw)))
    return [r["response_ids"] for r in load_records(out, "generations")], read_meta(out)


def test_checkpoint_generation_config_does_not_change_stage_a(tmp_path, zoo_model):
    """Qwen2.5-Instruct ships repetition_penalty 1.1 (here with no_repeat_ngram_size 3 too): stage A ignores both."""
    penalized = zoo_model("qwen2.5", {"repetition_penalty": 1.1, "no_repeat_ngram_size": 3})
    plain = zoo_model("qwen2.5", NEUTRAL)
    # Fields whose neutral value is None are filled from the checkpoint unless generate sees only ours.
    hostile = zoo_model("qwen2.5", {"min_new_tokens": 40, "suppress_tokens": [2], "bad_words_ids": [[HAS]],
                                    "stop_strings": ["has"]})
    with_penalty, meta = _stage_a(tmp_path, penalized, "penalized")
    without, meta_plain = _stage_a(tmp_path, plain, "plain")
    assert with_penalty == without == _stage_a(tmp_path, hostile, "hostile")[0]
    assert meta["decoding"] == meta_plain["decoding"]
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
