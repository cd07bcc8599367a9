"""Optional dependencies: which extra of ``pip install 'cft[EXTRA]'`` installs each, and a clear error without it.

A core install runs every stage on folder models; reading GGUF files, drawing the report's plots and
DeepSpeed ZeRO need more. Code that needs one calls ``require`` first, so a missing package is one line
naming the extra (an ``OSError``: the CLI reports it without a traceback), not an ImportError from deep
inside transformers. ``tests/test_packaging.py`` checks this table against pyproject's extras.
"""

from __future__ import annotations

import importlib.util

from cft.errors import UserError

EXTRAS = {"gguf": "gguf", "matplotlib": "report", "deepspeed": "deepspeed"}  # import name -> extra


class MissingExtra(UserError, OSError):
    """An optional dependency is not installed."""


def require(module: str, purpose: str) -> None:
    """Raise ``MissingExtra`` naming the extra to install unless ``module`` can be imported."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtra(f"{purpose} needs the {module} package, which is not installed: "
                           f"pip install 'cft[{EXTRAS[module]}]'")
