"""Progress of long jobs, for a person at a terminal and for a log file alike: items done, tokens/s and ETA.

In a terminal it is a tqdm bar (on stderr). Elsewhere (a SLURM log, a ``nohup`` file, CI, ``> log 2>&1``)
a bar would either vanish (tqdm disables itself) or flood the file with carriage returns, so a plain line
is printed every ``progress_seconds()`` instead, by a timer thread: a step that takes minutes still
reports on time. One mechanism for every stage: ``generate``, ``identify``, ``eval`` and ``experiment``
use ``Progress`` directly, ``train`` and ``grpo`` through ``cft.train.TrainProgress``.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from tqdm import tqdm

SECONDS_ENV = "CFT_PROGRESS_SECONDS"


def progress_seconds() -> float:
    """Seconds between two progress lines in a log: ``$CFT_PROGRESS_SECONDS``, default 30."""
    value = os.environ.get(SECONDS_ENV, "30")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{SECONDS_ENV} must be a positive number of seconds, not {value!r}")
    return seconds


def clock(seconds: float) -> str:
    """``1:02:03`` or ``2:03``."""
    return tqdm.format_interval(max(seconds, 0))


class Progress:
    """Items done of ``total``, with decoded (or trained) tokens/s; a tqdm bar in a terminal, else timed lines.

    ``bar``: None decides by whether stderr is a terminal. Without a bar a line like
    ``eval: 12/48 item (25%), 310 tok/s, elapsed 1:02, ETA 3:06`` goes to stderr every ``seconds``
    (default ``progress_seconds()``), and a last one when a job that printed any ends. ``initial``: items
    done before (a resumed run); they count as done, not in the pace. ``max_tokens``: the most tokens the job
    can decode (its items times their budget). The ETA is the items' pace so far, capped by the time the items
    left need to decode their whole budget at the current tokens/s; until an item is done it is that bound alone
    (``ETA <= 9:30``). A continuous batch finishes its short items first, so the items' pace alone would
    promise hours where minutes remain.
    """

    def __init__(self, desc: str, total: int, unit: str = "item", bar: bool | None = None,
                 seconds: float | None = None, initial: int = 0, max_tokens: int | None = None):
        self.desc, self.total, self.unit = desc, total, unit
        self.done = self.initial = initial
        self.max_tokens = max_tokens
        self.tokens = 0
        self.t0 = time.time()
        self.lines = 0  # timed lines printed
        use_bar = sys.stderr.isatty() if bar is None else bar
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                        mininterval=1.0, initial=initial) if use_bar else None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if self.bar is None:
            interval = progress_seconds() if seconds is None else seconds
            self._ticker = threading.Thread(target=self._tick, args=(interval,), daemon=True,
                                            name=f"progress-{desc}")
            self._ticker.start()

    def advance(self, n: int = 1, tokens: int = 0) -> None:
        self.done += n
        self.tokens += tokens
        if self.bar is not None:
            if self.tokens:
                self.bar.set_postfix(tok_s=f"{self.rate():.0f}", refresh=False)
            self.bar.update(n)

    def rate(self) -> float:
        """Tokens per second since the start."""
        return self.tokens / max(time.time() - self.t0, 1e-9)

    def line(self) -> str:
        """The state in one line: done/total, tokens/s, elapsed and ETA (from the items' pace so far)."""
        elapsed = time.time() - self.t0
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        parts = [f"{self.desc}: {self.done}/{self.total} {self.unit}{share}"]
        if self.tokens or self.max_tokens is not None:
            parts.append(f"{self.rate():.0f} tok/s")
        parts.append(f"elapsed {clock(elapsed)}")
        if self.done >= self.total:
            parts.append("done")
        else:
            by_items = elapsed / (self.done - self.initial) * (self.total - self.done) if self.done > self.initial \
                else None
            bound = None
            if self.max_tokens is not None and self.tokens:  # the items left can decode at most their budget
                left = min(self.max_tokens - self.tokens, (self.total - self.done) * self.max_tokens / self.total)
                bound = left / self.rate()
            if by_items is None:
                parts.append("ETA ?" if bound is None else f"ETA <= {clock(bound)}")
            else:
                parts.append(f"ETA {clock(by_items if bound is None else min(by_items, bound))}")
        return ", ".join(parts)

    def _tick(self, interval: float) -> None:
        while not self._stop.wait(interval):
            print(self.line(), file=sys.stderr, flush=True)
            self.lines += 1

    def write(self, text: str) -> None:
        """A log line (to stdout) that does not break the bar."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._ticker is not None:
            self._stop.set()
            self._ticker.join()
            self._ticker = None
            if self.lines:  # a log that saw the job going also sees it end
                print(self.line(), file=sys.stderr, flush=True)
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
