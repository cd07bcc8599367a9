"""Decoding prompts (stages A and D) on a named backend: the settings, the front end and the stop audit's decoding.

``decode`` is the batched decoder shared by stage A and evaluation, stopping a row at EOS or once its final
answer is complete, on one of the registered backends (``DecodeConfig.backend``, recorded in
``meta["decoding"]``; ``cft.decoding.backends``):

- ``engine`` (default): ``cft.decoding.engine.PromptDecoder``, continuous batching over a preallocated
  key/value cache (a finished row is refilled at once; a prompt shared by n samples is prefilled once).
  A model the engine refuses (``engine.check_supported``) falls back to ``hf`` with a one-line note.
- ``hf``: transformers' ``generate`` over token-id prompts with left padding, in fixed batches; a batch
  that runs out of memory is retried in halves, so one long batch does not end a long run.

Greedy outputs of the two are the same tokens (up to floating-point near-ties: a top-1/top-2 logit gap
of ~1e-6 in fp32). Sampling has the same distribution but not the same random numbers: ``hf`` draws from
torch's global generator seeded once per call, ``engine`` gives every output its own stream (seed, prompt,
sample index), so its samples do not depend on the batch size or on the other prompts of the call.

Decoding is pinned (``pinned_generation_config`` / ``pinned_generate``): transformers fills every
setting a call leaves unset from the checkpoint's ``generation_config.json``, and several of those act
even under greedy decoding (Qwen2.5-Instruct's ``repetition_penalty``, ``no_repeat_ngram_size``,
``min_new_tokens``, ``bad_words_ids``, ...). Here nothing comes from the checkpoint but its EOS ids; the
resolved settings are recorded in the metadata (``decoding_settings``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Literal

from cft.artifacts import InputError
from cft.config import internal, option
from cft.decoding import Output, pinned_generation_config
from cft.decoding.backends import backend
from cft.decoding.rowcache import EngineStats
from cft.models import stop_token_ids
from cft.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class DecodeConfig:
    """Decoding settings; everything here changes results and is recorded.

    Its option fields are ``cft generate``'s decoding options (``CONFIGS``). ``temperature``, ``n`` and
    ``seed`` are set by the code, not on that command line: Stage A is greedy, one response a problem
    (Stage B's protocol assumes the argmax path), and its seed is ``GenerateConfig.seed``; ``cft eval``
    and the experiment YAML set them through the library.
    """

    max_new_tokens: int = option(256, "decoding budget per response (problems whose prompt leaves less room in "
                                      "the model's context are skipped, never truncated)")
    temperature: float = internal(0.0)  # 0 = greedy
    n: int = internal(1)
    batch_size: int = option(64, "responses decoded together (a batch that runs out of memory is retried in halves)")
    rows: int | None = option(None, "engine backend: rows decoded together (default: --batch-size; 0: as many as "
                                    "a quarter of free memory holds, at least --batch-size, at most 512 on a CPU "
                                    "and 1024 on a GPU). Outputs do not depend on it")
    stop_at_answer: bool = option(False, "SPEED KNOB: stop a response once its first final answer is complete "
                                         "instead of at EOS or the cap; `correct` then grades that first answer, "
                                         "not the last one `cft eval` grades, so the run audits the stop "
                                         "(--stop-audit) and records what it changed")
    stop_audit: int = option(64, "with --stop-at-answer: responses it stopped re-decoded to EOS, a seeded sample "
                                 "(besides every stopped response whose verdict flips at its next answer)")
    seed: int = internal(0)
    backend: Literal["engine", "hf"] = option(
        "engine", "engine: the fast engine's continuous batching (a model it does not support falls back to hf, "
                  "with a note); hf: transformers' model.generate in fixed batches. Greedy outputs are the same tokens")


def decoding_settings(model, tok, cfg: DecodeConfig) -> dict:
    """What decides the tokens, for the metadata: the pinned config, cft's temperature and stop rule."""
    gen = pinned_generation_config(stop_token_ids(tok, model), tok.pad_token_id, cfg.max_new_tokens,
                                   cfg.temperature > 0)
    settings = {k: v for k, v in gen.to_dict().items()
                if v is not None and not k.startswith("_") and k != "transformers_version"}
    return {"generation_config": settings, "temperature": cfg.temperature,
            "temperature_applied_by": "cft" if cfg.temperature > 0 else None,
            "stop_at_answer": cfg.stop_at_answer, "stop_rule": stop_rule(cfg.stop_at_answer),
            "inherited_from_checkpoint": ["eos_token_id"], "backend": cfg.backend}


def stop_rule(stop_at_answer: bool) -> str:
    """Where a response ends, in words for the metadata (generations' ``decoding``, labels' ``protocol``)."""
    if stop_at_answer:
        return "first complete answer (verify.answer_complete; opt-in speed knob, audited), EOS or the length cap"
    return "EOS or the length cap (the whole response is graded, as cft eval grades it)"


def resolve_backend(model, cfg: DecodeConfig, name: str = "model") -> DecodeConfig:
    """``cfg`` with the backend that will run: ``engine`` falls back to ``hf`` (one note) where it is refused."""
    check = backend(cfg.backend, "prompts").check
    if check is not None:
        try:
            check(model, name, fallback="decoding with model.generate instead (--backend hf)")
        except InputError as exc:
            log.warning("note: %s", exc)
            return replace(cfg, backend="hf")
    return cfg


def decode(model, tok, prompts: list[list[int]], cfg: DecodeConfig,
           progress: Progress | None = None, stats: EngineStats | None = None) -> list[list[Output]]:
    """``cfg.n`` outputs per prompt, in prompt order, on ``cfg.backend`` (see the module docstring).

    ``stats``: an ``engine.EngineStats`` the engine backend counts its forwards in (the caller's to read).
    """
    return next(decode_groups(model, tok, [(prompts, cfg)], progress, stats))[1]


def decode_groups(model, tok, groups: list[tuple[list[list[int]], DecodeConfig]], progress: Progress | None = None,
                  stats: EngineStats | None = None):
    """Decode groups of prompts, each under its own config; yield ``(group index, outputs)`` (outputs as
    ``decode`` returns them) as each group completes (``decode_outputs`` yields each output as it ends)."""
    results = [[[None] * cfg.n for _ in prompts] for prompts, cfg in groups]
    left = [len(prompts) * cfg.n for prompts, cfg in groups]
    for g, n in enumerate(left):
        if not n:
            yield g, results[g]
    for g, i, j, out in decode_outputs(model, tok, groups, progress, stats=stats):
        results[g][i][j] = out
        left[g] -= 1
        if not left[g]:
            yield g, results[g]


def decode_outputs(model, tok, groups: list[tuple[list[list[int]], DecodeConfig]], progress: Progress | None = None,
                   skip=None, stats: EngineStats | None = None):
    """Decode groups of prompts, each under its own config; yield ``(group, prompt index, sample index, Output)``
    for every output as it ends, so a caller can keep each one at once.

    ``skip(group, prompt index, sample index)``: True for an output not wanted (kept from an earlier run).
    ``engine`` leaves its request out, and the others keep their own random streams, so what is decoded is
    what a run of every output would give. ``hf`` decodes group by group (its sampling draws from one
    generator per call), so a group with any wanted output is decoded whole and only those are yielded.
    ``engine`` puts every group's outputs through one continuous batch, so rows stay full across groups;
    its groups may differ in temperature, ``n`` and seed only, and the first group's backend decides for all.
    """
    if not groups:
        return
    wanted = (lambda g, i, j: True) if skip is None else (lambda g, i, j: not skip(g, i, j))
    first = resolve_backend(model, groups[0][1])
    yield from backend(first.backend, "prompts").prompts(model, tok, groups, first, wanted, progress, stats)


def decode_on(model, tok, starts: list[tuple[list[int], int]], until_answer: bool, cfg: DecodeConfig) -> list[Output]:
    """Greedy continuations of ``(ids, cap)`` pairs, each at most ``cap`` tokens, ending at EOS, at the cap or
    (``until_answer``) once the continuation's own text holds a complete answer.

    The engine gives every request its own cap; ``hf`` decodes to the largest and cuts (a greedy decode cut at
    n tokens is the decode capped at n).
    """
    if not starts:
        return []
    dcfg = resolve_backend(model, replace(cfg, max_new_tokens=max(c for _, c in starts), temperature=0.0, n=1,
                                          stop_at_answer=until_answer))
    return backend(dcfg.backend, "prompts").continuations(model, tok, starts, dcfg)
