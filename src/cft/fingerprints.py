"""Fingerprints of a model, computed without loading it; every artifact's metadata records them.

- **tokenizer**: the vocabulary (token -> id, added tokens included), the added tokens with their
  ``special`` flag and the bos/eos/unk strings; read from ``tokenizer.json`` and ``tokenizer_config.json``
  when the folder has them (fast, no transformers import), else from the loaded tokenizer;
- **weights**: a hash of the weight files (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.gguf``), each hashed
  once per process for an unchanged file (path, size and mtime are the cache key); files over 256 MiB are
  hashed from 64 evenly spaced 1 MiB blocks and their size (fine-tuning every layer changes them; an
  update of a few layers inside a big file can go unseen).

Below ``cft.artifacts`` (whose ``write_meta`` adds them, ``with_fingerprints``); the checks that compare them
are ``cft.provenance``'s.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"}
FULL_HASH_LIMIT = 256 << 20
BLOCK = 1 << 20
BLOCKS = 64


def file_hash(path: str | os.PathLike) -> str:
    """Content hash of one file, computed once per process while its size and mtime do not change."""
    st = os.stat(path)
    return _file_hash(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: fh.read(BLOCK * 8), b""):
                h.update(chunk)
        else:  # a big shard: evenly spaced blocks (training that updates every layer changes them)
            for i in range(BLOCKS):
                fh.seek((size - BLOCK) * i // (BLOCKS - 1))
                h.update(fh.read(BLOCK))
    return h.hexdigest()


def _short(h: Any) -> str:
    return h.hexdigest()[:16]


def model_files(name: str) -> tuple[Path | None, Path | None]:
    """(folder, gguf file) of a model name without loading it; a hub id's folder is its cached snapshot.

    Raises FileNotFoundError (from ``cft.models.resolve``) for a missing path or testbed weights.
    """
    from cft.models import resolve

    spec = resolve(name)
    if spec.gguf_file is not None:
        return None, Path(spec.path) / spec.gguf_file
    folder = Path(spec.path)
    if folder.is_dir():
        return folder, None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(spec.path, "config.json")
    return (Path(cached).parent, None) if isinstance(cached, str) else (None, None)


def weight_files_fingerprint(name: str) -> str | None:
    """Short hash of the model's weight files; None when they are not on this machine (uncached hub id)."""
    folder, gguf = model_files(name)
    if gguf is not None:
        files = [gguf]
    elif folder is not None:
        files = sorted(p for p in folder.iterdir()
                       if p.suffix in WEIGHT_SUFFIXES and p.name not in NOT_WEIGHTS and p.is_file())
    else:
        return None
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{file_hash(f)}\n".encode())
    return _short(h)


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _canonical_tokenizer(vocab: dict[str, int], added: list[tuple[int, str, bool]],
                         special: dict[str, str | None]) -> str:
    blob = json.dumps([sorted(vocab.items(), key=lambda kv: kv[1]), sorted(added), sorted(special.items())],
                      ensure_ascii=False, separators=(",", ":"))
    return _short(hashlib.sha256(blob.encode()))


SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token")


def _tokenizer_from_files(folder: Path) -> str:
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    vocab = data.get("model", {}).get("vocab")
    if not isinstance(vocab, dict):  # e.g. Unigram stores a list of (piece, score): ids are positions
        vocab = {piece[0]: i for i, piece in enumerate(vocab or [])}
    added = [(a["id"], a["content"], bool(a.get("special"))) for a in data.get("added_tokens", [])]
    vocab = {**vocab, **{content: i for i, content, _ in added}}
    return _canonical_tokenizer(vocab, added, {k: _token_text(config.get(k)) for k in SPECIAL_KEYS})


def _tokenizer_from_object(tok) -> str:
    added = [(i, t.content, bool(t.special)) for i, t in tok.added_tokens_decoder.items()]
    return _canonical_tokenizer(tok.get_vocab(), added, {k: getattr(tok, k, None) for k in SPECIAL_KEYS})


def tokenizer_fingerprint(name: str) -> str | None:
    """Short hash of the vocabulary, the added and special tokens; None when the tokenizer is not here."""
    from cft.models import converted, resolve

    spec = converted(resolve(name), create=False)  # a GGUF already converted reads as its folder
    folder = Path(spec.path) if spec.gguf_file is None else None
    if folder is not None and not folder.is_dir():
        folder = model_files(name)[0]
        if folder is None:
            return None
    key = folder / "tokenizer.json" if folder is not None else Path(spec.path) / str(spec.gguf_file)
    if not key.is_file():
        key = folder  # a slow tokenizer (vocab.json, ...): loaded through transformers
    return _tokenizer_fingerprint(name, str(key), key.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _tokenizer_fingerprint(name: str, key: str, mtime_ns: int) -> str:
    if key.endswith("tokenizer.json"):
        return _tokenizer_from_files(Path(key).parent)
    from cft.models import load_tokenizer

    return _tokenizer_from_object(load_tokenizer(name))


@dataclass(frozen=True)
class Fingerprint:
    model: str
    tokenizer: str | None
    weights: str | None

    def as_dict(self) -> dict[str, str | None]:
        return {"model": self.model, "tokenizer": self.tokenizer, "weights": self.weights}


def fingerprint(name: str) -> Fingerprint:
    return Fingerprint(name, tokenizer_fingerprint(name), weight_files_fingerprint(name))


def with_fingerprints(meta: dict) -> dict:
    """``meta`` plus ``provenance`` (the fingerprints of its ``config.model``), for every artifact written.

    Called by ``cft.artifacts.write_meta``; never fails a finished stage: a model that cannot be
    fingerprinted here (gone, or a name given to an in-process caller's model) is recorded by name only.
    """
    model = (meta.get("config") or {}).get("model") if isinstance(meta.get("config"), dict) else None
    if not isinstance(model, str) or isinstance(meta.get("provenance"), dict):
        return meta
    try:
        prov = fingerprint(model).as_dict()
    except (OSError, ValueError):
        prov = Fingerprint(model, None, None).as_dict()
    return {**meta, "provenance": prov}
