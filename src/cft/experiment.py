"""``cft experiment``: a grid of methods x seeds (x models x benchmarks), resumable and aggregated.

The paper's comparisons were single runs; reviewers asked for seeds and error bars. This command runs,
per model, stage A (greedy D_correct) and stage B (critical tokens) **once**, then every cell
(model, method, seed): train from the base model with that method and seed, and evaluate the checkpoint
on every benchmark. Optionally GRPO starts from the checkpoints of some methods (``grpo.from``) and its
policy is evaluated too (method ``grpo:sft``, ``grpo:cft``, ...).

What a seed changes: the training data order and the random masks and tie-breaks of the baselines
(the training ``seed``), the sampling seed of the evaluation and of GRPO. What it does not change: the
training problems, D_correct, the labels and the evaluation problems (testbed splits are drawn once with
``eval.data_seed`` and written to ``OUT/data``), so a paired difference between two methods of the same
seed compares them on identical data.

Resuming: each cell writes ``cell.json`` with the hash of everything that determines it. A cell whose
record is finished, matches the current hash and whose files exist is skipped without loading anything,
so rerunning a finished experiment trains and decodes nothing. A cell interrupted during training resumes
from its last checkpoint; one interrupted during evaluation reuses the responses already written. A cell
trained under another config is refused (never silently mixed), naming the folder to delete.

Aggregation (``OUT/aggregate.json``, also printed): per model, benchmark and method, and per metric (greedy
accuracy, pass@k, maj@k, entropy), the mean over seeds,
the sample standard deviation, a 95% confidence interval from the t distribution, and the paired
difference against the baseline method (default SFT) of the same seed with its own t interval. GRPO cells
are compared with ``grpo:<baseline>``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cft.artifacts import record_key

CELL = "cell.json"
AGGREGATE = "aggregate.json"
RESOLVED = "experiment.yaml"
BASE = "base"
GRPO_PREFIX = "grpo:"

# Two-sided 95% quantiles of Student's t (0.975 quantile) by degrees of freedom; between tabulated values
# the next smaller df is used, which widens the interval slightly (conservative).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
Z975 = 1.960


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; learning rates are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+"
               r"(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


class ExperimentError(ValueError):
    """A configuration or output folder a person has to fix; the CLI prints it and exits with code 2."""


# ---------------------------------------------------------------- config


@dataclass
class TrainData:
    """The training problems of stage A; the same for every cell so that seeds only change training."""

    spec: str = "testbed:train"
    limit: int | None = 250
    seed: int = 0  # which testbed problems


@dataclass
class EvalSettings:
    """Evaluation of every checkpoint. Greedy accuracy is cheap, sampling is not: ``sample_limit`` lets
    pass@k and entropy use fewer problems than accuracy (None: the same ``limit``)."""

    limit: int | None = 100
    sample_limit: int | None = None
    n_samples: int = 16
    temperature: float = 1.0
    max_new_tokens: int = 256
    stop_at_answer: bool = True
    batch_size: int = 64
    template: str | None = None  # None: chat for testbed benchmarks, else qwen25-math-cot
    data_seed: int = 0  # which testbed problems are evaluated (fixed across seeds)
    data_dir: str | None = None

    @property
    def sampled(self) -> int | None:
        return self.limit if self.sample_limit is None else self.sample_limit


@dataclass
class GRPOSettings:
    """GRPO from the checkpoints of ``from_methods`` (YAML key ``from``), one run per seed in ``seeds``."""

    from_methods: list[str] = field(default_factory=lambda: ["sft", "cft"])
    seeds: list[int] | None = None  # None: every seed of the grid
    evaluate: bool = True
    max_steps: int = 50
    lr: float = 1e-6
    limit: int | None = 1000
    prompts_per_step: int = 4
    num_generations: int = 4
    max_completion_length: int = 128
    temperature: float = 1.0
    beta: float = 0.0


@dataclass
class ExperimentConfig:
    """The resolved grid; saved as ``OUT/experiment.yaml``."""

    out: str
    models: list[str] = field(default_factory=lambda: ["testbed"])
    methods: list[str] = field(default_factory=lambda: ["sft", "cft"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    benchmarks: list[str] = field(default_factory=lambda: ["testbed:test", "testbed:test_ood"])
    train_data: TrainData = field(default_factory=TrainData)
    generate: dict[str, Any] = field(default_factory=dict)  # DecodeConfig fields of stage A
    identify: dict[str, Any] = field(default_factory=dict)  # IdentifyConfig fields of stage B
    train: dict[str, Any] = field(default_factory=dict)  # cft train options (cft.train.CONFIGS) shared by every cell
    eval: EvalSettings = field(default_factory=EvalSettings)
    grpo: GRPOSettings | None = None
    baseline: str = "sft"  # paired differences are taken against this method
    rho1_reference: str | None = "sft"  # a method of the grid (its checkpoint, same seed), a model, or None
    evaluate_base: bool = True  # evaluate the starting model once (first seed) as a reference row
    dtype: str = "float32"
    device: str | None = None


# Fields every cell sets itself; the config may not set them.
_TRAIN_FIXED = {"model", "input", "method", "out", "seed", "resume", "reference", "dtype"}
_IDENTIFY_FIXED = {"model", "input", "out", "dtype", "device", "num_shards", "shard_index", "approximations"}
_GENERATE_FIXED = {"seed"}


def _check_fields(section: str, values: dict[str, Any], cls: type | set[str], fixed: set[str]) -> None:
    known = (cls if isinstance(cls, set) else {f.name for f in fields(cls)}) - fixed
    unknown = sorted(set(values) - known)
    if unknown:
        raise ExperimentError(f"{section}: unknown or fixed field(s) {', '.join(unknown)}; "
                              f"allowed: {', '.join(sorted(known))}")


def _typed(cls: type, section: str, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ExperimentError(f"{section}: expected a mapping, got {values!r}")
    _check_fields(section, values, cls, set())
    return cls(**values)


def set_override(raw: dict[str, Any], item: str) -> None:
    """Apply ``a.b=value`` (value parsed as YAML) to the raw config mapping."""
    if "=" not in item:
        raise ExperimentError(f"override {item!r} is not key=value")
    key, value = item.split("=", 1)
    node = raw
    *parents, last = key.strip().split(".")
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ExperimentError(f"override {item!r}: {name} is not a mapping")
    node[last] = parse_yaml(value)


def build_config(raw: dict[str, Any]) -> ExperimentConfig:
    """Validate the raw mapping (YAML plus overrides) into an ``ExperimentConfig``."""
    from cft.generate import DecodeConfig
    from cft.identify import IdentifyConfig
    from cft.selection import METHODS
    from cft.train import CONFIGS as TRAIN_CONFIGS
    from cft.train import option_names

    raw = dict(raw)
    if "model" in raw:
        model = raw.pop("model")
        raw["models"] = model if isinstance(model, list) else [model]
    known = {f.name for f in fields(ExperimentConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ExperimentError(f"unknown config key(s) {', '.join(unknown)}; known: model, {', '.join(sorted(known))}")
    if not raw.get("out"):
        raise ExperimentError("the config needs an output folder: out")
    if isinstance(raw.get("train_data"), str):
        raw["train_data"] = {"spec": raw["train_data"]}
    raw["train_data"] = _typed(TrainData, "train_data", raw.get("train_data", {}))
    raw["eval"] = _typed(EvalSettings, "eval", raw.get("eval", {}))
    if raw.get("grpo") is not None:
        grpo = dict(raw["grpo"])
        if "from" in grpo:
            grpo["from_methods"] = grpo.pop("from")
        raw["grpo"] = _typed(GRPOSettings, "grpo", grpo)
    for section, cls, fixed in (("generate", DecodeConfig, _GENERATE_FIXED), ("identify", IdentifyConfig,
                                _IDENTIFY_FIXED), ("train", set(option_names(*TRAIN_CONFIGS)), _TRAIN_FIXED)):
        raw[section] = dict(raw.get(section) or {})
        _check_fields(section, raw[section], cls, fixed)
    cfg = ExperimentConfig(**raw)
    for method in cfg.methods:
        if method not in METHODS:
            raise ExperimentError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if len(set(cfg.methods)) != len(cfg.methods) or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ExperimentError("methods and seeds must not repeat")
    if not cfg.seeds or not cfg.methods or not cfg.models or not cfg.benchmarks:
        raise ExperimentError("models, methods, seeds and benchmarks must each name at least one entry")
    if cfg.rho1_reference in METHODS and "rho1" in cfg.methods and cfg.rho1_reference not in cfg.methods:
        raise ExperimentError(f"rho1_reference {cfg.rho1_reference!r} is a method but not in methods")
    if cfg.rho1_reference == "rho1":
        raise ExperimentError("rho1_reference cannot be rho1 itself")
    if cfg.grpo is not None:
        missing = [m for m in cfg.grpo.from_methods if m not in cfg.methods]
        if missing:
            raise ExperimentError(f"grpo.from names method(s) not in methods: {', '.join(missing)}")
        extra = [s for s in cfg.grpo.seeds or [] if s not in cfg.seeds]
        if extra:
            raise ExperimentError(f"grpo.seeds {extra} are not seeds of the grid")
    if cfg.eval.n_samples > 0 and cfg.eval.temperature <= 0:
        raise ExperimentError("eval: sampling needs temperature > 0 (or n_samples: 0)")
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    raw = parse_yaml(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: expected a mapping at the top level")
    for item in overrides or []:
        set_override(raw, item)
    return build_config(raw)


def config_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved config in YAML's terms (``grpo.from`` as written)."""
    d = asdict(cfg)
    if d["grpo"] is not None:
        d["grpo"] = {"from": d["grpo"].pop("from_methods"), **d["grpo"]}
    return d


