"""The fast engine as a backend: ``engine`` decodes prompts (``PromptDecoder``), ``fast`` decodes stage B's
branches (``BranchDecoder``); both refuse the models ``check_supported`` names."""

from __future__ import annotations

from cft.artifacts import record_key
from cft.decoding.api import DecodeConfig
from cft.decoding.backends import register
from cft.decoding.engine import BranchDecoder, PromptDecoder, Request, check_supported


def engine_requests(prompts: list[list[int]], cfg: DecodeConfig, group: int = 0) -> list:
    """``cfg.n`` engine requests per prompt, longest prompts first, tagged (group, prompt index, sample).

    A sampled request's random stream is a hash of (seed, prompt, sample index), the index counting on
    over earlier identical prompts of the call, so outputs do not depend on batch size or prompt order.
    """

    seen: dict[tuple[int, ...], int] = {}
    requests = []
    for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
        key = tuple(prompts[i])
        first = seen.get(key, 0)
        seen[key] = first + cfg.n
        for j in range(cfg.n):
            stream = record_key(cfg.seed, prompts[i], first + j) if cfg.temperature > 0 else ""
            requests.append(Request(prompts[i], cfg.temperature, stream, (group, i, j)))
    return requests


def prompts(model, tok, groups, first, wanted, progress=None, stats=None):
    """Every group's outputs through one continuous batch, so rows stay full across groups; the groups may
    differ in temperature, ``n`` and seed only (the first group's config decides the rest)."""
    shared = ("max_new_tokens", "stop_at_answer", "batch_size", "rows")
    requests = []
    for g, (group_prompts, cfg) in enumerate(groups):
        if any(getattr(cfg, k) != getattr(first, k) for k in shared):
            raise ValueError(f"decode_groups: group {g} differs from group 0 in {shared} (one engine run decodes all)")
        requests += [r for r in engine_requests(group_prompts, cfg, g) if wanted(*r.tag)]
    for req, out in PromptDecoder(model, tok, first, stats).run(requests, progress):
        yield (*req.tag, out)


def continuations(model, tok, starts, cfg):
    """Every request with its own cap."""
    outs = [None] * len(starts)
    requests = [Request(ids, tag=i, max_new_tokens=cap) for i, (ids, cap) in enumerate(starts)]
    for req, out in PromptDecoder(model, tok, cfg).run(requests):
        outs[req.tag] = out
    return outs


def branches(model, tok, works, cfg, proto, on_done, progress, max_prompt):
    return BranchDecoder(model, tok, cfg, proto).run(works, on_done, progress, max_prompt)


register("engine", prompts=prompts, continuations=continuations, check=check_supported)
register("fast", branches=branches, check=check_supported, shares_prefix=True)
