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

The runner is split by concern: ``cft.grid`` plans the cells and hashes them (``Grid``), this module's
``Runner`` (a ``Grid``) executes them, and ``cft.aggregation`` summarises the finished ones beside
``cft.stats``.

Aggregation (``OUT/aggregate.json``, also printed): per model, benchmark and method, and per metric (greedy
accuracy, pass@k, maj@k, entropy), the mean over seeds, the sample standard deviation, a 95% confidence
interval from the t distribution, and the paired difference against the baseline method (default SFT) of the
same seed with its own t interval. GRPO cells are compared with ``grpo:<baseline>`` (``cft.stats``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from cft import grpo as grpo_stage
from cft.aggregation import AGGREGATE, write_aggregate
from cft.artifacts import load_records, read_meta
from cft.data import is_generated, load_problems
from cft.evaluate import METRICS, SAMPLES, evaluate, problem_scores
from cft.experiment_config import ExperimentConfig, config_dict, load_config
from cft.generate import generate
from cft.grid import (
    BASE,
    CELL,
    RESOLVED,
    EvalPlan,
    Grid,
    Setting,
    cell_dir,
    claim_cell,
    finished_cell,
    read_cell,
    setting_slug,
    shared_paths,
    slug,
    write_json_if_changed,
)
from cft.identify import identify
from cft.models import load_model, machine
from cft.progress import clock
from cft.stats import GRPO_PREFIX, fmt_bootstrap, fmt_diff, fmt_stat, headline_metrics
from cft.train import SUMMARY, CFTSFTConfig, train


def benchmark_input(cfg: ExperimentConfig, bench: str, n: int | None) -> tuple[str, str | None]:
    """(spec to evaluate, template). Generated splits (testbed:, arith:) are drawn once (``eval_data_seed``)
    and written to ``OUT/data`` so that the evaluation seed changes only the sampling, never the problems."""
    if not is_generated(bench):
        return bench, cfg.eval.template
    path = Path(cfg.out) / "data" / f"{slug(bench)}-s{cfg.eval_data_seed}-n{n or 'all'}.jsonl"
    if not path.exists():
        problems = load_problems(bench, seed=cfg.eval_data_seed, limit=n)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n"
                               for p in problems))
        tmp.replace(path)
    return str(path), cfg.eval.template or "chat"


SCORES = 2
"""The version of a cell record's per-problem scores (``problems``, for the paired bootstrap). Version 1 (no
``scores`` field) took the greedy accuracy from the sampled part where sampling covered fewer problems than
the greedy decode, so its bootstrap of accuracy saw only the sampled problems; a rerun scores such cells
again from their sample files, decoding nothing."""


def eval_parts(cfg: ExperimentConfig, plan: EvalPlan) -> list[tuple[str, int | None, int, dict[str, str], str]]:
    """The ``evaluate`` calls of one evaluation: (part, limit, samples, {benchmark: spec}, template) each.

    The benchmarks that share a prompt template are decoded in one call (one batching, as ``cft eval`` with
    several benchmarks does). Where sampling covers fewer problems or benchmarks than the greedy decode, the
    greedy part and the sampled part are separate calls (the sampled part decodes its problems greedily
    too, and only its samples count)."""
    n_samples = plan.n_samples
    together = n_samples == 0 or (plan.sampled == plan.limit and plan.sample_only is None)
    runs = [("all", plan.limit, n_samples, plan.benchmarks)] if together else [
        ("greedy", plan.limit, 0, plan.benchmarks), ("sampled", plan.sampled, n_samples, plan.sampled_benchmarks)]
    n = max(x for x in (plan.limit, plan.sampled, 0) if x is not None) or None
    groups: dict[str | None, dict[str, str]] = {}  # template -> benchmark -> spec
    for bench in plan.benchmarks:
        spec, template = benchmark_input(cfg, bench, n)
        groups.setdefault(template, {})[bench] = spec
    parts = []
    for template, specs in groups.items():
        for part, limit, k, benches in runs:
            chosen = {bench: spec for bench, spec in specs.items() if bench in benches}
            if chosen:
                parts.append((part, limit, k, chosen, template))
    return parts


def part_dir(path: Path, plan: EvalPlan, part: str, template: str | None) -> Path:
    return path / plan.sub / slug(template or "default") / part