# ---------------------------------------------------------------- statistics (pure)


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table above; normal past it)."""
    if df < 1:
        raise ValueError("a t interval needs at least 2 values")
    if df > max(T975):
        return Z975
    return T975[max(d for d in T975 if d <= df)]


def summarize(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and 95% t interval of per-seed values (no interval for one value)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None, "half_width": None, "values": []}
    mean = math.fsum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95": None, "half_width": None, "values": list(values)}
    std = statistics.stdev(values)
    half = t_quantile(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half], "half_width": half,
            "values": list(values)}


def paired(values: dict[int, float], reference: dict[int, float]) -> dict[str, Any]:
    """``summarize`` of the per-seed differences value - reference over the seeds both have."""
    seeds = sorted(set(values) & set(reference))
    out = summarize([values[s] - reference[s] for s in seeds])
    out["seeds"] = seeds
    lo_hi = out["ci95"]
    out["excludes_zero"] = None if lo_hi is None else (lo_hi[0] > 0 or lo_hi[1] < 0)
    return out


def metric_values(cell_metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of one benchmark of one cell, flattened: accuracy, pass@k, maj@k, entropy."""
    out = {"accuracy": cell_metrics.get("accuracy"), "entropy": cell_metrics.get("entropy")}
    out.update({f"pass@{k}": v for k, v in (cell_metrics.get("pass_at_k") or {}).items()})
    out.update({f"maj@{k}": v for k, v in (cell_metrics.get("maj_at_k") or {}).items()})
    return {k: v for k, v in out.items() if v is not None}


