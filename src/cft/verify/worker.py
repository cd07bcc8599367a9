"""The math-verify comparison (step 4) in a separate process with a hard wall-clock timeout per item.

math-verify's own timeouts use ``SIGALRM``, which works only in a main thread, and sympy can get stuck
where no signal is handled (C code, broad ``except`` clauses). The worker arms its own alarm (soft
limit); if it does not answer within the limit plus a grace period it is killed and a new one is started
in the background. Nothing here knows about grading: ``compare`` answers ``(status, payload)``.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0  # seconds of symbolic comparison per item
TIMEOUT_GRACE = 1.0  # extra seconds before a worker that ignores its own alarm is killed
STARTUP_TIMEOUT = 180.0  # a fresh worker imports sympy and math-verify; slow on a loaded machine
WORKER_MEMORY_LIMIT = 4 << 30  # address-space cap of the worker, so a blow-up fails fast


@dataclass(frozen=True)
class Outcome:
    """One symbolic comparison: the verdict, or why there is none (a timeout or an error for this item only)."""

    equal: bool = False
    timed_out: bool = False
    error: str | None = None

class _SoftTimeout(BaseException):
    """Raised by the worker's own alarm; BaseException so math-verify's ``except Exception`` lets it through."""


def _parse(answer: str) -> list:
    """math-verify's parse, minus its habit of grading a stray number when the LaTeX does not parse.

    With both extractors on, a failed LaTeX parse lets the plain-expression extractor pick any number
    out of the text (``"d=3\\sqrt{5}, M=(...)"`` became 3). The plain extractor is used only when what
    it matched is the whole answer (``sqrt(2)/2``).
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from sympy import Basic, MatrixBase

    latex = parse(f"${answer}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
    if any(isinstance(x, Basic | MatrixBase) for x in latex):
        return latex
    expr = parse(answer, extraction_config=[ExprExtractionConfig()], parsing_timeout=None)
    if len(expr) == 2 and "".join(str(expr[1]).split()) == "".join(answer.split()):
        return expr
    return latex


def _symbolic_equal(pred: str, gold: str) -> bool:
    from math_verify import verify

    g, p = _parse(gold), _parse(pred)
    return bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=None))


def serve(fd: int, memory_limit: int) -> None:
    """Worker loop on socket ``fd``: answer ``(pred, gold, seconds)`` with ``(status, verdict)`` until EOF."""
    import signal
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    try:
        import resource

        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        if hard == resource.RLIM_INFINITY or hard > memory_limit:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, hard))
    except (ImportError, ValueError, OSError):
        pass
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    try:
        import math_verify  # noqa: F401 - imported once here, before the first item is timed
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which marks items as errors
        conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        return

    def on_alarm(signum, frame):
        raise _SoftTimeout

    signal.signal(signal.SIGALRM, on_alarm)
    conn.send(("ready", None))
    while True:
        try:
            pred, gold, seconds = conn.recv()
        except (EOFError, OSError):
            return
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            reply = ("ok", _symbolic_equal(pred, gold))
        except _SoftTimeout:
            reply = ("timeout", None)
        except BaseException as exc:  # noqa: BLE001 - RecursionError, MemoryError, ... mark only this item
            reply = ("error", f"{type(exc).__name__}: {str(exc)[:200]}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        conn.send(reply)


class SymbolicWorker:
    """One math-verify process, restarted after a hard timeout or a crash; calls are serialised.

    A plain subprocess (``python -c``), not multiprocessing: spawn and forkserver re-import the parent's
    ``__main__``, which re-runs any script that grades at top level without a ``__main__`` guard.
    """

    def __init__(self, on_start: Callable[[], None] = lambda: None):
        self._on_start = on_start  # told of every process start (the grading counters)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._conn = None
        self._owner = None  # pid that started the worker: a forked child must not share its socket
        self._ready = False
        self._failed_starts = 0
        self._fatal: str | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        code = (f"import sys; sys.path[:0] = {[p for p in sys.path if p]!r}; "
                f"from cft.verify.worker import serve; serve({theirs.fileno()}, {WORKER_MEMORY_LIMIT})")
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(),),
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          start_new_session=True)  # Ctrl-C is the parent's to handle
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._conn, self._owner, self._ready = Connection(ours.detach()), os.getpid(), False
        self._on_start()

    def _stop(self) -> None:
        if self._proc is not None and self._owner == os.getpid():
            self._proc.kill()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("verifier worker %d did not exit after SIGKILL", self._proc.pid)
            self._conn.close()
        self._proc = self._conn = None
        self._ready = False

    def _ensure_ready(self) -> None:
        if self._proc is not None and (self._owner != os.getpid() or self._proc.poll() is not None):
            self._stop()
        if self._proc is None:
            self._start()
        if not self._ready:
            try:
                if not self._conn.poll(STARTUP_TIMEOUT):
                    raise RuntimeError(f"no sign of life within {STARTUP_TIMEOUT:.0f}s")
                status, message = self._conn.recv()
            except (EOFError, OSError, RuntimeError) as exc:
                status, message = "died", f"{type(exc).__name__}: {exc} (its traceback, if any, is on stderr)"
            if status != "ready":
                self._stop()
                self._failed_starts += 1
                if status == "fatal" or self._failed_starts >= 3:  # do not pay a failed start per item
                    self._fatal = f"verifier worker cannot start: {message}"
                raise RuntimeError(f"verifier worker failed to start: {message}")
            self._ready, self._failed_starts = True, 0

    def compare(self, pred: str, gold: str, timeout: float) -> Outcome:
        """math-verify's verdict on two answers, within ``timeout`` seconds (plus a grace period)."""
        with self._lock:
            if self._fatal:
                return Outcome(error=self._fatal)
            try:
                self._ensure_ready()
                self._conn.send((pred, gold, timeout))
                if not self._conn.poll(timeout + TIMEOUT_GRACE):
                    log.warning("verifier: no answer within %.1fs, worker killed (pred=%.80r, gold=%.80r)",
                                timeout + TIMEOUT_GRACE, pred, gold)
                    self._restart()
                    return Outcome(timed_out=True)
                status, verdict = self._conn.recv()
            except Exception as exc:  # noqa: BLE001 - a verdict must come back whatever broke
                log.warning("verifier worker failed on pred=%.80r gold=%.80r: %r", pred, gold, exc)
                self._restart()
                return Outcome(error=f"{type(exc).__name__}: {exc}"[:300])
        if status == "ok":
            return Outcome(equal=bool(verdict))
        if status == "timeout":
            return Outcome(timed_out=True)
        return Outcome(error=verdict)

    def _restart(self) -> None:
        """Kill the worker and start the next one now, so its imports overlap the caller's work."""
        self._stop()
        if not self._fatal:
            try:
                self._start()
            except Exception as exc:  # noqa: BLE001 - the next item retries the start and reports it
                log.warning("verifier worker could not be restarted: %s", exc)

    def warm_up(self) -> None:
        with self._lock:
            if self._proc is None and not self._fatal:
                self._start()

    def close(self) -> None:
        with self._lock:
            self._stop()

