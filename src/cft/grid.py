"""Planning of ``cft experiment``: its cells, their folders, and the hashes that decide whether one is done.

A cell is (model, method, seed), or a tuning run (model, method, grid point). ``Grid`` lists them in run
order, and hashes everything that determines a cell's output (``cell_hash``: the shared stages, the
training settings and seed, the evaluation plan), so a cell whose ``cell.json`` is finished under the
current hash is skipped without loading anything. It also reads the finished tuning runs and chooses each
tuned method's setting. Runs nothing: ``cft.experiment.Runner`` executes the cells it plans and
``cft.aggregation`` summarises the finished ones.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cft.artifacts import record_key
from cft.experiment_config import ExperimentConfig, ExperimentError, grid_points, settings
from cft.stats import GRPO_PREFIX

CELL = "cell.json"
RESOLVED = "experiment.yaml"
BASE = "base"
Setting = dict[str, Any]  # a tuning grid point: TRL training arguments


@dataclass(frozen=True)
class EvalPlan:
    """What one evaluation decodes: greedy on ``limit`` problems per benchmark, ``n_samples`` samples on the first
    ``sampled`` of them; written under the cell's ``sub`` folder."""

    benchmarks: tuple[str, ...]
    limit: int | None
    sampled: int | None
    n_samples: int
    sub: str
    sample_only: tuple[str, ...] | None = None  # the benchmarks sampled, where not all of them

    @property
    def sampled_benchmarks(self) -> tuple[str, ...]:
        return self.benchmarks if self.sample_only is None else self.sample_only


# ---------------------------------------------------------------- cells


def slug(text: str) -> str:
    """A folder name for a model, method or benchmark spec."""
    if "/" not in text and not text.endswith(".gguf"):
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', Path(text).name).strip('-')}-{record_key(text)[:6]}"


def setting_slug(setting: Setting) -> str:
    return slug("_".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items()))


def cell_dir(cfg: ExperimentConfig, model: str, method: str, seed: int | None, setting: Setting | None = None) -> Path:
    """``OUT/MODEL/METHOD/seedS``; a tuning run ``OUT/MODEL/tune/METHOD/SETTING/seedS``."""
    name = method.replace(GRPO_PREFIX, "grpo-from-")
    base = Path(cfg.out) / slug(model) / ("tune" if setting is not None else "")
    return base / name / (setting_slug(setting) if setting is not None else "") / (
        "seed-any" if seed is None else f"seed{seed}")


def shared_paths(cfg: ExperimentConfig, model: str) -> tuple[Path, Path, Path]:
    """Stage A's generations, stage B's labels and the record of both, shared by every cell of a model."""
    d = Path(cfg.out) / slug(model) / "shared"
    return d / "generations.jsonl", d / "labels.jsonl", d / "shared.json"


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

