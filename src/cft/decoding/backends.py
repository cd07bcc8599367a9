"""The decoding backends, registered by name: stages choose one by name and never import a backend's module.

A backend is one module that calls ``register`` with the parts it implements:

- ``prompts(model, tok, groups, first, wanted, progress, stats)``: decode groups of prompts (stages A and D),
  yielding ``(group, prompt index, sample index, Output)`` as each output ends (``api.decode_outputs``);
- ``continuations(model, tok, starts, cfg)``: greedy continuations of ``(ids, cap)`` pairs (the stop audit);
- ``branches(model, tok, works, cfg, proto, on_done, progress, max_prompt)``: decode every counterfactual
  branch of stage B's ``Work``s, calling ``on_done(work)`` as each response is labelled; returns its counts
  (``EngineStats``) or None; ``shares_prefix``: it wants each work's teacher-forced key/values;
- ``check(model, name, fallback)``: raise ``InputError`` for a model the backend cannot decode.

Built in: the fast engine (``engine`` for prompts, ``fast`` for branches: ``cft.decoding.fast``), plain
``model.generate`` (``hf``: ``cft.decoding.hf``) and the per-branch reference (``reference``:
``cft.decoding.reference``). A new backend is one new file plus its line in ``BUILTIN`` (or a ``register``
call of the caller's own, as ``tests/test_decoding.py`` does).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from cft.errors import UsageError

BUILTIN = {"engine": "cft.decoding.fast", "fast": "cft.decoding.fast", "hf": "cft.decoding.hf",
           "reference": "cft.decoding.reference"}
PARTS = ("prompts", "continuations", "branches")


@dataclass(frozen=True)
class Backend:
    name: str
    prompts: Callable | None = None
    continuations: Callable | None = None
    branches: Callable | None = None
    check: Callable | None = None
    shares_prefix: bool = False


REGISTRY: dict[str, Backend] = {}


def register(name: str, **parts) -> Backend:
    """Register backend ``name`` with its parts (see the module docstring); a name is registered once."""
    if name in REGISTRY:
        raise ValueError(f"decoding backend {name!r} is registered twice")
    REGISTRY[name] = Backend(name, **parts)
    return REGISTRY[name]


def backend(name: str, part: str) -> Backend:
    """The backend ``name`` (its module imported on first use), which must implement ``part``."""
    if name not in REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    found = REGISTRY.get(name)
    if found is None or getattr(found, part) is None:
        names = sorted({*REGISTRY, *BUILTIN} if part != "branches" else {"fast", "reference", *REGISTRY})
        raise UsageError(f"unknown backend {name!r} for {part}; choose from {', '.join(names)}")
    return found
