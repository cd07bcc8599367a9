"""Progress for long jobs: items done, tokens/s and ETA, through tqdm (to stderr)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """A tqdm bar counting items, with decoded tokens/s in its postfix."""

    def __init__(self, desc: str, total: int, unit: str = "item"):
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                        mininterval=1.0, disable=None)
        self.tokens = 0
        self.t0 = time.time()

    def advance(self, n: int = 1, tokens: int = 0) -> None:
        self.tokens += tokens
        if self.tokens:
            self.bar.set_postfix(tok_s=f"{self.tokens / max(time.time() - self.t0, 1e-9):.0f}", refresh=False)
        self.bar.update(n)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