class Grid:
    """The cells of an experiment and their hashes; reads finished cells from disk, runs nothing."""

    def __init__(self, cfg: ExperimentConfig, chosen: dict[str, dict[str, Setting]] | None = None):
        self.cfg = cfg
        # model -> method -> the tuned training arguments (from this grid's tuning, or a parent's for ablations)
        self.chosen: dict[str, dict[str, Setting]] = {m: dict(v) for m, v in (chosen or {}).items()}

    def curve_methods(self) -> list[str]:
        c = self.cfg.curves
        return [] if c is None else [m for m in self.cfg.methods if c.methods is None or m in c.methods]

    def has_curve(self, method: str) -> bool:
        """Whether a grid cell of ``method`` records a learning curve (the base model: its point at 0)."""
        return self.cfg.curves is not None and method in (BASE, *self.curve_methods())

    def finished(self, model: str, method: str, seed: int, setting: Setting | None = None) -> dict[str, Any] | None:
        """The cell's record if it is finished under the current config (``finished_cell``)."""
        return finished_cell(cell_dir(self.cfg, model, method, seed, setting),
                             self.cell_hash(model, method, seed, setting))

    def train_args(self, model: str, method: str, setting: Setting | None = None) -> dict[str, Any]:
        """TRL's training arguments of a run: the shared ones, the method's tuned (or the grid point's) setting,
        and, for a run with a learning curve, a kept checkpoint at every ``1/points`` of training."""
        tuned = setting if setting is not None else self.chosen.get(model, {}).get(method, {})
        args = {**self.cfg.train_args, **tuned}
        if setting is None and method in self.curve_methods():
            args.update(save_strategy="steps", save_steps=1.0 / self.cfg.curves.points, save_total_limit=None)
        return args

    # -------------------------------------------------- hashes: everything that determines an output

    def shared_hash(self, model: str) -> str:
        c = self.cfg
        return record_key("shared", model, settings(c.generate, "generate"), settings(c.identify, "identify"),
                          c.dtype)

    def train_hash(self, model: str, method: str, seed: int, setting: Setting | None = None) -> str:
        c = self.cfg
        if method == BASE:
            return record_key("base", model, c.dtype)
        if method.startswith(GRPO_PREFIX):
            start = method[len(GRPO_PREFIX):]
            return record_key("grpo", self.train_hash(model, start, seed), settings(c.grpo, "grpo"),
                              settings(c.grpo_args, "grpo_args"), c.generate.data, seed)
        ref = c.rho1_reference if method == "rho1" else None
        ref_key = self.train_hash(model, ref, seed) if ref in c.methods else ref
        return record_key("train", self.shared_hash(model), method, seed, settings(c.train, "train"),
                          self.train_args(model, method, setting), ref_key)

    def cell_hash(self, model: str, method: str, seed: int, setting: Setting | None = None) -> str:
        c = self.cfg
        plans = [self.tune_plan()] if setting is not None else [self.eval_plan()] + (
            [self.curve_plan(0)] if self.has_curve(method) else [])
        decoding = {k: v for k, v in settings(c.eval, "eval").items() if k not in ("limit", "n_samples")}  # in plans
        # the newer options enter the hash only when used, so cells made before them keep theirs
        if c.eval_dtype and c.eval_dtype != c.dtype:
            decoding["dtype"] = c.eval_dtype
        return record_key(self.train_hash(model, method, seed, setting), decoding, c.eval_data_seed,
                          [(p.benchmarks, p.limit, p.sampled, p.n_samples)
                           + ((p.sample_only,) if p.sample_only is not None else ()) for p in plans])

    # -------------------------------------------------- what an evaluation decodes

    def eval_plan(self) -> EvalPlan:
        c = self.cfg
        only = None if c.sample_benchmarks is None or set(c.sample_benchmarks) == set(c.benchmarks) else tuple(
            b for b in c.benchmarks if b in c.sample_benchmarks)
        return EvalPlan(tuple(c.benchmarks), c.eval.limit, c.sampled, c.eval.n_samples, "eval", only)

    def tune_plan(self) -> EvalPlan:
        t = self.cfg.tune
        return EvalPlan((t.benchmark,), t.limit, t.limit, 0, "tune-eval")

    def curve_plan(self, step: int) -> EvalPlan:
        c = self.cfg.curves
        return EvalPlan(tuple(c.benchmarks), c.limit, c.sample_limit, c.n_samples, f"curve/step-{step}")

    # -------------------------------------------------- tuning

    def tuned_methods(self) -> list[str]:
        t = self.cfg.tune
        return [] if t is None else [m for m in self.cfg.methods if m not in t.share and (
            t.methods is None or m in t.methods)]

    def tune_cells(self) -> list[tuple[str, Setting]]:
        return [(m, point) for m in self.tuned_methods() for point in grid_points(self.cfg.tune)]

    def tuning(self, model: str) -> dict[str, Any] | None:
        """Each tuned method's runs (finished ones, read from disk) and, once all are finished, its chosen
        setting: the best tuning-split accuracy, ties to the earlier grid point. Runs nothing."""
        t = self.cfg.tune
        if t is None:
            return None
        out: dict[str, Any] = {}
        for method in self.tuned_methods():
            runs = []
            for point in grid_points(t):
                rec = self.finished(model, method, t.seed, point)
                if rec:
                    m = rec["metrics"][t.benchmark]
                    runs.append({"setting": point, "accuracy": m["accuracy"], "n": m["n"],
                                 "seconds": rec.get("seconds"), "eval_decoded": rec.get("eval_decoded")})
            best = max(runs, key=lambda r: r["accuracy"]) if runs else None  # max keeps the first of equals
            out[method] = {"benchmark": t.benchmark, "seed": t.seed, "metric": "accuracy", "runs": runs,
                           "chosen": best["setting"] if best and len(runs) == len(grid_points(t)) else None,
                           "from": None}
        for method, source in t.share.items():
            out[method] = {**out[source], "runs": [], "from": source}
        return out

    def tuning_twin(self, model: str, method: str, seed: int, train_hash: str) -> Path | None:
        """The tuning run that this grid cell's training repeats exactly (same method, seed and training
        arguments: the tuning seed at the chosen setting, equal training hashes), if it has trained."""
        t, point = self.cfg.tune, self.chosen.get(model, {}).get(method)
        if t is None or point is None or seed != t.seed or method not in self.tuned_methods():
            return None
        twin = cell_dir(self.cfg, model, method, seed, point)
        rec = read_cell(twin)
        if rec and rec.get("train_hash") == train_hash and rec.get("status") in ("trained", "finished") and all(
                (twin / f).exists() for f in rec.get("train_files", [])):
            return twin
        return None

    def choose(self, model: str) -> None:
        """Fill ``chosen`` from the finished tuning runs (a method still being tuned stays unset)."""
        for method, rec in (self.tuning(model) or {}).items():
            if rec["chosen"] is not None:
                self.chosen.setdefault(model, {})[method] = rec["chosen"]

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
                if seed in (c.grpo_seeds or c.seeds):
                    cells += [(model, GRPO_PREFIX + m, seed) for m in c.grpo_from]
        return cells


    def collect(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The finished cells of the plan and the shared-stage records, read from disk; runs nothing."""
        for model in self.cfg.models:
            self.choose(model)
        cells = [rec for p in self.plan() if (rec := self.finished(*p))]
        shared = {}
        for model in self.cfg.models:
            marker = shared_paths(self.cfg, model)[2]
            rec = json.loads(marker.read_text()) if marker.exists() else None
            if rec and rec.get("hash") == self.shared_hash(model):
                shared[model] = rec
        return cells, shared
