"""The fast engine on architectures beyond Llama: supported exactly, or refused by name with the fallback."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM

from cft.artifacts import InputError, load_records
from cft.decoding.api import DecodeConfig, decode
from cft.decoding.engine import check_supported
from cft.identify import IdentifyConfig, identify, without_margins
from cft.prompts import render_ids
from cft.verify import extract_answer
from tests.conftest import generation, write_jsonl

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=512)


def tiny(family: str, tok, **kw):
    """A tiny random model of ``family`` on the testbed tokenizer (built in about a second)."""
    ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**SMALL, **ids, **kw))
    else:  # Gemma-2: alternating sliding/full layers, attention and final-logit softcapping
        model = Gemma2ForCausalLM(Gemma2Config(**SMALL, **ids, attn_implementation="eager", **kw))
    for p in model.parameters():  # wider logits than the default init: varied continuations
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def responses(model, tok, n=4, max_new_tokens=14):
    """Greedy responses, each made 'correct' by taking its own final answer as gold."""
    prompts = [render_ids(tok, f"What is {i} + {i + 3}?") for i in range(n)]
    outs = decode(model, tok, prompts, DecodeConfig(max_new_tokens=max_new_tokens, batch_size=1))
    return [generation(tok, f"What is {i} + {i + 3}?", o[0].ids, extract_answer(o[0].text) or "none", rid=f"r{i}")
            for i, o in enumerate(outs)]


def run(tmp_path, model, tok, records, engine, max_new_tokens=14):
    gen = write_jsonl(tmp_path / f"gen-{engine}.jsonl", records)
    out = tmp_path / f"L-{engine}.jsonl"
    identify(IdentifyConfig(model="tiny", input=str(gen), out=str(out), engine=engine, max_new_tokens=max_new_tokens,
                            batch_size=5), model=model, tok=tok)
    return [without_margins(r) for r in load_records(out, "labels")]


@pytest.mark.parametrize(("family", "window"), [("mistral", 4), ("gemma2", 5), ("mistral", 256)])
def test_sliding_window_models_fast_equals_reference(tmp_path, testbed_tokenizer, family, window):
    """Rows far wider than the window (prompt ~20 + 14 tokens) exercise the windowed masks; 256 does not."""
    tok = testbed_tokenizer
    model = tiny(family, tok, sliding_window=window)
    records = responses(model, tok)
    fast, ref = run(tmp_path, model, tok, records, "fast"), run(tmp_path, model, tok, records, "reference")
    assert [r["critical"] for r in fast] == [r["critical"] for r in ref]
    decoded = 0
    for f, r in zip(fast, ref):
        for bf, br in zip(f["branches"], r["branches"]):
            for a, b in zip(bf, br):
                if a["ok"] is not None:
                    assert (a["ids"], a["ok"]) == (b["ids"], b["ok"])
                    decoded += 1
    assert decoded > 30


def test_layers_without_a_kv_cache_are_refused(testbed_tokenizer):
    model = tiny("mistral", testbed_tokenizer, sliding_window=None)
    check_supported(model, "m")  # full attention everywhere
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(InputError, match=r"m: the fast engine does not support layer type\(s\) linear_attention.*"
                                         "--engine reference"):
        check_supported(model, "m")
