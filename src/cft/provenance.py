"""Which model made an artifact, and whether the model of the next stage may read it.

Labels are a function of the model's weights, and token ids mean something only under the tokenizer
that made them, so a stage that reads another stage's artifact checks the artifact's model against its
``--model`` before any model work (``check``, called by the CLI):

- ``identify`` needs the weights of stage A;
- ``train`` and ``eval --rescore`` (and ``view --model``) need the same tokenizer; ``train`` on labels of
  another model with the same tokenizer is legitimate and says so; another tokenizer points to
  ``cft transfer``;
- ``transfer`` needs a different tokenizer (the same one has nothing to transfer).

A mismatch raises ``ProvenanceError`` (one line; the CLI exits with code 2) unless
``--allow-model-mismatch`` is given; the override is then recorded in the output's metadata
(``stamp``). Every artifact's metadata gets a ``provenance`` entry: the model name and two short
fingerprints, computed without loading the model (``with_fingerprints``, called by ``write_meta``):

- **tokenizer**: the vocabulary (token -> id, added tokens included), the added tokens with their
  ``special`` flag and the bos/eos/unk strings; read from ``tokenizer.json`` and ``tokenizer_config.json``
  when the folder has them (fast, no transformers import), else from the loaded tokenizer;
- **weights**: a hash of the weight files (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.gguf``), each hashed
  once per process for an unchanged file (path, size and mtime are the cache key); files over 256 MiB are
  hashed from 64 evenly spaced 1 MiB blocks and their size (fine-tuning every layer changes them; an
  update of a few layers inside a big file can go unseen).

An artifact written before fingerprints existed records only its model name (``config.model``); its
fingerprints are then computed from that name's files. An artifact without metadata is accepted with a
warning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cft.artifacts import read_meta

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth"}
FULL_HASH_LIMIT = 256 << 20
BLOCK = 1 << 20
BLOCKS = 64
ALLOW_FLAG = "--allow-model-mismatch"


class ProvenanceError(ValueError):
    """An artifact made with another model than the one given; the CLI prints it as one line, exit 2."""


# ---------------------------------------------------------------- fingerprints


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


def weights_fingerprint(name: str) -> str | None:
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
    from cft.models import _converted, resolve

    spec = _converted(resolve(name), create=False)  # a GGUF already converted reads as its folder
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
    return Fingerprint(name, tokenizer_fingerprint(name), weights_fingerprint(name))


# ---------------------------------------------------------------- checks


NEEDS = {
    "weights": "labels are a function of the model's weights, so identify needs the model of stage A",
    "tokenizer": "its token ids mean something only under the tokenizer that made them",
    "other-tokenizer": "transfer carries labels onto a different tokenizer",
}


@dataclass(frozen=True)
class Check:
    """What a command requires of the artifact named by one of its arguments."""

    argument: str  # the argparse dest holding the artifact path
    need: str  # a key of NEEDS
    meta_of: str = ""  # a file inside a folder argument whose metadata counts (eval --rescore DIR)
    explicit_model: bool = False  # check only when --model was given (its default means "any")


CHECKS: dict[str, Check] = {
    "identify": Check("input", "weights"),
    "train": Check("input", "tokenizer"),
    "transfer": Check("input", "other-tokenizer"),
    "eval": Check("rescore", "tokenizer", meta_of="samples.jsonl", explicit_model=True),
    "view": Check("labels", "tokenizer", explicit_model=True),
}


def recorded_model(meta: dict) -> tuple[str | None, dict | None]:
    """(model name, recorded fingerprints or None) of an artifact's metadata."""
    prov = meta.get("provenance")
    if isinstance(prov, dict) and prov.get("model"):
        return prov["model"], prov
    model = (meta.get("config") or {}).get("model")
    return (model if isinstance(model, str) else None), None


def _recorded(name: str, prov: dict | None, key: str) -> str | None:
    if prov is not None and prov.get(key):
        return prov[key]
    return tokenizer_fingerprint(name) if key == "tokenizer" else weights_fingerprint(name)


def compare(artifact_model: str, prov: dict | None, model: str) -> dict[str, bool | None]:
    """{"weights": same?, "tokenizer": same?}; None where a side is not available on this machine.

    The same name without recorded fingerprints is taken as the same model without hashing anything.
    """
    if prov is None and artifact_model == model:
        return {"weights": True, "tokenizer": True}
    out: dict[str, bool | None] = {}
    for key in ("weights", "tokenizer"):
        try:
            theirs = _recorded(artifact_model, prov, key)
        except (OSError, ValueError):  # the recorded model is gone from this machine
            theirs = None
        ours = weights_fingerprint(model) if key == "weights" else tokenizer_fingerprint(model)
        out[key] = None if theirs is None or ours is None else theirs == ours
    return out


