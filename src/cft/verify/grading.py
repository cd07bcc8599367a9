"""Verdicts with a cache and counters, and the one symbolic worker of this process (module-level state)."""

from __future__ import annotations

import atexit
import threading
from collections import Counter, OrderedDict

from cft.verify import equivalence
from cft.verify.equivalence import GradeResult
from cft.verify.extract import extract_answer
from cft.verify.worker import DEFAULT_TIMEOUT, SymbolicWorker

CACHE_SIZE = 200_000

_settings = {"timeout": DEFAULT_TIMEOUT, "cache_size": CACHE_SIZE}
_lock = threading.Lock()
_cache: OrderedDict[tuple[str, str], GradeResult] = OrderedDict()
_stats: Counter = Counter()


def configure(timeout: float | None = None, cache_size: int | None = None) -> None:
    """Set the per-item symbolic timeout (seconds) and the verdict cache size; clears the cache."""
    with _lock:
        if timeout is not None:
            if timeout <= 0:
                raise ValueError("timeout must be positive")
            _settings["timeout"] = float(timeout)
        if cache_size is not None:
            _settings["cache_size"] = int(cache_size)
        _cache.clear()


def stats() -> dict[str, int]:
    """Counts since start: calls, cache_hits, verdicts per method, timeouts, errors, worker_starts."""
    with _lock:
        return dict(_stats)


def reset_stats() -> None:
    with _lock:
        _stats.clear()


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def _count_start() -> None:
    with _lock:
        _stats["worker_starts"] += 1


_worker = SymbolicWorker(on_start=_count_start)
atexit.register(_worker.close)


def _symbolic(prediction: str, pred: str, gold: str) -> GradeResult:
    outcome = _worker.compare(pred, gold, _settings["timeout"])
    return GradeResult(prediction, outcome.equal, "symbolic", outcome.timed_out, outcome.error)


def warm_up() -> None:
    """Start the symbolic worker in the background now, so the first hard case does not wait for it."""
    _worker.warm_up()


def shutdown() -> None:
    """Stop the symbolic worker (it also exits by itself when this process ends)."""
    _worker.close()


def worker_pid() -> int | None:
    """Process id of the symbolic worker, None before it starts (for tests that stall or kill it)."""
    return _worker.pid


def check(prediction: str | None, gold: str | None) -> GradeResult:
    """The full verdict for an already extracted prediction.

    Cached, timeouts and errors included: a pair that stalls the worker costs its timeout once per run.
    """
    if prediction is None or gold is None:
        return GradeResult(prediction, False, "none")
    prediction, gold = str(prediction), str(gold)
    key = (prediction, gold)
    with _lock:
        _stats["calls"] += 1
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            _stats["cache_hits"] += 1
            return hit
    try:
        result = equivalence.decide(prediction, gold, _symbolic)
    except Exception as exc:  # noqa: BLE001 - a crash marks this item only, never the run
        result = GradeResult(prediction, False, "none", error=f"{type(exc).__name__}: {exc}"[:300])
    with _lock:
        _stats[result.method] += 1
        _stats["timeouts"] += result.timed_out
        _stats["errors"] += result.error is not None
        if len(prediction) + len(gold) <= 20_000 and _settings["cache_size"] > 0:
            _cache[key] = result
            while len(_cache) > _settings["cache_size"]:
                _cache.popitem(last=False)
    return result


def is_equivalent(prediction: str | None, gold: str | None) -> bool:
    """Whether a prediction states the gold answer (see the module doc for the order of checks)."""
    return check(prediction, gold).correct


def grade_detailed(text: str, gold: str) -> GradeResult:
    """Extract then compare, keeping how the verdict was reached and any timeout or error.

    Never raises: whatever breaks while grading one item is reported in ``error`` for that item.
    """
    try:
        prediction = extract_answer(text)
    except Exception as exc:  # noqa: BLE001
        return GradeResult(None, False, "none", error=f"{type(exc).__name__}: {exc}"[:300])
    return check(prediction, gold)


def grade(text: str, gold: str) -> tuple[str | None, bool]:
    """Extract then compare: ``(prediction, correct)``."""
    result = grade_detailed(text, gold)
    return result.prediction, result.correct