def headline_metrics(names) -> tuple[list[str], list[str]]:
    """The sampled metrics a results table shows, and those it adds a paired-difference column for.

    Shown: pass@k at the smallest and largest k and maj@k at the largest k (maj@1 equals pass@1);
    differences: pass@k and maj@k at the largest k.
    """
    pass_ks = sorted({int(n[5:]) for n in names if n.startswith("pass@")})
    maj_ks = [k for k in sorted({int(n[4:]) for n in names if n.startswith("maj@")}) if k > 1]
    top = [f"pass@{k}" for k in pass_ks[-1:]] + [f"maj@{k}" for k in maj_ks[-1:]]
    return [f"pass@{k}" for k in pass_ks[:1] if len(pass_ks) > 1] + top, top


def reference_method(method: str, baseline: str) -> str:
    """The method a cell is compared with: the baseline, or its GRPO counterpart for GRPO cells."""
    return GRPO_PREFIX + baseline if method.startswith(GRPO_PREFIX) else baseline


def aggregate(cells: list[dict[str, Any]], baseline: str = "sft") -> dict[str, Any]:
    """Per model, benchmark and method: statistics of every metric and paired differences against the baseline.

    ``cells`` are finished ``cell.json`` records (model, method, seed, metrics per benchmark).
    """
    by: dict[str, dict[str, dict[str, dict[str, dict[int, float]]]]] = {}  # model/bench/method/metric/seed
    for cell in cells:
        for bench, m in cell["metrics"].items():
            per_method = by.setdefault(cell["model"], {}).setdefault(bench, {}).setdefault(cell["method"], {})
            for name, value in metric_values(m).items():
                per_method.setdefault(name, {})[cell["seed"]] = value
    result: dict[str, Any] = {}
    for model, benches in by.items():
        for bench, methods in benches.items():
            rows = result.setdefault(model, {}).setdefault(bench, {})
            for method, metrics in methods.items():
                ref_name = reference_method(method, baseline)
                ref = methods.get(ref_name) if ref_name != method else None
                row: dict[str, Any] = {"seeds": sorted({s for v in metrics.values() for s in v}),
                                       "metrics": {k: summarize([v[s] for s in sorted(v)]) for k, v in metrics.items()},
                                       "compared_with": ref_name if ref else None, "paired": {}}
                if ref:
                    row["paired"] = {k: paired(v, ref[k]) for k, v in metrics.items() if k in ref}
                rows[method] = row
    return result


