"""Architecture-faithful tiny models: each mirrors what a real family ships, built locally in seconds.

``build(family, path)`` writes a Hugging Face model folder (config, safetensors weights,
generation_config.json, tokenizer) for one of ``FAMILIES``. Nothing is downloaded: the tokenizer is the
testbed's BPE (``cft.testbed.tokenizer``), and the weights come from a short training run on testbed
solutions (``cft.testbed.pretrain``'s batches), so greedy outputs look like solutions while the model is
far from converged: its top-1/top-2 logit gaps include small ones, as a real model's do (random init
at a large scale would give huge margins, under which any two decoders agree).

The family facts come from the published configs (see docs/ZOO.md); the token ids are mapped onto the
testbed tokenizer's special tokens: ``<|endoftext|>`` = 0, ``<|im_start|>`` = 1, ``<|im_end|>`` = 2
(the token the models learn to end a solution with). Every family is 2 layers, hidden 64, head_dim
16 (Gemma-2: 32), rope θ 1e4 (the real 1e5-1e6 are meant for head_dim 64-128; at 16 they leave too few
rotating frequencies for a short training run to learn positions).

============  =================================================================================
family        features carried
============  =================================================================================
qwen2.5       Qwen2ForCausalLM; GQA 4/2; QKV bias; tied embeddings; 512 embedding rows for 474
              tokens (padded vocab); sliding_window field present but unused
              (use_sliding_window false); generation_config of Qwen2.5-Instruct: do_sample true,
              repetition_penalty 1.1, temperature 0.7, top_p 0.8, top_k 20, eos [2, 0], pad 0 (the
              pad is also an EOS), bos 0.
llama3.2      LlamaForCausalLM; GQA 4/2; tied; rope "llama3" scaling (factor 32, low 1, high 4);
              eos [0, 2] in config and generation_config (several EOS), bos 1; no pad id anywhere
              (the saved tokenizer has none either); generation_config do_sample true,
              temperature 0.6, top_p 0.9.
olmo2         Olmo2ForCausalLM; QK RMSNorm over the whole q/k projections; norm after each sublayer;
              no GQA; untied; 512 rows for 474 tokens; eos 2, pad 0, no bos.
phi3          Phi3ForCausalLM; fused qkv_proj and gate_up_proj; sliding window 32 on every layer;
              untied; 512 rows for 474 tokens; bos 1, config eos 0, generation_config eos [0, 2],
              pad 0 (the pad is also an EOS).
gemma2        Gemma2ForCausalLM; alternating sliding (window 32, even layers) / full layers;
              attention softcap 50, final logit softcap 30; head_dim 32 != hidden/heads;
              query_pre_attn_scalar = head_dim; GQA 4/2; tied; eager attention; eos [2, 0], pad 0,
              bos 1; generation_config cache_implementation "hybrid".
mistral       MistralForCausalLM; GQA 4/2; sliding window 32 on every layer; untied; bos 1, eos 2;
              no pad id anywhere (the saved tokenizer has none either).
smollm2       LlamaForCausalLM; GQA 6/2 (hidden 96); tied; bos 1, eos 2,
              pad 2 (pad == eos, in the tokenizer too).
============  =================================================================================

``generation_config`` given to ``build`` is merged over the family's own (a value of None removes the
field), e.g. ``{"repetition_penalty": 1.1, "no_repeat_ngram_size": 3}``: the files are written as
given, without validation, as real checkpoints ship them.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import torch
import transformers

from cft.testbed.batches import training_batch
from cft.testbed.tokenizer import build_tokenizer

FAMILIES: tuple[str, ...] = ("qwen2.5", "llama3.2", "olmo2", "phi3", "gemma2", "mistral", "smollm2")

PAD, BOS, EOS = 0, 1, 2  # <|endoftext|>, <|im_start|>, <|im_end|> in the testbed tokenizer
PADDED_ROWS = 512  # embedding rows of the padded-vocab families (the tokenizer has 474 tokens)
TRAIN_STEPS = 80
TRAIN_BATCH = 8
LR = 1e-2
ROPE_THETA = 1e4  # the real 1e5-1e6 leave head_dim 16 too few rotating frequencies: the model cannot learn positions
_SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "max_position_embeddings": 512}

# family -> (config class, config kwargs, generation_config, tokenizer pad: "pad" | "eos" | None)
_SPECS: dict[str, tuple[str, dict, dict, str | None]] = {
    "qwen2.5": ("Qwen2Config", {
        **_SMALL, "num_key_value_heads": 2, "vocab_size": PADDED_ROWS, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA}, "use_sliding_window": False,
        "sliding_window": 32, "max_window_layers": 1, "bos_token_id": PAD, "eos_token_id": EOS},
        {"bos_token_id": PAD, "pad_token_id": PAD, "do_sample": True, "eos_token_id": [EOS, PAD],
         "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.8, "top_k": 20}, "pad"),
    "llama3.2": ("LlamaConfig", {
        **_SMALL, "num_key_value_heads": 2, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": ROPE_THETA, "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
        "bos_token_id": BOS, "eos_token_id": [PAD, EOS]},
        {"bos_token_id": BOS, "do_sample": True, "eos_token_id": [PAD, EOS], "temperature": 0.6, "top_p": 0.9},
        None),
    "olmo2": ("Olmo2Config", {
        **_SMALL, "num_key_value_heads": 4, "vocab_size": PADDED_ROWS, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "bos_token_id": None, "eos_token_id": EOS, "pad_token_id": PAD},
        {"_from_model_config": True, "eos_token_id": EOS, "pad_token_id": PAD}, "pad"),
    "phi3": ("Phi3Config", {
        **_SMALL, "num_key_value_heads": 4, "vocab_size": PADDED_ROWS, "tie_word_embeddings": False,
        "sliding_window": 32, "original_max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "bos_token_id": BOS, "eos_token_id": PAD, "pad_token_id": PAD},
        {"_from_model_config": True, "bos_token_id": BOS, "eos_token_id": [PAD, EOS], "pad_token_id": PAD}, "pad"),
    "gemma2": ("Gemma2Config", {
        **_SMALL, "num_key_value_heads": 2, "head_dim": 32, "query_pre_attn_scalar": 32, "tie_word_embeddings": True,
        "sliding_window": 32, "layer_types": ["sliding_attention", "full_attention"],
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "bos_token_id": BOS, "eos_token_id": [EOS, PAD], "pad_token_id": PAD},
        {"_from_model_config": True, "bos_token_id": BOS, "cache_implementation": "hybrid",
         "eos_token_id": [EOS, PAD], "pad_token_id": PAD}, "pad"),
    "mistral": ("MistralConfig", {
        **_SMALL, "num_key_value_heads": 2, "tie_word_embeddings": False, "sliding_window": 32,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "bos_token_id": BOS, "eos_token_id": EOS},
        {"_from_model_config": True, "bos_token_id": BOS, "eos_token_id": EOS}, None),
    "smollm2": ("LlamaConfig", {
        **_SMALL, "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": EOS},
        {"_from_model_config": True, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": EOS}, "eos"),
}


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return build_tokenizer()


def _config(family: str):
    cls_name, kwargs, _, _ = _SPECS[family]
    kwargs = {"vocab_size": len(_tokenizer()), **kwargs}
    config = getattr(transformers, cls_name)(**kwargs)
    if family == "gemma2":
        config._attn_implementation = "eager"  # softcapping: Gemma-2 declares no SDPA/flash support
    return config


@functools.lru_cache(maxsize=2)
def _batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The training batches (prompt + solution, loss on the solution), shared by every family."""
    rng = random.Random(seed)
    return [training_batch(_tokenizer(), rng, TRAIN_BATCH) for _ in range(TRAIN_STEPS)]