def score_problems(path: Path, plan: EvalPlan, parts: list) -> dict[str, dict[str, dict[str, float]]]:
    """Each problem's scores per benchmark (``cft.evaluate.problem_scores``), read back from the sample files of
    the evaluation's ``parts`` (``eval_parts``), for the paired bootstrap: greedy correctness from the greedy
    decode of all ``plan.limit`` problems, pass@k from the samples."""
    problems: dict[str, dict[str, dict[str, float]]] = {}
    for part, _, _, chosen, template in parts:
        scores = problem_scores(load_records(part_dir(path, plan, part, template) / SAMPLES, "samples"))
        for bench, spec in chosen.items():
            got = scores.get(spec, {})
            if part == "sampled":  # its greedy decode covers only the sampled problems
                got = {k: v for k, v in got.items() if k != "accuracy"}
            problems.setdefault(bench, {}).update(got)
    return problems


def evaluate_checkpoint(cfg: ExperimentConfig, name: str, model, tok, path: Path, seed: int,
                        plan: EvalPlan) -> tuple[dict, list[str], dict, dict]:
    """Metrics per benchmark (greedy accuracy on ``plan.limit`` problems, sampling on ``plan.sampled``), the
    files, each problem's scores (``score_problems``) for the paired bootstrap, and the seconds and tokens
    decoded."""
    parts: dict[str, dict[str, dict]] = {}  # part -> benchmark -> metrics
    decoded = {"seconds": 0.0, "decoded_tokens": 0}  # what this call decoded (a resumed evaluation: the rest)
    files = []
    parts_run = eval_parts(cfg, plan)
    for part, limit, k, chosen, template in parts_run:
        out = part_dir(path, plan, part, template)
        ecfg = replace(cfg.eval, model=name, benchmarks=list(chosen.values()), out=str(out), limit=limit,
                       n_samples=k, template=template, seed=seed)
        result = evaluate(ecfg, model, tok)
        parts.setdefault(part, {}).update({bench: result[spec] for bench, spec in chosen.items()})
        files.append(str((out / METRICS).relative_to(path)))
        timing = read_meta(out / SAMPLES).get("timing") or {}
        for key in ("seconds", "decoded_tokens"):
            decoded[key] += timing.get(key, 0)
    metrics = {}
    for bench in plan.benchmarks:
        greedy = parts.get("greedy", parts.get("all"))[bench]
        sampled = parts.get("sampled", parts.get("all", {})).get(bench, greedy)  # greedy only: no samples
        metrics[bench] = {"accuracy": greedy["accuracy"], "n": greedy["n"], "truncated": greedy["truncated"],
                          "pass_at_k": sampled["pass_at_k"], "maj_at_k": sampled["maj_at_k"],
                          "entropy": sampled["entropy"],
                          "n_sampled": sampled["n"] if sampled["n_samples"] else 0,
                          "n_samples": sampled["n_samples"]}
    return metrics, files, score_problems(path, plan, parts_run), decoded


def link_training(twin: Path, out: Path) -> dict[str, Any]:
    """A tuning run's trained model, hard-linked (copied across file systems) into ``out``, and its record's
    training entries (``Grid.tuning_twin``: the same training, so nothing is trained again)."""
    rec = read_cell(twin)
    if out.exists():
        shutil.rmtree(out)
    try:
        shutil.copytree(twin / "train", out, copy_function=os.link)
    except OSError:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(twin / "train", out)
    return {"train": rec["train"], "train_files": rec["train_files"]}