def check(command: str, args: Any, explicit: set[str]) -> tuple[list[str], str | None]:
    """Check the artifact ``command`` reads against ``args.model``.

    Returns (lines to print, override note to record in the output or None); raises ProvenanceError.
    ``explicit`` holds the dests given on the command line.
    """
    spec = CHECKS.get(command)
    if spec is None or getattr(args, spec.argument, None) is None or getattr(args, "merge", False):
        return [], None
    if spec.explicit_model and "model" not in explicit:
        return [], None
    model = args.model
    flag = "--" + spec.argument.replace("_", "-") if spec.argument != "labels" else "LABELS"
    path = Path(getattr(args, spec.argument))
    artifact = path / spec.meta_of if spec.meta_of else path
    if not artifact.is_file():
        return [], None  # the stage itself reports the missing file
    meta = read_meta(artifact)
    if not meta:
        return [f"warning: {artifact} has no metadata ({artifact}.meta.json); cannot check it was made with "
                f"a model compatible with '{model}'"], None
    theirs, prov = recorded_model(meta)
    if theirs is None:
        return [f"warning: {artifact}.meta.json names no model; cannot check it against '{model}'"], None
    same = compare(theirs, prov, model)
    need = spec.need
    key = "weights" if need == "weights" else "tokenizer"
    if same[key] is None:
        return [f"warning: cannot compare the {key} of '{theirs}' (which made {artifact}) with '{model}': "
                "one of them is not on this machine"], None
    ok = same[key] if need != "other-tokenizer" else not same[key]
    if ok:
        if command == "train" and same["weights"] is False:
            return [f"note: {flag} {path} was made with '{theirs}'; training '{model}' on it is fine: same "
                    "tokenizer, different weights (another model of the same family)"], None
        return [], None
    differs = " and ".join(k for k in ("weights", "tokenizer") if same[k] is False) or "nothing"
    if need == "other-tokenizer":
        problem = (f"{flag} {path} is already in the tokens of '{model}' (made with '{theirs}', same tokenizer): "
                   "nothing to transfer; train on it directly")
    else:
        problem = (f"{flag} {path} was made with model '{theirs}' but --model is '{model}': the {differs} "
                   f"differ; {NEEDS[need]}")
        if command == "train":
            problem += f"; carry the labels over with `cft transfer --input {path} --model {model} --out NEW.jsonl`"
    if getattr(args, "allow_model_mismatch", False):
        return [f"warning: {problem} (allowed by {ALLOW_FLAG}; recorded in the output metadata)"], problem
    raise ProvenanceError(f"{problem} ({ALLOW_FLAG} overrides)")


# ---------------------------------------------------------------- stamping outputs


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


def output_meta(command: str, args: Any) -> tuple[Path, str | None] | None:
    """(the metadata file a CLI run wrote, the model it was made with or None: the one it records)."""
    if getattr(args, "dry_run", False):
        return None
    if command in ("generate", "transfer"):
        return Path(args.out + ".meta.json"), args.model
    if command == "identify":
        from cft.identify import shard_path

        out = args.out if args.merge else shard_path(args.out, args.shard_index, args.num_shards)
        return Path(out + ".meta.json"), args.model
    if command == "eval":
        if args.rescore:  # the samples' own model, not --model's default
            return Path(args.rescore) / "samples.jsonl.meta.json", None
        return (Path(args.out) / "samples.jsonl.meta.json", args.model) if args.out else None
    if command == "train":
        return Path(args.out) / "train_summary.json", args.model
    return None


def stamp(meta_path: Path, model: str | None, override: str | None = None, since: float = 0.0) -> bool:
    """Record the fingerprints (unless the file has them) and an override note in a metadata file written
    since ``since``. Artifacts get their fingerprints from ``write_meta`` already; this adds them to the
    files written otherwise (``train_summary.json``) and records ``--allow-model-mismatch``.
    """
    if not meta_path.is_file() or meta_path.stat().st_mtime < since:
        return False
    meta = json.loads(meta_path.read_text())
    prov = meta.get("provenance")
    if isinstance(prov, dict) and prov.get("model"):
        if override is None:
            return False
    else:
        model = model or recorded_model(meta)[0]
        if model is None:
            return False
        prov = fingerprint(model).as_dict()
    if override is not None:
        prov["override"] = f"{ALLOW_FLAG}: {override}"
    meta["provenance"] = prov
    tmp = meta_path.with_name(f".{meta_path.name}.{os.getpid()}.tmp")  # shard processes may stamp at once
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, meta_path)
    return True
