"""The zoo's tiny models carry their family's features (docs/ZOO.md) and behave like trained models."""

from __future__ import annotations

import json

import pytest
import torch

from cft import zoo
from cft.decoding.api import DecodeConfig, decode
from cft.models import load_model, stop_token_ids, vocab_rows
from cft.prompts import render_ids
from cft.testbed.problems import generate_split

# family -> (class, tied embeddings, padded vocabulary, EOS ids of generation_config, feature check)
FACTS = {
    "qwen2.5": ("Qwen2ForCausalLM", True, True, [2, 0],
                lambda m: m.model.layers[0].self_attn.q_proj.bias is not None and m.config.sliding_window is None),
    "llama3.2": ("LlamaForCausalLM", True, False, [0, 2],
                 lambda m: m.config.rope_parameters["rope_type"] == "llama3" and m.config.num_key_value_heads == 2),
    "olmo2": ("Olmo2ForCausalLM", False, True, 2,
              lambda m: m.model.layers[0].self_attn.q_norm.weight.numel() == m.config.hidden_size),
    "phi3": ("Phi3ForCausalLM", False, True, [0, 2],
             lambda m: m.config.sliding_window == 32 and hasattr(m.model.layers[0].self_attn, "qkv_proj")),
    "gemma2": ("Gemma2ForCausalLM", True, False, [2, 0],
               lambda m: m.config.layer_types == ["sliding_attention", "full_attention"]
               and m.config.final_logit_softcapping == 30.0 and m.config._attn_implementation == "eager"
               and m.config.head_dim * m.config.num_attention_heads != m.config.hidden_size),
    "mistral": ("MistralForCausalLM", False, False, 2, lambda m: m.config.sliding_window == 32),
    "smollm2": ("LlamaForCausalLM", True, False, 2, lambda m: m.config.pad_token_id == m.config.eos_token_id),
}


def test_every_family_is_described():
    assert set(zoo.FAMILIES) == set(FACTS)
    with pytest.raises(ValueError, match="unknown zoo family 'gpt2'; choose from qwen2.5"):
        zoo.build("gpt2", "unused")


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_family_features(zoo_model, family):
    cls, tied, padded, eos, feature = FACTS[family]
    model, tok = load_model(str(zoo_model(family)), device="cpu")
    assert type(model).__name__ == cls
    assert (model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) is tied
    assert (vocab_rows(model) > len(tok)) is padded
    assert model.generation_config.eos_token_id == eos
    assert all(i < len(tok) and tok.added_tokens_decoder[i].special for i in stop_token_ids(tok, model))
    assert tok.pad_token_id is not None  # load_model supplies one where the family ships none
    assert feature(model)


def test_family_generation_config(zoo_model):
    """Qwen2.5-Instruct's sampling defaults are shipped; overrides merge, and None removes a field."""
    shipped = json.loads((zoo_model("qwen2.5") / "generation_config.json").read_text())
    assert {k: shipped[k] for k in ("do_sample", "repetition_penalty", "temperature", "top_p", "top_k")} == {
        "do_sample": True, "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    changed = zoo_model("qwen2.5", {"no_repeat_ngram_size": 3, "top_k": None})
    written = json.loads((changed / "generation_config.json").read_text())
    assert written["no_repeat_ngram_size"] == 3 and "top_k" not in written and written["repetition_penalty"] == 1.1
    assert (changed / "model.safetensors").read_bytes() == (zoo_model("qwen2.5") / "model.safetensors").read_bytes()
    assert json.loads((zoo_model("smollm2") / "tokenizer_config.json").read_text())["pad_token"] == "<|im_end|>"


@torch.inference_mode()
@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_trained_like_a_model(zoo_model, family):
    """Greedy text reads like a testbed solution and the top-1/top-2 logit gaps include small ones."""
    model, tok = load_model(str(zoo_model(family)), device="cpu")
    prompts = [render_ids(tok, p.question) for p in generate_split("test", 3)]
    outs = [o[0] for o in decode(model, tok, prompts, DecodeConfig(max_new_tokens=40, batch_size=3))]
    assert any(" has " in o.text and any(c.isdigit() for c in o.text) for o in outs), [o.text for o in outs]
    gaps = []
    for prompt, out in zip(prompts, outs):
        logits = model(torch.tensor([prompt + out.ids])).logits[0, len(prompt) - 1 : -1]
        top = logits.topk(2).values
        gaps += (top[:, 0] - top[:, 1]).tolist()
    assert min(gaps) < 0.2 and sorted(gaps)[len(gaps) // 2] < 5.0, (min(gaps), sorted(gaps)[len(gaps) // 2])