class Runner(Grid):
    """Runs the grid (``Grid``'s cells); loads models only for work that is not done yet."""

    def __init__(self, cfg: ExperimentConfig, log=print, chosen: dict[str, dict[str, Setting]] | None = None):
        super().__init__(cfg, chosen)
        self.log = log
        self.out = Path(cfg.out)
        self.counts = {"trained": 0, "evaluated": 0, "grpo": 0, "skipped": 0}

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
               "seconds": {"generate": t1 - t0, "identify": time.time() - t1},
               "sittings": {"generate": read_meta(gen_path).get("sittings"),
                            "identify": read_meta(labels_path).get("sittings")}}
        write_json_if_changed(marker, rec)
        return rec

    # -------------------------------------------------- evaluation

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
            m, tok = loaded or load_model(ckpt, self.cfg.eval.dtype, self.cfg.device)
            metrics, f, _, _ = evaluate_checkpoint(self.cfg, ckpt, m, tok, path, seed, self.curve_plan(step))
            self.counts["evaluated"] += 1
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
            return self.rescored(path, done, setting)
        base = {"model": model, "method": method, "seed": seed, "hash": h, "setting": setting,
                "train_hash": self.train_hash(model, method, seed, setting)}
        rec = claim_cell(path, base)
        seconds = dict(rec.get("seconds", {}))
        t0 = time.time()
        if method == BASE:
            m, tok = loaded() if self.cfg.eval.dtype == self.cfg.dtype else load_model(
                model, self.cfg.eval.dtype, self.cfg.device)
            ckpt = model
        else:
            ckpt_dir = path / ("grpo" if method.startswith(GRPO_PREFIX) else "train")
            if rec["status"] != "trained":
                twin = None if setting is not None else self.tuning_twin(model, method, seed, base["train_hash"])
                if twin is not None:
                    rec.update(link_training(twin, ckpt_dir), trained_by=str(twin.relative_to(self.out)))
                    self.log(f"[{model}] {method} seed {seed}: trained by the tuning run {rec['trained_by']} "
                             f"(the same training hash); its model reused")
                else:
                    rec.update(self.grpo_cell(model, method, seed, ckpt_dir) if method.startswith(GRPO_PREFIX)
                               else self.train_cell(model, method, seed, ckpt_dir, setting))
                seconds["train"] = time.time() - t0
                rec.update(status="trained", seconds=seconds)
                write_json_if_changed(path / CELL, rec)

            ckpt = str(ckpt_dir)
            m, tok = load_model(ckpt, self.cfg.eval.dtype, self.cfg.device)
        problems: dict = {}
        if method.startswith(GRPO_PREFIX) and not self.cfg.evaluate_grpo:
            metrics, files = {}, []
        else:
            t1 = time.time()
            plan = self.tune_plan() if setting is not None else self.eval_plan()
            metrics, files, problems, decoded = evaluate_checkpoint(self.cfg, ckpt, m, tok, path, seed, plan)
            self.counts["evaluated"] += 1
            seconds["eval"] = time.time() - t1
            rec.update(eval_decoded=decoded, machine=machine())
        if setting is None and self.has_curve(method):
            t2 = time.time()
            rec["curve"], curve_files = self.curve(model, path, seed, (m, tok) if method == BASE else None)
            files += curve_files
            seconds["curve"] = time.time() - t2
        rec.update(status="finished", metrics=metrics, problems=problems, scores=SCORES, seconds=seconds,
                   files=[*rec.get("train_files", []), *files])
        write_json_if_changed(path / CELL, rec)
        accs = ", ".join(f"{b} {v['accuracy']:.3f}" for b, v in metrics.items())
        label = f"{method} {setting_slug(setting)}" if setting is not None else method
        self.log(f"[{model}] {label} seed {seed}: " + " ".join(f"{k} {v:.0f}s" for k, v in seconds.items())
                 + (f"; accuracy {accs}" if accs else ""))
        return rec

    def rescored(self, path: Path, rec: dict[str, Any], setting: Setting | None) -> dict[str, Any]:
        """A finished cell whose per-problem scores predate ``SCORES``, scored again from its sample files."""
        if rec.get("scores") == SCORES or not rec.get("problems"):
            return rec
        plan = self.tune_plan() if setting is not None else self.eval_plan()
        rec = {**rec, "problems": score_problems(path, plan, eval_parts(self.cfg, plan)), "scores": SCORES}
        write_json_if_changed(path / CELL, rec)
        self.log(f"[{rec['model']}] {rec['method']} seed {rec['seed']}: per-problem scores made again from its "
                 f"samples (version {SCORES})")
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
        return {"grpo": {"global_step": summary.get("global_step"), "log": rows, "seconds": summary.get("seconds"),
                         "steps_per_pass": summary.get("steps_per_pass")},
                "train_files": [f"grpo/{grpo_stage.SUMMARY}", f"grpo/{grpo_stage.LOG}"]}

    def run_tuning(self, model: str, loaded) -> None:
        t = self.cfg.tune
        todo = self.tune_cells()
        for i, (method, point) in enumerate(todo, 1):
            self.log(f"[{model}] tuning {i}/{len(todo)}: {method} {setting_slug(point)} on {t.benchmark}")
            self.run_cell(model, method, t.seed, loaded, point)
        self.choose(model)
        for method, point in self.chosen.get(model, {}).items():
            self.log(f"[{model}] tuned {method}: {setting_slug(point)}")


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


    def write_aggregate(self, cells: list[dict[str, Any]], shared: dict[str, Any]) -> dict[str, Any]:
        """``aggregation.write_aggregate`` of this grid."""
        return write_aggregate(self, cells, shared)


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
