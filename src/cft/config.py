"""Options declared once: a config dataclass field carries its default and help text; parsers are derived.

Every stage command's parser is generated from its config dataclasses (``transformers.HfArgumentParser``,
the same convention as TRL's ``TrlParser``): a field ``max_new_tokens: int = 256`` with
``metadata={"help": ...}`` becomes ``--max-new-tokens`` (and ``--max_new_tokens``) with that help and
default; ``--config FILE.yaml`` sets any of them, command-line options override the file. The library
API takes the same dataclasses, so a YAML file, the command line and Python code speak one vocabulary.

This module knows nothing of the stages; it is imported by all of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, field
from typing import Any

# Metadata key of a field that is filled by the code, never given by a user (not on the command line).
INTERNAL = "cft_internal"
# Metadata key of a field given as a positional argument (``cft view LABELS``), not as ``--name``.
POSITIONAL = "cft_positional"

DTYPES = ("float32", "bfloat16", "float16", "auto")


def option(default: Any = MISSING, help: str = "", *, factory: Any = MISSING, aliases: tuple[str, ...] = (),
           positional: bool = False, **argparse_kwargs: Any):
    """A config field that is also a command-line option (``aliases``: extra option strings such as ``-k``;
    ``positional``: given without an option name, as in ``cft view LABELS``)."""
    metadata: dict[str, Any] = {"help": help, **argparse_kwargs}
    if aliases:
        metadata["aliases"] = list(aliases)
    if positional:
        metadata[POSITIONAL] = True
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def internal(default: Any = MISSING, *, factory: Any = MISSING):
    """A field the code fills in (resolved protocol, recorded approximations): not a command-line option."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={INTERNAL: True})
    return field(default=default, metadata={INTERNAL: True})


# The options every model-loading stage shares, declared here once.
MODEL_HELP = ("'testbed', 'smollm2', 'zoo:FAMILY' (cft.zoo), a Hugging Face model folder, a PEFT adapter folder, "
              "a .gguf file or a hub id")


def model_option(default: Any = MISSING, help: str | None = None):
    return option(default, help or MODEL_HELP)


def dtype_option(default: str | None = "float32", help: str | None = None):
    return option(default, help or "weights and compute dtype ('auto': the checkpoint's torch_dtype)",
                  choices=list(DTYPES))


def device_option():
    return option(None, "cpu, cuda, cuda:1, mps, ... (default: cuda when available)")


def attn_option():
    return option(None, "attention implementation passed to from_pretrained (eager, sdpa, flash_attention_2); "
                        "default: the model's own")


def is_internal(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get(INTERNAL))


def is_positional(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get(POSITIONAL))


def from_args(cls, args: Any, **overrides: Any):
    """An instance of dataclass ``cls`` from a parsed namespace: every option field by name, plus ``overrides``."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if f.init and not is_internal(f) and hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)
