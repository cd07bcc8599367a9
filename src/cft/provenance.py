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
fingerprints, computed without loading the model (``cft.fingerprints``; ``write_meta`` adds them).

An artifact written before fingerprints existed records only its model name (``config.model``); its
fingerprints are then computed from that name's files. An artifact without metadata is accepted with a
warning.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cft.artifacts import read_meta
from cft.errors import UserError
from cft.fingerprints import Fingerprint, fingerprint, tokenizer_fingerprint, weight_files_fingerprint

__all__ = ["ALLOW_FLAG", "CHECKS", "Check", "Fingerprint", "ProvenanceError", "check", "compare", "fingerprint",
           "output_meta", "recorded_model", "stamp", "tokenizer_fingerprint", "weight_files_fingerprint"]

ALLOW_FLAG = "--allow-model-mismatch"


class ProvenanceError(UserError, ValueError):
    """An artifact made with another model than the one given; the CLI prints it as one line, exit 2."""


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
    return tokenizer_fingerprint(name) if key == "tokenizer" else weight_files_fingerprint(name)


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
        ours = weight_files_fingerprint(model) if key == "weights" else tokenizer_fingerprint(model)
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