# ---------------------------------------------------------------- cells


def slug(text: str) -> str:
    """A folder name for a model, method or benchmark spec."""
    if "/" not in text and not text.endswith(".gguf"):
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', Path(text).name).strip('-')}-{record_key(text)[:6]}"


def cell_dir(cfg: ExperimentConfig, model: str, method: str, seed: int | None) -> Path:
    name = method.replace(GRPO_PREFIX, "grpo-from-")
    return Path(cfg.out) / slug(model) / name / ("seed-any" if seed is None else f"seed{seed}")


def read_cell(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / CELL).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json_if_changed(path: Path, data: Any) -> bool:
    """Write ``data`` as JSON unless the file already holds exactly it (a rerun leaves files untouched)."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def finished_cell(path: Path, cell_hash: str) -> dict[str, Any] | None:
    """The cell record if it is finished under ``cell_hash`` and every file it names still exists."""
    rec = read_cell(path)
    if rec and rec.get("status") == "finished" and rec.get("hash") == cell_hash and all(
            (path / f).exists() for f in rec.get("files", [])):
        return rec
    return None


def claim_cell(path: Path, base: dict[str, Any]) -> dict[str, Any]:
    """Start (or continue) a cell; refuse a folder whose training was made under another config."""
    rec = read_cell(path)
    if rec and rec.get("train_hash") != base["train_hash"]:
        raise ExperimentError(f"{path} holds a cell trained under another config (hash {rec.get('train_hash')}, "
                              f"now {base['train_hash']}); delete that folder or choose another out")
    if rec and rec.get("status") in ("trained", "finished"):
        return {**rec, **base, "status": "trained"}
    new = {**base, "status": "training"}
    write_json_if_changed(path / CELL, new)
    return new


class Runner:
    """Runs the grid; loads models only for work that is not done yet."""

    def __init__(self, cfg: ExperimentConfig, log=print):
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        self.counts = {"trained": 0, "evaluated": 0, "grpo": 0, "skipped": 0}

    # -------------------------------------------------- hashes: everything that determines an output

    def shared_hash(self, model: str) -> str:
        c = self.cfg
        return record_key("shared", model, asdict(c.train_data), c.generate, c.identify, c.dtype)

    def train_hash(self, model: str, method: str, seed: int) -> str:
        if method == BASE:
            return record_key("base", model, self.cfg.dtype)
        if method.startswith(GRPO_PREFIX):
            start = method[len(GRPO_PREFIX):]
            settings = {k: v for k, v in asdict(self.cfg.grpo).items() if k not in ("from_methods", "seeds",
                                                                                     "evaluate")}
            return record_key("grpo", self.train_hash(model, start, seed), settings, self.cfg.train_data.spec, seed)
        ref = self.cfg.rho1_reference if method == "rho1" else None
        ref_key = self.train_hash(model, ref, seed) if ref in self.cfg.methods else ref
        return record_key("train", self.shared_hash(model), method, seed, self.cfg.train, ref_key)

    def cell_hash(self, model: str, method: str, seed: int) -> str:
        return record_key(self.train_hash(model, method, seed), self.cfg.benchmarks, asdict(self.cfg.eval))

    # -------------------------------------------------- stages A and B, shared by every cell of a model

    def shared_paths(self, model: str) -> tuple[Path, Path, Path]:
        d = self.out / slug(model) / "shared"
        return d / "generations.jsonl", d / "labels.jsonl", d / "shared.json"

    def shared_stages(self, model: str, loaded) -> dict[str, Any]:
        from cft.generate import DecodeConfig, GenerateConfig, generate
        from cft.identify import IdentifyConfig, identify

        gen_path, labels_path, marker = self.shared_paths(model)
        h = self.shared_hash(model)
        if marker.exists():
            rec = json.loads(marker.read_text())
            if rec.get("hash") == h and gen_path.exists() and labels_path.exists():
                return rec
        gen_path.parent.mkdir(parents=True, exist_ok=True)
        m, tok = loaded()
        c = self.cfg
        t0 = time.time()
        self.log(f"[{model}] stage A: greedy solutions of {c.train_data.spec} (limit {c.train_data.limit})")
        gen = generate(GenerateConfig(model=model, data=c.train_data.spec, out=str(gen_path), seed=c.train_data.seed,
                                      limit=c.train_data.limit, dtype=c.dtype, device=c.device,
                                      decode=DecodeConfig(**{**c.generate, "seed": c.train_data.seed})),
                       model=m, tok=tok)
        self.log(f"[{model}] D_correct: {gen['correct']} of {gen['n']} ({gen['accuracy']:.1%}) "
                 f"in {time.time() - t0:.0f}s")
        t1 = time.time()
        labels = identify(IdentifyConfig(model=model, input=str(gen_path), out=str(labels_path), dtype=c.dtype,
                                         device=c.device, **c.identify), model=m, tok=tok)
        self.log(f"[{model}] stage B: critical fraction {labels['critical_fraction']:.1%} of "
                 f"{labels['positions']} positions in {time.time() - t1:.0f}s")
        rec = {"hash": h, "model": model, "generate": gen, "identify": labels,
               "seconds": {"generate": t1 - t0, "identify": time.time() - t1}}
        write_json_if_changed(marker, rec)
        return rec

    # -------------------------------------------------- evaluation

    def benchmark_input(self, bench: str) -> tuple[str, str | None]:
        """(spec to evaluate, template). Testbed splits are drawn once (``eval.data_seed``) and written to
        ``OUT/data`` so that the evaluation seed changes only the sampling, never the problems."""
        e = self.cfg.eval
        if not bench.startswith("testbed:"):
            return bench, e.template
        from cft.data import load_problems

        n = max(x for x in (e.limit, e.sampled, 0) if x is not None) or None
        path = self.out / "data" / f"{slug(bench)}-s{e.data_seed}-n{n or 'all'}.jsonl"
        if not path.exists():
            problems = load_problems(bench, seed=e.data_seed, limit=n)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n"
                                   for p in problems))
            tmp.replace(path)
        return str(path), e.template or "chat"

    def evaluate_checkpoint(self, name: str, model, tok, path: Path, seed: int) -> tuple[dict, list[str]]:
        """Metrics per benchmark (greedy accuracy on ``limit`` problems, sampling on ``sample_limit``)."""
        from cft.evaluate import METRICS, EvalConfig, evaluate

        e = self.cfg.eval
        runs = [("all", e.limit, e.n_samples)] if e.sampled == e.limit or e.n_samples == 0 else [
            ("greedy", e.limit, 0), ("sampled", e.sampled, e.n_samples)]
        metrics, files = {}, []
        for bench in self.cfg.benchmarks:
            spec, template = self.benchmark_input(bench)
            parts = {}
            for part, limit, n in runs:
                out = path / "eval" / slug(bench) / part
                ecfg = EvalConfig(model=name, benchmarks=[spec], out=str(out), limit=limit, n_samples=n,
                                  temperature=e.temperature, template=template, data_dir=e.data_dir,
                                  max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                                  stop_at_answer=e.stop_at_answer, seed=seed, dtype=self.cfg.dtype,
                                  device=self.cfg.device)
                parts[part] = evaluate(ecfg, model, tok)[spec]
                files.append(str((out / METRICS).relative_to(path)))
            greedy = parts.get("greedy", parts.get("all"))
            sampled = parts.get("sampled", parts.get("all"))
            metrics[bench] = {"accuracy": greedy["accuracy"], "n": greedy["n"], "truncated": greedy["truncated"],
                              "pass_at_k": sampled["pass_at_k"], "maj_at_k": sampled["maj_at_k"],
                              "entropy": sampled["entropy"],
                              "n_sampled": sampled["n"] if sampled["n_samples"] else 0,
                              "n_samples": sampled["n_samples"]}
        self.counts["evaluated"] += 1
        return metrics, files

    # -------------------------------------------------- one cell

    def run_cell(self, model: str, method: str, seed: int, loaded) -> dict[str, Any]:
        path = cell_dir(self.cfg, model, method, seed)
        h = self.cell_hash(model, method, seed)
        done = finished_cell(path, h)
        if done:
            self.counts["skipped"] += 1
            return done
        base = {"model": model, "method": method, "seed": seed, "hash": h,
                "train_hash": self.train_hash(model, method, seed)}
        rec = claim_cell(path, base)
        seconds = dict(rec.get("seconds", {}))
        t0 = time.time()
        if method == BASE:
            m, tok = loaded()
            ckpt = model
        else:
            ckpt_dir = path / ("grpo" if method.startswith(GRPO_PREFIX) else "train")
            if rec["status"] != "trained":
                rec.update(self.grpo_cell(model, method, seed, ckpt_dir) if method.startswith(GRPO_PREFIX)
                           else self.train_cell(model, method, seed, ckpt_dir))
                seconds["train"] = time.time() - t0
                rec.update(status="trained", seconds=seconds)
                write_json_if_changed(path / CELL, rec)
            from cft.models import load_model

            ckpt = str(ckpt_dir)
            m, tok = load_model(ckpt, self.cfg.dtype, self.cfg.device)
        if method.startswith(GRPO_PREFIX) and not self.cfg.grpo.evaluate:
            metrics, files = {}, []
        else:
            t1 = time.time()
            metrics, files = self.evaluate_checkpoint(ckpt, m, tok, path, seed)
            seconds["eval"] = time.time() - t1
        rec.update(status="finished", metrics=metrics, seconds=seconds,
                   files=[*rec.get("train_files", []), *files])
        write_json_if_changed(path / CELL, rec)
        accs = ", ".join(f"{b} {v['accuracy']:.3f}" for b, v in metrics.items())
        self.log(f"[{model}] {method} seed {seed}: " + " ".join(f"{k} {v:.0f}s" for k, v in seconds.items())
                 + (f"; accuracy {accs}" if accs else ""))
        return rec

    def train_cell(self, model: str, method: str, seed: int, out: Path) -> dict[str, Any]:
        from cft.train import SUMMARY, train, train_configs

        _, labels, _ = self.shared_paths(model)
        ref = self.cfg.rho1_reference if method == "rho1" else None
        if ref in self.cfg.methods:
            ref = str(cell_dir(self.cfg, model, ref, seed) / "train")
        summary = train(*train_configs(model=model, input=str(labels), method=method, out=str(out), seed=seed,
                                       resume=True, reference=ref, dtype=self.cfg.dtype, **self.cfg.train))
        self.counts["trained"] += 1
        tokens = {k: v for k, v in summary["tokens"].items() if k != "excluded_ids"}
        curve = [[h["step"], h["loss"]] for h in summary["log_history"] if "loss" in h]
        return {"train": {"global_step": summary["global_step"], "train_loss": summary["train_loss"],
                          "final_loss": summary["final_loss"], "tokens": tokens, "loss_curve": curve,
                          "seconds": summary["seconds"]},
                "train_files": [f"train/{SUMMARY}"]}

    def grpo_cell(self, model: str, method: str, seed: int, out: Path) -> dict[str, Any]:
        from cft.grpo import LOG, SUMMARY, CFTGRPOConfig, GRPORunConfig, grpo

        g = self.cfg.grpo
        start = cell_dir(self.cfg, model, method[len(GRPO_PREFIX):], seed) / "train"
        summary = grpo(GRPORunConfig(init=str(start), out=str(out), data=self.cfg.train_data.spec, limit=g.limit,
                                     dtype=self.cfg.dtype),
                       CFTGRPOConfig(max_steps=g.max_steps, learning_rate=g.lr, prompts_per_step=g.prompts_per_step,
                                     num_generations=g.num_generations, max_completion_length=g.max_completion_length,
                                     temperature=g.temperature, beta=g.beta, seed=seed))
        self.counts["grpo"] += 1
        rows = [json.loads(line) for line in (out / LOG).read_text().splitlines() if line.strip()]
        return {"grpo": {"global_step": summary.get("global_step"), "log": rows, "seconds": summary.get("seconds")},
                "train_files": [f"grpo/{SUMMARY}", f"grpo/{LOG}"]}

    # -------------------------------------------------- the grid

    def plan(self) -> list[tuple[str, str, int]]:
        """(model, method, seed) in run order: seeds outermost, so a partial run has whole seeds; a rho1
        reference method runs before rho1; GRPO cells follow the cell they start from."""
        c = self.cfg
        methods = sorted(c.methods, key=lambda m: (m != c.rho1_reference and m != c.baseline, c.methods.index(m)))
        cells = []
        for model in c.models:
            if c.evaluate_base:
                cells.append((model, BASE, c.seeds[0]))
            for seed in c.seeds:
                cells += [(model, m, seed) for m in methods]
                if c.grpo is not None and seed in (c.grpo.seeds or c.seeds):
                    cells += [(model, GRPO_PREFIX + m, seed) for m in c.grpo.from_methods]
        return cells

    def run(self) -> dict[str, Any]:
        """Run every cell not done yet; after each one that did work the aggregate is rewritten, so a
        report can be made while the grid runs and a killed run leaves the statistics of what finished."""
        from cft.models import load_model

        self.out.mkdir(parents=True, exist_ok=True)
        resolved = yaml.safe_dump(config_dict(self.cfg), sort_keys=False)
        target = self.out / RESOLVED
        if not target.exists() or target.read_text() != resolved:
            target.write_text(resolved)
        plan = self.plan()
        t0 = time.time()
        for model in self.cfg.models:
            cache: dict[str, Any] = {}

            def loaded(model=model, cache=cache):
                if "m" not in cache:
                    cache["m"] = load_model(model, self.cfg.dtype, self.cfg.device)
                return cache["m"]

            todo = [p for p in plan if p[0] == model]
            self.shared_stages(model, loaded)
            for i, (mdl, method, seed) in enumerate(todo, 1):
                self.log(f"[{mdl}] cell {i}/{len(todo)}: {method} seed {seed} ({time.time() - t0:.0f}s elapsed)")
                skipped = self.counts["skipped"]
                self.run_cell(mdl, method, seed, loaded)
                if self.counts["skipped"] == skipped:
                    self.write_aggregate(*self.collect())
        return self.write_aggregate(*self.collect())

    def collect(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The finished cells of the plan and the shared-stage records, read from disk; runs nothing."""
        cells = [rec for p in self.plan() if (rec := finished_cell(cell_dir(self.cfg, *p), self.cell_hash(*p)))]
        shared = {}
        for model in self.cfg.models:
            marker = self.shared_paths(model)[2]
            rec = json.loads(marker.read_text()) if marker.exists() else None
            if rec and rec.get("hash") == self.shared_hash(model):
                shared[model] = rec
        return cells, shared

    def write_aggregate(self, cells: list[dict[str, Any]], shared: dict[str, Any]) -> dict[str, Any]:
        expected = {(m, meth, seed) for m, meth, seed in self.plan()}
        done = {(c["model"], c["method"], c["seed"]) for c in cells if c.get("status") == "finished"}
        result = {
            "config": config_dict(self.cfg),
            "finished_cells": len(done & expected),
            "planned_cells": len(expected),
            "missing_cells": [list(p) for p in self.plan() if p not in done],
            "baseline": self.cfg.baseline,
            "benchmarks": self.cfg.benchmarks,
            "results": aggregate([c for c in cells if c.get("status") == "finished"], self.cfg.baseline),
            "shared": {m: {"d_correct": s["generate"]["correct"], "train_problems": s["generate"]["n"],
                           "critical_fraction": s["identify"]["critical_fraction"],
                           "critical_by_kind": s["identify"]["critical_by_kind"],
                           "seconds": s.get("seconds")} for m, s in shared.items()},
            "cells": [{k: c.get(k) for k in ("model", "method", "seed", "status", "seconds", "train", "grpo",
                                             "metrics")} for c in cells],
        }
        write_json_if_changed(self.out / AGGREGATE, result)
        return result


