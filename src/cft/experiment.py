"""``cft experiment``: a grid of methods x seeds (x models x benchmarks), resumable and aggregated.

The paper's comparisons were single runs; reviewers asked for seeds and error bars. This command runs,
per model, stage A (greedy D_correct) and stage B (critical tokens) **once**, then every cell
(model, method, seed): train from the base model with that method and seed, and evaluate the checkpoint
on every benchmark. Optionally GRPO starts from the checkpoints of some methods (``grpo_from``) and its
policy is evaluated too (method ``grpo:sft``, ``grpo:cft``, ...). ``cft demo`` is this runner on the preset
``configs/experiment/demo.yaml``.

The config (``cft.experiment_config``) is made of the stage configs themselves: each cell's is
``dataclasses.replace`` of a section with the fields the cell decides (model, paths, method, seed).

What a seed changes: the training data order and the random masks and tie-breaks of the baselines
(the training ``seed``), the sampling seed of the evaluation and of GRPO. What it does not change: the
training problems, D_correct, the labels and the evaluation problems (testbed splits are drawn once with
``eval_data_seed`` and written to ``OUT/data``), so a paired difference between two methods of the same
seed compares them on identical data.

Resuming: each cell writes ``cell.json`` with the hash of everything that determines it. A cell whose
record is finished, matches the current hash and whose files exist is skipped without loading anything,
so rerunning a finished experiment trains and decodes nothing. A cell interrupted during training resumes
from its last checkpoint; one interrupted during evaluation reuses the responses already written. A cell
trained under another config is refused (never silently mixed), naming the folder to delete.

Aggregation (``OUT/aggregate.json``, also printed): per model, benchmark and method, and per metric (greedy
accuracy, pass@k, maj@k, entropy), the mean over seeds, the sample standard deviation, a 95% confidence
interval from the t distribution, and the paired difference against the baseline method (default SFT) of the
same seed with its own t interval. GRPO cells are compared with ``grpo:<baseline>`` (``cft.stats``).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from cft import grpo as grpo_stage
from cft.artifacts import load_records, record_key
from cft.data import is_generated, load_problems
from cft.evaluate import METRICS, SAMPLES, evaluate, problem_scores
from cft.experiment_config import ExperimentConfig, ExperimentError, config_dict, grid_points, load_config, settings
from cft.generate import generate
from cft.identify import identify
from cft.models import load_model
from cft.progress import clock
from cft.stats import (
    GRPO_PREFIX,
    aggregate,
    fmt_bootstrap,
    fmt_diff,
    fmt_stat,
    headline_metrics,
    paired_bootstrap,
    summarize,
)
from cft.train import SUMMARY, CFTSFTConfig, train

CELL = "cell.json"
AGGREGATE = "aggregate.json"
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


class Runner:
    """Runs the grid; loads models only for work that is not done yet."""

    def __init__(self, cfg: ExperimentConfig, log=print, chosen: dict[str, dict[str, Setting]] | None = None):
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        self.counts = {"trained": 0, "evaluated": 0, "grpo": 0, "skipped": 0}
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
        return record_key(self.train_hash(model, method, seed, setting), decoding, c.eval_data_seed,
                          [(p.benchmarks, p.limit, p.sampled, p.n_samples) for p in plans])

    # -------------------------------------------------- what an evaluation decodes

    def eval_plan(self) -> EvalPlan:
        c = self.cfg
        return EvalPlan(tuple(c.benchmarks), c.eval.limit, c.sampled, c.eval.n_samples, "eval")

    def tune_plan(self) -> EvalPlan:
        t = self.cfg.tune
        return EvalPlan((t.benchmark,), t.limit, t.limit, 0, "tune-eval")

    def curve_plan(self, step: int) -> EvalPlan:
        c = self.cfg.curves
        return EvalPlan(tuple(c.benchmarks), c.limit, c.sample_limit, c.n_samples, f"curve/step-{step}")

    # -------------------------------------------------- stages A and B, shared by every cell of a model

    def shared_stages(self, model: str, loaded) -> dict[str, Any]:

        gen_path, labels_path, marker = shared_paths(self.cfg, model)
        h = self.shared_hash(model)
        if marker.exists():
            rec = json.loads(marker.read_text())
            if rec.get("hash") == h and gen_path.exists() and labels_path.exists():
                return rec
        gen_path.parent.mkdir(parents=True, exist_ok=True)
        m, tok = loaded()
        gcfg = replace(self.cfg.generate, model=model, out=str(gen_path))
        t0 = time.time()
        self.log(f"[{model}] stage A: greedy solutions of {gcfg.data} (limit {gcfg.limit})")
        gen = generate(gcfg, model=m, tok=tok)
        self.log(f"[{model}] D_correct: {gen['correct']} of {gen['n']} ({gen['accuracy']:.1%}) "
                 f"in {time.time() - t0:.0f}s")
        t1 = time.time()
        labels = identify(replace(self.cfg.identify, model=model, input=str(gen_path), out=str(labels_path)),
                          model=m, tok=tok)
        self.log(f"[{model}] stage B: critical fraction {labels['critical_fraction']:.1%} of "
                 f"{labels['positions']} positions in {time.time() - t1:.0f}s")
        rec = {"hash": h, "model": model, "generate": gen, "identify": labels,
               "seconds": {"generate": t1 - t0, "identify": time.time() - t1}}
        write_json_if_changed(marker, rec)
        return rec

    # -------------------------------------------------- evaluation

    def benchmark_input(self, bench: str, n: int | None) -> tuple[str, str | None]:
        """(spec to evaluate, template). Generated splits (testbed:, arith:) are drawn once (``eval_data_seed``)
        and written to ``OUT/data`` so that the evaluation seed changes only the sampling, never the problems."""
        c = self.cfg
        if not is_generated(bench):
            return bench, c.eval.template
        path = self.out / "data" / f"{slug(bench)}-s{c.eval_data_seed}-n{n or 'all'}.jsonl"
        if not path.exists():
            problems = load_problems(bench, seed=c.eval_data_seed, limit=n)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n"
                                   for p in problems))
            tmp.replace(path)
        return str(path), c.eval.template or "chat"

    def evaluate_checkpoint(self, name: str, model, tok, path: Path, seed: int,
                            plan: EvalPlan) -> tuple[dict, list[str], dict]:
        """Metrics per benchmark (greedy accuracy on ``plan.limit`` problems, sampling on ``plan.sampled``) and
        each problem's scores (``cft.evaluate.problem_scores``) for the paired bootstrap.

        The benchmarks that share a prompt template are decoded in one ``evaluate`` call (one batching, as
        ``cft eval`` with several benchmarks does)."""

        e, n_samples = self.cfg.eval, plan.n_samples
        runs = [("all", plan.limit, n_samples)] if plan.sampled == plan.limit or n_samples == 0 else [
            ("greedy", plan.limit, 0), ("sampled", plan.sampled, n_samples)]
        n = max(x for x in (plan.limit, plan.sampled, 0) if x is not None) or None
        groups: dict[str | None, dict[str, str]] = {}  # template -> benchmark -> spec
        for bench in plan.benchmarks:
            spec, template = self.benchmark_input(bench, n)
            groups.setdefault(template, {})[bench] = spec
        parts: dict[str, dict[str, dict]] = {}  # part -> benchmark -> metrics
        problems: dict[str, dict[str, dict[str, float]]] = {}
        files = []
        for template, specs in groups.items():
            for part, limit, k in runs:
                out = path / plan.sub / slug(template or "default") / part
                ecfg = replace(e, model=name, benchmarks=list(specs.values()), out=str(out), limit=limit,
                               n_samples=k, template=template, seed=seed)
                result = evaluate(ecfg, model, tok)
                parts.setdefault(part, {}).update({bench: result[spec] for bench, spec in specs.items()})
                scores = problem_scores(load_records(out / SAMPLES, "samples"))
                for bench, spec in specs.items():
                    problems.setdefault(bench, {}).update(scores.get(spec, {}))
                files.append(str((out / METRICS).relative_to(path)))
        metrics = {}
        for bench in plan.benchmarks:
            greedy = parts.get("greedy", parts.get("all"))[bench]
            sampled = parts.get("sampled", parts.get("all"))[bench]
            metrics[bench] = {"accuracy": greedy["accuracy"], "n": greedy["n"], "truncated": greedy["truncated"],
                              "pass_at_k": sampled["pass_at_k"], "maj_at_k": sampled["maj_at_k"],
                              "entropy": sampled["entropy"],
                              "n_sampled": sampled["n"] if sampled["n_samples"] else 0,
                              "n_samples": sampled["n_samples"]}
        self.counts["evaluated"] += 1
        return metrics, files, problems

    def curve(self, model: str, path: Path, seed: int, base: tuple[Any, Any] | None = None) -> tuple[list, list]:
        """The learning curve of a trained cell (each kept checkpoint, then the trained model), or the starting
        model's single point (``base``: its loaded model and tokenizer)."""
        if base is not None:
            points, final_step = [(0, 0.0, model, base)], None
        else:
            train_dir = path / "train"
            summary = json.loads((train_dir / SUMMARY).read_text())
            final = summary["global_step"]
            epochs = [h["epoch"] for h in summary["log_history"] if "epoch" in h]
            points = []
            for ckpt in sorted(train_dir.glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1])):
                step = int(ckpt.name.split("-")[1])
                if step < final:
                    state = json.loads((ckpt / "trainer_state.json").read_text())
                    points.append((step, state.get("epoch"), str(ckpt), None))
            points.append((final, epochs[-1] if epochs else None, str(train_dir), None))
            final_step = final
        out, files = [], []
        for step, epoch, ckpt, loaded in points:
            m, tok = loaded or load_model(ckpt, self.cfg.dtype, self.cfg.device)
            metrics, f, _ = self.evaluate_checkpoint(ckpt, m, tok, path, seed, self.curve_plan(step))
            files += f
            fraction = 0.0 if final_step is None else step / final_step
            scores = {b: {"accuracy": v["accuracy"], "entropy": v["entropy"]} for b, v in metrics.items()}
            out.append({"step": step, "epoch": epoch, "fraction": fraction, "metrics": scores})
        return out, files

    # -------------------------------------------------- one cell

    def run_cell(self, model: str, method: str, seed: int, loaded, setting: Setting | None = None) -> dict[str, Any]:
        """Train (or GRPO) and evaluate one cell; a tuning run (``setting``) is scored on the tuning split only."""
        path = cell_dir(self.cfg, model, method, seed, setting)
        h = self.cell_hash(model, method, seed, setting)
        done = finished_cell(path, h)
        if done:
            self.counts["skipped"] += 1
            return done
        base = {"model": model, "method": method, "seed": seed, "hash": h, "setting": setting,
                "train_hash": self.train_hash(model, method, seed, setting)}
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
                           else self.train_cell(model, method, seed, ckpt_dir, setting))
                seconds["train"] = time.time() - t0
                rec.update(status="trained", seconds=seconds)
                write_json_if_changed(path / CELL, rec)

            ckpt = str(ckpt_dir)
            m, tok = load_model(ckpt, self.cfg.dtype, self.cfg.device)
        problems: dict = {}
        if method.startswith(GRPO_PREFIX) and not self.cfg.evaluate_grpo:
            metrics, files = {}, []
        else:
            t1 = time.time()
            plan = self.tune_plan() if setting is not None else self.eval_plan()
            metrics, files, problems = self.evaluate_checkpoint(ckpt, m, tok, path, seed, plan)
            seconds["eval"] = time.time() - t1
        if setting is None and self.has_curve(method):
            t2 = time.time()
            rec["curve"], curve_files = self.curve(model, path, seed, (m, tok) if method == BASE else None)
            files += curve_files
            seconds["curve"] = time.time() - t2
        rec.update(status="finished", metrics=metrics, problems=problems, seconds=seconds,
                   files=[*rec.get("train_files", []), *files])
        write_json_if_changed(path / CELL, rec)
        accs = ", ".join(f"{b} {v['accuracy']:.3f}" for b, v in metrics.items())
        label = f"{method} {setting_slug(setting)}" if setting is not None else method
        self.log(f"[{model}] {label} seed {seed}: " + " ".join(f"{k} {v:.0f}s" for k, v in seconds.items())
                 + (f"; accuracy {accs}" if accs else ""))
        return rec

    def train_cell(self, model: str, method: str, seed: int, out: Path,
                   setting: Setting | None = None) -> dict[str, Any]:

        _, labels, _ = shared_paths(self.cfg, model)
        ref = self.cfg.rho1_reference if method == "rho1" else None
        if ref in self.cfg.methods:
            ref = str(cell_dir(self.cfg, model, ref, seed) / "train")
        summary = train(replace(self.cfg.train, model=model, input=str(labels), method=method, out=str(out),
                                resume=True, reference=ref),
                        CFTSFTConfig(**self.train_args(model, method, setting), seed=seed))
        self.counts["trained"] += 1
        tokens = {k: v for k, v in summary["tokens"].items() if k != "excluded_ids"}
        curve = [[h["step"], h["loss"]] for h in summary["log_history"] if "loss" in h]
        return {"train": {"global_step": summary["global_step"], "train_loss": summary["train_loss"],
                          "final_loss": summary["final_loss"], "tokens": tokens, "loss_curve": curve,
                          "seconds": summary["seconds"]},
                "train_files": [f"train/{SUMMARY}"]}

    def grpo_cell(self, model: str, method: str, seed: int, out: Path) -> dict[str, Any]:
        start = cell_dir(self.cfg, model, method[len(GRPO_PREFIX):], seed) / "train"
        summary = grpo_stage.grpo(replace(self.cfg.grpo, init=str(start), out=str(out), data=self.cfg.generate.data,
                                          resume=True), grpo_stage.CFTGRPOConfig(**self.cfg.grpo_args, seed=seed))
        self.counts["grpo"] += 1
        rows = [json.loads(line) for line in (out / grpo_stage.LOG).read_text().splitlines() if line.strip()]
        return {"grpo": {"global_step": summary.get("global_step"), "log": rows, "seconds": summary.get("seconds")},
                "train_files": [f"grpo/{grpo_stage.SUMMARY}", f"grpo/{grpo_stage.LOG}"]}

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
                    runs.append({"setting": point, "accuracy": m["accuracy"], "n": m["n"]})
            best = max(runs, key=lambda r: r["accuracy"]) if runs else None  # max keeps the first of equals
            out[method] = {"benchmark": t.benchmark, "seed": t.seed, "metric": "accuracy", "runs": runs,
                           "chosen": best["setting"] if best and len(runs) == len(grid_points(t)) else None,
                           "from": None}
        for method, source in t.share.items():
            out[method] = {**out[source], "runs": [], "from": source}
        return out

    def choose(self, model: str) -> None:
        """Fill ``chosen`` from the finished tuning runs (a method still being tuned stays unset)."""
        for method, rec in (self.tuning(model) or {}).items():
            if rec["chosen"] is not None:
                self.chosen.setdefault(model, {})[method] = rec["chosen"]

    def run_tuning(self, model: str, loaded) -> None:
        t = self.cfg.tune
        todo = self.tune_cells()
        for i, (method, point) in enumerate(todo, 1):
            self.log(f"[{model}] tuning {i}/{len(todo)}: {method} {setting_slug(point)} on {t.benchmark}")
            self.run_cell(model, method, t.seed, loaded, point)
        self.choose(model)
        for method, point in self.chosen.get(model, {}).items():
            self.log(f"[{model}] tuned {method}: {setting_slug(point)}")

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

    def run(self) -> dict[str, Any]:
        """Run every cell not done yet; after each one that did work the aggregate is rewritten, so a
        report can be made while the grid runs and a killed run leaves the statistics of what finished."""

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
            if self.cfg.tune:
                self.run_tuning(model, loaded)
            cells_t0, worked = time.time(), 0
            for i, (mdl, method, seed) in enumerate(todo, 1):
                pace = (time.time() - cells_t0) / worked if worked else None  # of the cells this run did
                eta = "?" if pace is None else clock(pace * (len(todo) - i + 1))
                self.log(f"[{mdl}] cell {i}/{len(todo)}: {method} seed {seed} (elapsed {clock(time.time() - t0)}, "
                         f"ETA {eta})")
                skipped = self.counts["skipped"]
                self.run_cell(mdl, method, seed, loaded)
                if self.counts["skipped"] == skipped:
                    worked += 1
                    self.write_aggregate(*self.collect())
        for name, sub in self.cfg.ablations.items():
            changes = yaml.safe_dump(self.cfg.ablation_overrides[name], default_flow_style=True).strip()
            self.log(f"ablation {name}: {changes}")
            runner = Runner(sub, self.log, self.chosen)
            runner.run()
            for key, value in runner.counts.items():
                self.counts[key] += value
        return self.write_aggregate(*self.collect())

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
                                             "metrics", "curve")} for c in cells],
        }
        tuning = {m: t for m in self.cfg.models if (t := self.tuning(m))}
        if tuning:
            result["tuning"] = tuning
        curves = self.curves(cells)
        if curves:
            result["curves"] = curves
        if self.cfg.compare:
            result["bootstrap"] = self.bootstrap(cells)
        if self.cfg.ablations:
            result["ablations"] = {}
            for name, sub in self.cfg.ablations.items():
                runner = Runner(sub, self.log, self.chosen)
                cells_, shared_ = runner.collect()
                agg = runner.write_aggregate(cells_, shared_)
                keys = ("results", "shared", "bootstrap", "finished_cells", "planned_cells")
                result["ablations"][name] = {"overrides": self.cfg.ablation_overrides[name],
                                             **{k: agg[k] for k in keys if k in agg}}
        write_json_if_changed(self.out / AGGREGATE, result)
        return result

    def curves(self, cells: list[dict[str, Any]]) -> dict[str, Any]:
        """Per model and method: each seed's curve points, and per point the statistics over seeds; the
        starting model's point (fraction 0) opens every method's curve."""
        out: dict[str, Any] = {}
        for model in self.cfg.models:
            base = next((c["curve"] for c in cells if c["model"] == model and c["method"] == BASE and c.get("curve")),
                        [])
            for method in self.curve_methods():
                seeds = {str(c["seed"]): base + c["curve"] for c in cells
                         if c["model"] == model and c["method"] == method and c.get("curve")}
                if not seeds:
                    continue
                n_points = min(len(v) for v in seeds.values())
                points = []
                for i in range(n_points):
                    at = [v[i] for v in seeds.values()]
                    benches = at[0]["metrics"]
                    points.append({
                        "fraction": at[0]["fraction"], "step": at[0]["step"],
                        "epoch": at[0]["epoch"],
                        "metrics": {b: {k: summarize([p["metrics"][b][k] for p in at if p["metrics"][b][k] is not None])
                                        for k in ("accuracy", "entropy")} for b in benches}})
                out.setdefault(model, {})[method] = {"points": points, "seeds": seeds}
        return out

    def bootstrap(self, cells: list[dict[str, Any]]) -> dict[str, Any]:
        """``compare``'s paired bootstrap over problems and seeds, per model, benchmark and metric."""
        out: dict[str, Any] = {}
        for model in self.cfg.models:
            by: dict[str, dict[int, dict]] = {}
            for c in cells:
                if c["model"] == model and c.get("problems"):
                    by.setdefault(c["method"], {})[c["seed"]] = c["problems"]
            for item in self.cfg.compare:
                a, b = (m.strip() for m in item.split(" vs "))
                if a not in by or b not in by:
                    continue
                for bench in self.cfg.benchmarks:
                    metrics = set.intersection(*(set(p.get(bench, {})) for side in (by[a], by[b])
                                                 for p in side.values()))
                    row = {}
                    for metric in sorted(metrics, key=lambda k: (k != "accuracy", len(k), k)):
                        try:
                            row[metric] = paired_bootstrap({s: p[bench][metric] for s, p in by[a].items()},
                                                           {s: p[bench][metric] for s, p in by[b].items()},
                                                           resamples=self.cfg.bootstrap_resamples)
                        except ValueError as exc:  # e.g. seeds with different problems: say so, do not guess
                            row[metric] = {"error": str(exc)}
                    out.setdefault(model, {}).setdefault(bench, {})[f"{a} vs {b}"] = row
        return out


