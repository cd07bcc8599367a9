"""On-disk artifacts: versioned JSONL records, a metadata sidecar, resumable incremental writing.

Every artifact is a JSON Lines file that ``datasets.load_dataset("json", data_files=...)`` loads.
Each record carries ``schema`` (e.g. ``"cft.labels/2"``) and a ``key``: a hash of everything that
determines the record, so a rerun can skip finished work. Beside ``X.jsonl`` lives ``X.meta.json``
with the resolved config, the environment (library versions, device, dtype, seed) and counts.

While a stage runs it appends to ``X.jsonl.partial`` (fsynced per batch, or every ``CFT_FLUSH_EVERY``
records, default 16, or 5 s for records added one at a time); at the end the records are written in
input order to a temporary file that is atomically renamed to ``X.jsonl``. A killed run leaves the
partial file; the next run reads it back (dropping a torn last line) and skips the keys it holds, so
the final artifact equals an uninterrupted run's.

Each artifact being written holds a lock, ``X.jsonl.lock`` (an ``flock`` plus the holder's pid): a second
run writing the same output refuses at once (``ArtifactLockedError``, naming the holder's pid); the lock
of a killed run is released by the kernel and the next run takes it over. A write that fails because the
disk is full raises ``DiskFullError`` after cutting the ``.partial`` back to its last complete record, so
the same command resumes once space is freed.

Inputs are validated line by line before any model loads (``read_valid``). Under ``skipping_invalid()``
(the CLI's ``--skip-invalid``) a bad line is reported and skipped instead of stopping the run, and
``invalid_count`` tells a stage how many were skipped so it can record that in its summary.
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from cft import __version__
from cft.errors import UserError
from cft.fingerprints import with_fingerprints

T = TypeVar("T")

SCHEMAS = {
    "generations": "cft.generations/1",
    "labels": "cft.labels/2",
    "samples": "cft.samples/1",
}
# Older versions a reader still accepts: cft.labels/1 lacks the per-position fields of /2 (label_source,
# probe_prob, predict_role), which no reader needs; every label in it is exact.
READABLE = {"cft.labels/2": ("cft.labels/1",)}


class InputError(UserError, ValueError):
    """Bad input a person can fix (naming file, line and field); the CLI prints it as one line, exit code 2."""

    def __init__(self, path: str | os.PathLike, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field = str(path), line, field
        where = self.path + (f", line {line}" if line is not None else "") + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")


class ArtifactLockedError(InputError):
    """Another live run is writing the same artifact (two runs with one ``--out``)."""


class DiskFullError(InputError):
    """The disk filled up while writing an artifact; the ``.partial`` keeps every complete record."""

    def __init__(self, path: str | os.PathLike, kept: int):
        self.kept = kept
        super().__init__(path, None, None, f"no space left on device; {kept} finished records are kept in "
                                           f"{Path(str(path))}.partial - free some space and rerun the same command "
                                           "to resume")


_FULL = (errno.ENOSPC, errno.EDQUOT)


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

    versions = {}
    for pkg in ("cft", "torch", "transformers", "trl", "peft", "accelerate", "math-verify", "tokenizers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    versions["cft"] = versions["cft"] or __version__  # run from a source tree (PYTHONPATH=src)
    env: dict[str, Any] = {"versions": versions, "python": platform.python_version(), "platform": platform.platform()}
    if model is not None:  # a stage that ran a model: the machine its timings are of, and the model's device
        from cft.models import machine

        env["machine"] = machine()
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
    if schema is not None and rec.get("schema") != schema and rec.get("schema") not in READABLE.get(schema, ()):
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
    meta = with_fingerprints(meta)  # every artifact records which model made it
    path = Path(str(out) + ".meta.json") if not str(out).endswith(".json") else Path(out)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_meta(out: str | os.PathLike) -> dict:
    path = Path(str(out) + ".meta.json")
    return json.loads(path.read_text()) if path.exists() else {}


def flush_every() -> int:
    """Records appended by ``ResumableWriter.add`` between two fsyncs: ``$CFT_FLUSH_EVERY``, default 16.

    Every record reaches the file (the kernel's page cache) at once, so a killed process loses none; the
    fsync, against a power cut or an OS crash, is what is batched. 1 syncs every record.
    """
    value = os.environ.get("CFT_FLUSH_EVERY", "16")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"CFT_FLUSH_EVERY must be a positive integer, not {value!r}")
    return int(value)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


_held: dict[str, ArtifactLock] = {}  # the locks this process holds, by lock path


class ArtifactLock:
    """An exclusive lock on one artifact: ``flock`` on ``X.lock``, which also records the holder's pid and host.

    The kernel drops an ``flock`` when its process dies, even by SIGKILL, so a killed run's lock is taken
    over by the next run (``took_over`` then names the dead pid). A lock this process already holds (an
    earlier writer of the same output that raised before finishing) passes to the new writer.
    """

    def __init__(self, target: str | os.PathLike):
        import fcntl

        self.target = Path(target)
        self.path = Path(str(target) + ".lock")
        self.took_over: int | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in _held:  # same process: the earlier writer is abandoned
            self._fd = _held.pop(key)._release_fd()
        else:
            self._fd = self._acquire(fcntl)
        self._key = key
        _held[key] = self
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(info).encode(), 0)

    def _acquire(self, fcntl) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                who = f"pid {holder.get('pid', '?')}" + (f" on {holder['host']}" if holder.get("host") else "")
                since = f" since {holder['since']}" if holder.get("since") else ""
                raise ArtifactLockedError(self.target, None, None,
                                          f"another cft run ({who}{since}) is writing this file; wait for it to "
                                          "finish or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its last holder unlinked between our open and our flock
                pid = self._holder(fd).get("pid")
                if isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
                    self.took_over = pid
                return fd
            os.close(fd)

    @staticmethod
    def _holder(fd: int) -> dict:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {}
        return info if isinstance(info, dict) else {}

    def _release_fd(self) -> int:
        fd, self._fd = self._fd, None
        return fd

    def release(self) -> None:
        """Unlink the lock file, then drop the lock (in that order, so no one locks a file about to vanish)."""
        if self._fd is None:
            return
        if _held.get(self._key) is self:
            del _held[self._key]
        self.path.unlink(missing_ok=True)
        os.close(self._release_fd())


@atexit.register
def _release_all() -> None:
    """A run that ends with an error leaves no lock file behind (the kernel drops the flock anyway)."""
    for lock in list(_held.values()):
        lock.release()

_raw_write = os.write  # the one call that puts artifact bytes on disk (tests inject ENOSPC here)


def _write_fully(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[_raw_write(fd, view):]


class ResumableWriter:
    """Append records as they finish; ``finalize`` writes them in input order, atomically.

    ``done`` holds the records of an earlier run of the same output: those of its finished file (a rerun after
    the inputs grew, or a pipeline resumed past this stage) and those recovered from an interrupted run's partial
    file. Keys hash everything that determines a record, so a record found under its key is reused as it is.
    ``write`` appends a batch and syncs it to disk at once; ``add`` appends one record at once (a SIGKILL
    loses no finished record) and syncs every ``flush_every()`` records or ``flush_seconds``, so a fast
    stream does not fsync per record.
    The writer holds the output's ``ArtifactLock`` from construction until ``finalize`` or ``close``.

    A job resumed in several sittings keeps the cost of each: every sync rewrites ``<out>.partial.sittings`` (the
    earlier sittings and this one: start, seconds, records written), and ``finalize`` records the list in the
    metadata (``meta["sittings"]``, after the finished file's own when it is extended), so a stage's seconds are
    not only those of the sitting that happened to finish it.
    """

    def __init__(self, out: str | os.PathLike, kind: str, flush_seconds: float = 5.0):
        self.out = Path(out)
        self.schema = SCHEMAS[kind]
        self.partial = Path(str(self.out) + ".partial")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.flush_every, self.flush_seconds = flush_every(), flush_seconds
        self.lock = ArtifactLock(self.out)  # before reading the partial: another live run may be appending to it
        if self.lock.took_over is not None:
            print(f"note: took over the lock of a run that is gone (pid {self.lock.took_over}) on {self.out}",
                  file=sys.stderr, flush=True)
        self._unsynced = 0  # records appended since the last fsync
        self._last_flush = time.time()
        self.done: dict[str, dict] = self._finished() if self.out.exists() else {}
        if self.partial.exists():
            self.done.update(self._recover())
        self._durable: set[str] = set(self.done)  # keys whose line is complete on disk (final or partial file)
        self.sittings_file = Path(str(self.partial) + ".sittings")
        earlier = read_meta(self.out).get("sittings", []) if self.out.exists() else []
        if self.partial.exists() and self.sittings_file.exists():
            earlier += json.loads(self.sittings_file.read_text()).get("sittings", [])
        self.earlier: list[dict] = earlier
        self.sitting = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": 0.0, "records": 0}
        self._t0 = time.time()
        self._fd: int | None = os.open(self.partial, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._size = os.fstat(self._fd).st_size

    def _finished(self) -> dict[str, dict]:
        """The records of the finished output file written by an earlier run (those of this schema)."""
        done: dict[str, dict] = {}
        with open(self.out, "rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    continue
                if isinstance(rec, dict) and rec.get("schema") == self.schema and "key" in rec:
                    done[rec["key"]] = rec
        return done

    def _recover(self) -> dict[str, dict]:
        """The complete records of the partial file; a torn last line (a kill mid-write) is cut off. Complete lines
        of another schema (a partial left by another version of cft) are never cut silently: the file is first
        kept beside it as ``<partial>.stale-<time>``, named on stderr."""
        done: dict[str, dict] = {}
        good_bytes, stale = 0, None
        with open(self.partial, "rb") as fh:
            for raw in fh:
                try:
                    rec = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    break  # a torn last line from a kill mid-write
                if not raw.endswith(b"\n"):
                    break
                if not isinstance(rec, dict) or rec.get("schema") != self.schema or "key" not in rec:
                    stale = str(rec.get("schema") if isinstance(rec, dict) else type(rec).__name__)
                    break
                done[rec["key"]] = rec
                good_bytes += len(raw)
        if stale is not None:
            kept = self.partial.with_name(f"{self.partial.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            shutil.copyfile(self.partial, kept)
            print(f"note: {self.partial} holds records of schema {stale!r}, not {self.schema!r} (another version of "
                  f"cft); {len(done)} records before them are resumed, the file is kept as {kept}",
                  file=sys.stderr, flush=True)
        with open(self.partial, "r+b") as fh:
            fh.truncate(good_bytes)
        return done

    def write(self, records: Iterable[dict]) -> None:
        """Append records and make them (and every record ``add`` appended) durable now.

        On a full disk the partial file is cut back to its last complete record, the writer closes,
        and ``DiskFullError`` is raised: a rerun resumes from the records that were durable.
        """
        self._append(list(records), sync=True)

    def _append(self, batch: list[dict], sync: bool) -> None:
        for rec in batch:
            rec.setdefault("schema", self.schema)
            self.done[rec["key"]] = rec
        data = "".join(_dump(rec) for rec in batch).encode("utf-8")
        try:
            _write_fully(self._fd, data)
            if sync:
                os.fsync(self._fd)
        except OSError as exc:
            if exc.errno not in _FULL:
                raise
            self._disk_full()
        self._size += len(data)
        self._durable.update(rec["key"] for rec in batch)
        self._unsynced = 0 if sync else self._unsynced + len(batch)
        self.sitting["records"] += len(batch)
        if sync:
            self._last_flush = time.time()
            self._save_sittings()

    def sittings(self) -> list[dict]:
        """The earlier sittings of this output and this one so far."""
        self.sitting["seconds"] = round(time.time() - self._t0, 3)
        return [*self.earlier, dict(self.sitting)]

    def _save_sittings(self) -> None:
        tmp = self.sittings_file.with_name(self.sittings_file.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"sittings": self.sittings()}) + "\n")
            os.replace(tmp, self.sittings_file)
        except OSError:  # a full disk: the records matter, their timing does not
            tmp.unlink(missing_ok=True)

    def _disk_full(self):
        """Drop the torn tail and the records that never reached the disk, release everything, and raise."""
        os.ftruncate(self._fd, self._size)
        self.done = {k: v for k, v in self.done.items() if k in self._durable}
        kept = len(self.done)
        self.close()
        raise DiskFullError(self.out, kept) from None

    def add(self, record: dict) -> None:
        """Append one finished record now; fsync once enough are unsynced or enough time has passed."""
        self._append([record], sync=self._unsynced + 1 >= self.flush_every
                     or time.time() - self._last_flush > self.flush_seconds)

    def close(self) -> None:
        """Close the partial file and release the lock, without finalizing (the partial stays for a rerun)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._save_sittings()
        self.lock.release()

    def finalize(self, order: list[str], meta: dict) -> Path:
        """Write the records of ``order`` (keys), in that order, to the final path."""
        if self._unsynced:
            self.write([])
        missing = [k for k in order if k not in self.done]
        if missing:
            self.close()
            raise RuntimeError(f"{len(missing)} records missing when finalizing {self.out}")
        tmp = self.out.with_suffix(self.out.suffix + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                _write_fully(fh.fileno(), "".join(_dump(self.done[k]) for k in order).encode("utf-8"))
                os.fsync(fh.fileno())
            os.replace(tmp, self.out)
            write_meta(self.out, {**meta, "sittings": self.sittings()})
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno not in _FULL:
                self.close()
                raise
            kept = len(self.done)
            self.close()
            raise DiskFullError(self.out, kept) from None
        os.close(self._fd)
        self._fd = None
        self.partial.unlink(missing_ok=True)
        self.sittings_file.unlink(missing_ok=True)
        self.lock.release()
        return self.out
