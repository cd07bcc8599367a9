"""The coarse kind of a token (digit / operator / other) that stage B's, training's and the viewer's
statistics break counts down by. Light (no torch): ``cft.selection`` and ``cft.view`` use it without
loading stage B's engine."""

from __future__ import annotations

KINDS = ("digit", "operator", "other")


def token_kind(text: str) -> str:
    """Coarse kind of a token for statistics: ``digit``, ``operator`` or ``other``."""
    s = text.strip()
    if any(ch.isdigit() for ch in s):
        return "digit"
    if s and all(ch in "+-*/=<>^()%.,:×÷" for ch in s) and s not in {".", ",", ":"}:
        return "operator"
    return "other"