def run_experiment(cfg: ExperimentConfig, log=print) -> tuple[dict[str, Any], dict[str, int]]:
    """Run (or resume) the whole grid; returns the aggregate and what this call actually did."""
    runner = Runner(cfg, log)
    return runner.run(), runner.counts


# ---------------------------------------------------------------- printing and CLI


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
    for model, methods in result.get("tuning", {}).items():
        for method, t in methods.items():
            if t.get("chosen") is not None:
                source = f" (setting of {t['from']})" if t.get("from") else ""
                console.print(f"{model} {method}: tuned on {t['benchmark']}: {setting_slug(t['chosen'])}{source}")
    for model, benches in result.get("bootstrap", {}).items():
        for bench, rows in benches.items():
            for comparison, metrics in rows.items():
                shown = ", ".join(f"{k} {fmt_bootstrap(v)}" for k, v in metrics.items() if "error" not in v)
                console.print(f"{model} {bench} {comparison} (paired bootstrap over problems and seeds, "
                              f"points): {shown}")


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (see configs/experiment/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override config entries, e.g. seeds=[0,1] train.lr=1e-4 eval.limit=50 out=runs/x "
                        "(options go before CONFIG or after the overrides)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and the cells; run nothing")
    p.add_argument("--aggregate-only", action="store_true",
                   help="aggregate the cells finished so far (e.g. while another process runs the grid); run nothing")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(yaml.safe_dump(config_dict(cfg), sort_keys=False))
        print_plan(Runner(cfg))
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
    print_aggregate(result)
    print(f"experiment finished in {time.time() - t0:.0f}s: {work_done(counts)}; "
          f"aggregate in {Path(cfg.out) / AGGREGATE}")
    return 0


def print_plan(runner: Runner, prefix: str = "") -> None:
    """Every cell with its state: tuning runs first, then the grid (cells that wait for a method's tuned
    setting are 'todo'), then each ablation's."""
    cfg = runner.cfg
    for model in cfg.models:
        runner.choose(model)
        for method, point in runner.tune_cells():
            done = runner.finished(model, method, cfg.tune.seed, point)
            print(f"{prefix}{'done' if done else 'todo'}  {model}  tune {method} {setting_slug(point)}")
    for model, method, seed in runner.plan():
        tuned = method in runner.tuned_methods() and method not in runner.chosen.get(model, {})
        done = not tuned and runner.finished(model, method, seed)
        print(f"{prefix}{'done' if done else 'todo'}  {model}  {method}  seed {seed}")
    for name, sub in cfg.ablations.items():
        print_plan(Runner(sub, chosen=runner.chosen), f"{prefix}[{name}] ")


def work_done(counts: dict[str, int]) -> str:
    return (f"{counts['trained']} trained, {counts['grpo']} GRPO runs, {counts['evaluated']} evaluated, "
            f"{counts['skipped']} cells already done")
