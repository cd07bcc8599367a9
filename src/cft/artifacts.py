"""On-disk artifacts: versioned JSONL records, a metadata sidecar, resumable incremental writing.

Every artifact is a JSON Lines file that ``datasets.load_dataset("json", data_files=...)`` loads.
Each record carries ``schema`` (e.g. ``"cft.labels/1"``) and a ``key``: a hash of everything that
determines the record, so a rerun can skip finished work. Beside ``X.jsonl`` lives ``X.meta.json``
with the resolved config, the environment (library versions, device, dtype, seed) and counts.

While a stage runs it appends to ``X.jsonl.partial`` (fsynced per batch, or every ``CFT_FLUSH_EVERY``
records, default 16, or 5 s for records added one at a time); at the end the records are written in
input order to a temporary file that is atomically renamed to ``X.jsonl``. A killed run leaves the
partial file; the next run reads it back (dropping a torn last line) and skips the keys it holds, so
the final artifact equals an uninterrupted run's.

Inputs are validated line by line before any model loads (``read_valid``). Under ``skipping_invalid()``
(the CLI's ``--skip-invalid``) a bad line is reported and skipped instead of stopping the run, and
``invalid_count`` tells a stage how many were skipped so it can record that in its summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

SCHEMAS = {
    "generations": "cft.generations/1",
    "labels": "cft.labels/1",
    "samples": "cft.samples/1",
}


class InputError(ValueError):
    """Bad input a person can fix; the CLI prints it without a traceback and exits with code 2."""

    def __init__(self, path: str | os.PathLike, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field = str(path), line, field
        where = self.path + (f", line {line}" if line is not None else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")


class InvalidLines:
    """The lines skipped under ``--skip-invalid``: each error, reported through ``report`` as it happens."""

    def __init__(self, report: Callable[[InputError], None] | None = None):
        self.errors: list[InputError] = []
        self.report = report

    def add(self, error: InputError) -> None:
        self.errors.append(error)
        if self.report is not None:
            self.report(error)

    def count(self, path: str | os.PathLike | None = None) -> int:
        return sum(path is None or e.path == str(path) for e in self.errors)


_invalid: ContextVar[InvalidLines | None] = ContextVar("cft_invalid_lines", default=None)


@contextmanager
def skipping_invalid(enabled: bool = True, report: Callable[[InputError], None] | None = None):
    """Within this block, readers skip bad input lines (collected in the yielded InvalidLines) instead of raising."""
    lines = InvalidLines(report) if enabled else None
    token = _invalid.set(lines)
    try:
        yield lines
    finally:
        _invalid.reset(token)


def invalid_count(path: str | os.PathLike) -> int:
    """How many lines of ``path`` were skipped as invalid in the current ``skipping_invalid`` block."""
    lines = _invalid.get()
    return lines.count(path) if lines is not None else 0


def _reject(error: InputError) -> None:
    """Raise ``error``, or record it when skipping invalid lines."""
    lines = _invalid.get()
    if lines is None:
        raise error
    lines.add(error)


def record_key(*parts: Any) -> str:
    """A stable hash of the JSON form of everything that determines a record."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def environment(model: Any = None) -> dict[str, Any]:
    """Versions and device facts recorded next to every output."""
    import importlib.metadata as md

    import cft

    versions = {}
    for pkg in ("cft", "torch", "transformers", "trl", "peft", "accelerate", "math-verify", "tokenizers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    versions["cft"] = versions["cft"] or cft.__version__  # run from a source tree (PYTHONPATH=src)
    env: dict[str, Any] = {"versions": versions, "python": platform.python_version(), "platform": platform.platform()}
    if model is not None:
        param = next(model.parameters())
        env["device"] = str(param.device)
        env["dtype"] = str(param.dtype).replace("torch.", "")
    return env


def read_jsonl(path: str | os.PathLike, schema: str | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)``; malformed lines raise InputError naming file and line (or are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, None, None, "file not found" if not path.exists() else "not a file")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                rec = _parse_line(path, lineno, raw, schema)
            except InputError as exc:
                _reject(exc)
                continue
            if rec is not None:
                yield lineno, rec


def _parse_line(path: Path, lineno: int, raw: bytes, schema: str | None) -> dict | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(path, lineno, None, f"invalid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        return None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(path, lineno, None, f"malformed JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(rec, dict):
        raise InputError(path, lineno, None, f"expected a JSON object, got {type(rec).__name__}")
    if schema is not None and rec.get("schema") != schema:
        raise InputError(
            path, lineno, "schema",
            f"expected schema {schema!r}, found {rec.get('schema')!r}; this file was written by another "
            "stage or an incompatible version of cft",
        )
    return rec


def read_valid(path: str | os.PathLike, parse: Callable[[int, dict], T], schema: str | None = None) -> list[T]:
    """``parse(line_number, record)`` of every line; its InputError stops the read or, when skipping, the line.

    An input with no valid record is an error: a stage run on it would silently produce nothing.
    """
    out = []
    for lineno, rec in read_jsonl(path, schema):
        try:
            out.append(parse(lineno, rec))
        except InputError as exc:
            _reject(exc)
    if not out:
        skipped = invalid_count(path)
        raise InputError(path, None, None, f"no valid records ({skipped} invalid lines skipped)" if skipped
                         else "no records")
    return out


def load_records(path: str | os.PathLike, kind: str) -> list[dict]:
    return [rec for _, rec in read_jsonl(path, SCHEMAS[kind])]


def _dump(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n"


def write_meta(out: str | os.PathLike, meta: dict) -> Path:
    from cft.provenance import with_fingerprints  # every artifact records which model made it

    meta = with_fingerprints(meta)
    path = Path(str(out) + ".meta.json") if not str(out).endswith(".json") else Path(out)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_meta(out: str | os.PathLike) -> dict:
    path = Path(str(out) + ".meta.json")
    return json.loads(path.read_text()) if path.exists() else {}


def flush_every() -> int:
    """Records buffered by ``ResumableWriter.add`` before a flush: ``$CFT_FLUSH_EVERY``, default 16.

    Each flush is an fsync; 1 makes every finished record durable at once (what a kill test needs).
    """
    value = os.environ.get("CFT_FLUSH_EVERY", "16")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"CFT_FLUSH_EVERY must be a positive integer, not {value!r}")
    return int(value)


class ResumableWriter:
    """Append records as they finish; ``finalize`` writes them in input order, atomically.

    ``done`` holds the records recovered from an interrupted earlier run of the same output.
    ``write`` makes a batch durable at once; ``add`` buffers single records and flushes every
    ``flush_every()`` records or ``flush_seconds``, so a fast stream does not fsync per record.
    """

    def __init__(self, out: str | os.PathLike, kind: str, flush_seconds: float = 5.0):
        self.out = Path(out)
        self.schema = SCHEMAS[kind]
        self.partial = Path(str(self.out) + ".partial")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.flush_every, self.flush_seconds = flush_every(), flush_seconds
        self._pending: list[dict] = []
        self._last_flush = time.time()
        self.done: dict[str, dict] = {}
        if self.partial.exists():
            self.done = self._recover()
        self._fh = open(self.partial, "a", encoding="utf-8")  # noqa: SIM115 - open until finalize

    def _recover(self) -> dict[str, dict]:
        done: dict[str, dict] = {}
        good_bytes = 0
        with open(self.partial, "rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw.decode("utf-8"))
                    if not raw.endswith(b"\n") or rec.get("schema") != self.schema:
                        break
                except (UnicodeDecodeError, json.JSONDecodeError):
                    break  # a torn last line from a kill mid-write
                done[rec["key"]] = rec
                good_bytes += len(raw)
        with open(self.partial, "r+b") as fh:
            fh.truncate(good_bytes)
        return done

    def write(self, records: Iterable[dict]) -> None:
        """Append records (and any buffered ones) and make them durable now."""
        for rec in [*self._pending, *records]:
            rec.setdefault("schema", self.schema)
            self.done[rec["key"]] = rec
            self._fh.write(_dump(rec))
        self._pending.clear()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._last_flush = time.time()

    def add(self, record: dict) -> None:
        """Buffer one finished record; flush when enough are buffered or enough time has passed."""
        self._pending.append(record)
        if len(self._pending) >= self.flush_every or time.time() - self._last_flush > self.flush_seconds:
            self.write([])

    def finalize(self, order: list[str], meta: dict) -> Path:
        """Write the records of ``order`` (keys), in that order, to the final path."""
        if self._pending:
            self.write([])
        self._fh.close()
        missing = [k for k in order if k not in self.done]
        if missing:
            raise RuntimeError(f"{len(missing)} records missing when finalizing {self.out}")
        tmp = self.out.with_suffix(self.out.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for k in order:
                fh.write(_dump(self.done[k]))
        os.replace(tmp, self.out)
        write_meta(self.out, meta)
        self.partial.unlink(missing_ok=True)
        return self.out
