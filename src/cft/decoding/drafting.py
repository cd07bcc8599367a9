"""Re-convergence drafting for the fast engine: which tokens a branch row proposes, and how many per step.

A branch usually rejoins the original solution a few tokens after its substituted token. ``DraftIndex``
proposes up to ``draft`` tokens from the row's original prompt + response and from its response's branches
decoded so far (the tokens that followed the last ``ngram`` tokens of the branch there); the engine's step
verifies them (greedy speculative acceptance), so the output is greedy decoding token for token, only fewer
forwards. ``DraftTuner`` chooses the width by timing the first steps: whether drafts pay depends on the
machine and the model. The width never changes an output (``cft.decoding.engine``'s rescoring and exact path).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from itertools import takewhile

import torch

# The most draft tokens verified per row and step, by device type; each run chooses the width it uses
# (``DraftTuner``). A GPU step is bound by reading weights and cache, nearly free in extra columns; a CPU
# pays for every query column. On this project's 2-core CPU (fast engine alone, the width fixed, one run
# each, back to back, 2 threads): 40 testbed responses at 0 / 1 / 2 / 4 drafts ran at 7258 / 6998 / 7477 /
# 7402 tok/s (2.68 tokens per row-step at 4); 10 SmolLM2-135M responses at 0 / 1 / 4 at 155 / 80 / 53 tok/s
# (1.32 at 4).
DRAFT_TOKENS = {"cpu": 4, "cuda": 8}
DRAFT_NGRAM = 4  # the longest branch suffix looked up (shorter ones are tried next). On the demo's stage A
# (132 responses, 4-token drafts, stored continuations replayed): 3.01 / 3.14 decoded tokens per row-step at
# 3 / 4, the original alone 2.69 at 3, 4 or 6
DRAFT_ROUNDS = 3  # rounds of timing every width, one step each, before the tuner chooses
DRAFT_SLOW = 0.7  # a width under this fraction of the best rate is dropped (and every wider one, past the best)
DRAFT_EVEN = 0.9  # widths within this fraction of the best rate count as even: the widest of them runs, for
# fewer forwards


def default_draft(device: torch.device) -> int:
    return DRAFT_TOKENS.get(device.type, DRAFT_TOKENS["cpu"])


class DraftTuner:
    """The draft width of a run's steps, chosen by timing: decoded tokens per second at each width.

    Output does not depend on the width (a draft only saves forwards when greedy decoding reproduces it), so
    the choice is free to follow the machine: extra query columns cost little where a step reads weights and
    cache (a GPU) and nearly their share of compute where it multiplies (a CPU on a larger model). The first
    steps try the widths narrowest first, each with one untimed step (a shape's first use costs more) and
    one timed step; a width clearly slower than the best so far ends the trial of it and of every wider one
    (rates rise, then fall, with width). Then the remaining widths take one timed step each in turn, for
    ``DRAFT_ROUNDS`` rounds in all, so that neighbouring steps (the same batch, nearly) are compared, the
    clearly slower ones dropping out after each round; the fastest stays for the rest of the run (the widest
    of those within ``DRAFT_EVEN`` of it). ``fixed`` keeps the widest width from the start.
    """

    def __init__(self, most: int, fixed: bool = False):
        self.widths = sorted({most, *(w for w in (0, 1, 2, 4, 8) if w < most)})
        self.chosen = most if fixed or most == 0 else None
        self.seconds = dict.fromkeys(self.widths, 0.0)
        self.tokens = dict.fromkeys(self.widths, 0)
        self.plan: deque[tuple[int, bool]] = deque((w, timed) for w in self.widths for timed in (False, True))
        self.step: tuple[int, bool] = (most, False)
        self.rounds = 1

    def rate(self, width: int) -> float:
        return self.tokens[width] / max(self.seconds[width], 1e-9)

    def choose(self) -> int:
        if self.chosen is None and not self.plan:
            top = max(map(self.rate, self.widths))
            best = next(w for w in self.widths if self.rate(w) == top)
            slow = [w for w in self.widths if self.rate(w) < DRAFT_SLOW * top]
            wall = min((w for w in slow if w > best), default=math.inf)  # rates fall past it
            self.widths = [w for w in self.widths if w not in slow and w < wall]
            if self.rounds == DRAFT_ROUNDS or len(self.widths) == 1:
                self.chosen = max(w for w in self.widths if self.rate(w) >= DRAFT_EVEN * top)
            self.rounds += 1
            self.plan.extend((w, True) for w in self.widths)
        if self.chosen is not None:
            return self.chosen
        self.step = self.plan.popleft()
        return self.step[0]

    def record(self, width: int, seconds: float, tokens: int) -> None:
        if self.chosen is not None or not self.step[1]:
            return
        self.seconds[width] += seconds
        self.tokens[width] += tokens
        first_trial = self.rounds == 1 and width > self.widths[0]  # narrower widths are timed already
        if first_trial and self.rate(width) < DRAFT_SLOW * max(self.rate(w) for w in self.widths if w < width):
            self.widths = [w for w in self.widths if w < width]
            self.plan = deque(x for x in self.plan if x[0] < width)


class DraftIndex:
    """Where every n-gram (n <= ``ngram``) occurs in a response's prompt + response (the original) and in the
    continuations of its branches decoded so far (the pool), for draft lookups.

    Branches of one response often write the same text after their substitutions (a changed number carried
    through the same sentence), which the original does not hold: on the 132 responses of the demo's stage A,
    4-token drafts from the original alone give 2.69 decoded tokens per row-step, with the pool 3.14
    (replaying the stored continuations). ``add`` appends a decoded continuation; ``propose`` takes the
    longer matching suffix of the two, the original's on a tie.
    """

    def __init__(self, seq: list[int], ngram: int):
        self.ngram = ngram
        self.seq, self.table = [], [{} for _ in range(ngram + 1)]
        self._index(self.seq, self.table, seq)
        self.pool, self.pool_table = [], [{} for _ in range(ngram + 1)]

    def _index(self, seq: list[int], table: list[dict], tokens: list[int]) -> None:
        start = len(seq)
        seq.extend(tokens)
        for n in range(1, self.ngram + 1):
            for q in range(max(n, start), len(seq)):  # q: the position that follows the n-gram seq[q-n:q]
                table[n].setdefault(tuple(seq[q - n : q]), []).append(q)

    def add(self, tokens: list[int]) -> None:
        """Index a branch's decoded tokens (its alternative and continuation) for later branches."""
        if tokens:
            self._index(self.pool, self.pool_table, [*tokens, -1])  # -1: no n-gram spans two continuations

    def _match(self, table: list[dict], response: list[int]) -> tuple[int, list[int]]:
        for n in range(min(self.ngram, len(response)), 0, -1):
            hits = table[n].get(tuple(response[-n:]))
            if hits:
                return n, hits
        return 0, []

    def propose(self, response: list[int], cursor: int, size: int) -> tuple[int | None, list[int]]:
        """Up to ``size`` tokens that followed the longest matching suffix of ``response``.

        In the original, of several occurrences the first at or after ``cursor`` wins (else the last): a
        branch rejoins the original near where it left it; in the pool the latest. Returns (source position
        in the original, or None for the pool, drafts).
        """
        n, hits = self._match(self.table, response)
        m, pool_hits = self._match(self.pool_table, response)
        if m > n:
            q = pool_hits[-1]
            drafts = list(takewhile(lambda x: x >= 0, self.pool[q : q + size]))
            if drafts:
                return None, drafts
        if not n:
            return cursor, []
        k = bisect_left(hits, cursor)
        q = hits[k] if k < len(hits) else hits[-1]
        return q, self.seq[q : q + size]