@functools.lru_cache(maxsize=16)
def _trained(family: str, seed: int) -> dict[str, torch.Tensor]:
    """The family's weights after a short run on testbed solutions; cached per process (tests build often)."""
    tok = _tokenizer()
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():  # callable anywhere
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(_config(family), dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, betas=(0.9, 0.98))
        model.train()
        for ids, labels in _batches(seed):
            loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build(family: str, path, *, generation_config: dict | None = None, seed: int = 0) -> Path:
    """Write the tiny ``family`` model as a HF folder at ``path`` and return it (see the module docstring)."""
    if family not in _SPECS:
        raise ValueError(f"unknown zoo family {family!r}; choose from {', '.join(FAMILIES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = transformers.AutoModelForCausalLM.from_config(_config(family), dtype=torch.float32)
    model.load_state_dict(_trained(family, seed))
    model.save_pretrained(path)
    gen = {**_SPECS[family][2], **(generation_config or {})}
    gen = {k: v for k, v in gen.items() if v is not None}
    gen["transformers_version"] = transformers.__version__
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok = _tokenizer()
    pad = _SPECS[family][3]
    saved_pad = tok.pad_token
    try:
        tok.pad_token = {"pad": tok.pad_token, "eos": tok.eos_token, None: None}[pad]
        tok.save_pretrained(path)
    finally:
        tok.pad_token = saved_pad
    return path
