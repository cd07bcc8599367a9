"""On-disk artifacts: versioned JSONL records, a metadata sidecar, resumable incremental writing.

Every artifact is a JSON Lines file that ``datasets.load_dataset("json", data_files=...)`` loads.
Each record carries ``schema`` (e.g. ``"cft.labels/1"``) and a ``key``: a hash of everything that
determines the record, so a rerun can skip finished work. Beside ``X.jsonl`` lives ``X.meta.json``
with the resolved config, the environment (library versions, device, dtype, seed) and counts.

While a stage runs it appends to ``X.jsonl.partial`` (flushed and fsynced per batch); at the end the
records are written in input order to a temporary file that is atomically renamed to ``X.jsonl``.
A killed run leaves the partial file; the next run reads it back (dropping a torn last line) and
skips the keys it holds, so the final artifact equals an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

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
    env: dict[str, Any] = {"versions": versions, "python": platform.python_version(), "platform": platform.platform()}
    if model is not None:
        param = next(model.parameters())
        env["device"] = str(param.device)
        env["dtype"] = str(param.dtype).replace("torch.", "")
    return env


def read_jsonl(path: str | os.PathLike, schema: str | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)``; malformed lines raise InputError naming file and line."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, None, None, "file not found")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(path, lineno, None, f"invalid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(path, lineno, None, f"malformed JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(rec, dict):
                raise InputError(path, lineno, None, f"expected a JSON object, got {type(rec).__name__}")
            if schema is not None:
                got = rec.get("schema")
                if got != schema:
                    raise InputError(
                        path, lineno, "schema",
                        f"expected schema {schema!r}, found {got!r}; this file was written by another "
                        "stage or an incompatible version of cft",
                    )
            yield lineno, rec


def load_records(path: str | os.PathLike, kind: str) -> list[dict]:
    return [rec for _, rec in read_jsonl(path, SCHEMAS[kind])]


def _dump(rec: dict) -> str:
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n"


def write_meta(out: str | os.PathLike, meta: dict) -> Path:
    path = Path(str(out) + ".meta.json") if not str(out).endswith(".json") else Path(out)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_meta(out: str | os.PathLike) -> dict:
    path = Path(str(out) + ".meta.json")
    return json.loads(path.read_text()) if path.exists() else {}


class ResumableWriter:
    """Append records as they finish; ``finalize`` writes them in input order, atomically.

    ``done`` holds the records recovered from an interrupted earlier run of the same output.
    """

    def __init__(self, out: str | os.PathLike, kind: str):
        self.out = Path(out)
        self.schema = SCHEMAS[kind]
        self.partial = Path(str(self.out) + ".partial")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.done: dict[str, dict] = {}
        if self.partial.exists():
            self.done = self._recover()
        self._fh = open(self.partial, "a", encoding="utf-8")

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
        for rec in records:
            rec.setdefault("schema", self.schema)
            self.done[rec["key"]] = rec
            self._fh.write(_dump(rec))
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def finalize(self, order: list[str], meta: dict) -> Path:
        """Write the records of ``order`` (keys), in that order, to the final path."""
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