def run_experiment(cfg: ExperimentConfig, log=print) -> tuple[dict[str, Any], dict[str, int]]:
    """Run (or resume) the whole grid; returns the aggregate and what this call actually did."""
    runner = Runner(cfg, log)
    return runner.run(), runner.counts


# ---------------------------------------------------------------- printing and CLI


def fmt_stat(s: dict[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
    if not s or s.get("mean") is None:
        return "-"
    text = f"{scale * s['mean']:.{digits}f}"
    return text if s.get("half_width") is None else f"{text} ± {scale * s['half_width']:.{digits}f}"


def fmt_diff(s: dict[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
    if not s or s.get("mean") is None:
        return "-"
    text = f"{scale * s['mean']:+.{digits}f}"
    if s.get("ci95"):
        lo, hi = s["ci95"]
        text += f" [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]" + ("*" if s["excludes_zero"] else "")
    return text


def print_aggregate(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    for model, benches in result["results"].items():
        for bench, rows in benches.items():
            shown, deltas = headline_metrics({k for r in rows.values() for k in r["metrics"]})
            table = Table(title=f"{model} on {bench}: mean ± 95% CI half-width over seeds (%), paired Δ vs "
                                f"{result['baseline']} [95% CI] (* = CI excludes 0)")
            for col in ["method", "seeds", "accuracy", "Δ accuracy", *shown, *(f"Δ {k}" for k in deltas),
                        "entropy", "Δ entropy"]:
                table.add_column(col, justify="right" if col != "method" else "left", no_wrap=True)
            for method, r in rows.items():
                m, d = r["metrics"], r["paired"]
                table.add_row(method, str(len(r["seeds"])), fmt_stat(m.get("accuracy")), fmt_diff(d.get("accuracy")),
                              *(fmt_stat(m.get(k)) for k in shown), *(fmt_diff(d.get(k)) for k in deltas),
                              fmt_stat(m.get("entropy"), 1.0, 3), fmt_diff(d.get("entropy"), 1.0, 3))
            console.print(table)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (see configs/experiment/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config entries, e.g. seeds=[0,1] train.lr=1e-4 eval.limit=50 out=runs/x "
                        "(options go before CONFIG or after the overrides)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the cells; run nothing")
    p.add_argument("--aggregate-only", action="store_true",
                   help="aggregate the cells finished so far (e.g. while another process runs the grid); run nothing")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            print(yaml.safe_dump(config_dict(cfg), sort_keys=False))
            runner = Runner(cfg)
            for model, method, seed in runner.plan():
                state = "done" if finished_cell(cell_dir(cfg, model, method, seed),
                                                runner.cell_hash(model, method, seed)) else "todo"
                print(f"{state}  {model}  {method}  seed {seed}")
            return 0
        if args.aggregate_only:
            runner = Runner(cfg)
            result = runner.write_aggregate(*runner.collect())
            print_aggregate(result)
            print(f"{result['finished_cells']} of {result['planned_cells']} cells finished; "
                  f"aggregate in {Path(cfg.out) / AGGREGATE}")
            return 0
        t0 = time.time()
        result, counts = run_experiment(cfg, log=lambda msg: print(msg, flush=True))
    except ExperimentError as exc:
        print(f"cft experiment: error: {exc}", file=sys.stderr)
        return 2
    print_aggregate(result)
    print(f"experiment finished in {time.time() - t0:.0f}s: {counts['trained']} trained, {counts['grpo']} GRPO runs, "
          f"{counts['evaluated']} evaluated, {counts['skipped']} cells already done; "
          f"aggregate in {Path(cfg.out) / AGGREGATE}")
    return 0
