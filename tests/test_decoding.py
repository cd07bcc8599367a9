"""The decoding layer's backends: chosen by name, a new one is a registration (here, from this file)."""

from __future__ import annotations

import pytest

from cft.decoding import Output, backends
from cft.decoding.api import DecodeConfig, decode, decode_on
from cft.errors import UsageError


def test_a_backend_registered_from_a_test_file_decodes_by_name(monkeypatch):
    monkeypatch.setattr(backends, "REGISTRY", dict(backends.REGISTRY))  # the registry as it was, afterwards
    calls = []

    def prompts(model, tok, groups, first, wanted, progress=None, stats=None):
        calls.append(first.backend)
        for g, (group, cfg) in enumerate(groups):
            for i, ids in enumerate(group):
                yield from ((g, i, j, Output([*reversed(ids), j], "echo", "length"))
                            for j in range(cfg.n) if wanted(g, i, j))

    def continuations(model, tok, starts, cfg):
        return [Output(ids[-cap:], "echo", "length") for ids, cap in starts]

    backends.register("echo", prompts=prompts, continuations=continuations)
    outs = decode(None, None, [[1, 2, 3], [4]], DecodeConfig(backend="echo", n=2))
    assert [[o.ids for o in per] for per in outs] == [[[3, 2, 1, 0], [3, 2, 1, 1]], [[4, 0], [4, 1]]]
    assert [o.ids for o in decode_on(None, None, [([5, 6, 7], 2)], True, DecodeConfig(backend="echo"))] == [[6, 7]]
    assert calls == ["echo"]
    with pytest.raises(ValueError, match="registered twice"):
        backends.register("echo", prompts=prompts)
    with pytest.raises(UsageError, match="unknown backend 'echo' for branches"):
        backends.backend("echo", "branches")  # it decodes prompts only


def test_unknown_backends_are_one_line_and_built_in_ones_load_by_name():
    with pytest.raises(UsageError, match="unknown backend 'nope' for prompts; choose from .*engine.*hf"):
        decode(None, None, [[1]], DecodeConfig(backend="nope"))
    assert backends.backend("engine", "prompts").continuations is not None
    fast, reference = backends.backend("fast", "branches"), backends.backend("reference", "branches")
    assert fast.shares_prefix and not reference.shares_prefix and reference.check is None
