"""``cft report RUN_DIR``: ``report.md`` and a self-contained ``report.html`` with plots of a run.

Reads the ``aggregate.json`` of a ``cft experiment`` folder (``cft demo`` writes one too) and draws, with
matplotlib's Agg backend: accuracy by method with 95% intervals over seeds (in-distribution and OOD), paired
differences against the baseline, pass@k and maj@k curves, output entropy, critical-token statistics by
token kind, training loss curves and, when present, GRPO reward and entropy over seeds, the hyperparameter
tuning grid, learning curves over training, paired bootstrap intervals over problems and seeds, and ablations.
The PNGs go to ``RUN_DIR/report/``; the HTML embeds them as base64 so it opens offline, anywhere.

Both documents are rendered from one list of blocks (heading, text, table, figure), so they always say
the same thing.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cft.aggregation import AGGREGATE
from cft.config import from_args, option
from cft.experiment_config import SECTIONS
from cft.extras import require
from cft.grid import BASE
from cft.stats import (
    GRPO_PREFIX,
    fmt_bootstrap,
    fmt_diff,
    fmt_number,
    fmt_overrides,
    fmt_stat,
    headline_metrics,
    paired,
    pass_means,
    reference_method,
    summarize,
)

PLOTS = "report"
MAIN = "(main)"  # the ablation table's row name of the experiment itself
SMOOTH = 5  # moving-average window of the GRPO curves (steps)


@dataclass
class RunData:
    """What a report shows. ``stats[bench][method][metric]`` and ``paired[...]`` are ``cft.stats.summarize``/
    ``paired`` dicts; one-seed runs have no intervals."""

    title: str
    benchmarks: list[str]
    methods: list[str]
    stats: dict[str, dict[str, dict[str, dict]]]
    paired: dict[str, dict[str, dict[str, dict]]] = field(default_factory=dict)
    baseline: str | None = None
    critical: dict[str, dict] = field(default_factory=dict)  # model -> critical_fraction, critical_by_kind
    loss_curves: dict[str, list[list[tuple[int, float]]]] = field(default_factory=dict)  # method -> one per seed
    grpo_logs: dict[str, list[list[dict]]] = field(default_factory=dict)  # method -> one log per seed
    grpo_per_pass: dict[str, list[int | None]] = field(default_factory=dict)  # method -> steps per pass, per seed
    setup: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    # The optional sections of aggregate.json, as written there (model-keyed; see load_experiment).
    tuning: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)
    bootstrap: dict[str, Any] = field(default_factory=dict)
    ablations: dict[str, Any] = field(default_factory=dict)  # the main run first, as "(main)", when any
    costs: list[list[str]] = field(default_factory=list)  # the costs table's rows (``cost_rows``), header first
    machines: list[str] = field(default_factory=list)  # the machines the cells ran on, one line each


# ---------------------------------------------------------------- loading


def _label(model: str, bench: str, n_models: int) -> str:
    return bench if n_models == 1 else f"{model} · {bench}"


def load_experiment(run_dir: Path) -> RunData:
    agg = json.loads((run_dir / AGGREGATE).read_text())
    cfg = agg["config"]
    results = agg["results"]
    n_models = len(results)
    stats, paired_stats, methods = {}, {}, []
    for model, benches in results.items():
        for bench, rows in benches.items():
            label = _label(model, bench, n_models)
            stats[label] = {m: r["metrics"] for m, r in rows.items()}
            paired_stats[label] = {m: r["paired"] for m, r in rows.items() if r["paired"]}
            methods += [m for m in rows if m not in methods]
    loss_curves: dict[str, list] = {}
    grpo_logs: dict[str, list] = {}
    grpo_per_pass: dict[str, list] = {}
    for cell in agg["cells"]:
        name = cell["method"] if n_models == 1 else f"{cell['model']}/{cell['method']}"
        if cell.get("train") and cell["train"].get("loss_curve"):
            loss_curves.setdefault(name, []).append([tuple(p) for p in cell["train"]["loss_curve"]])
        if cell.get("grpo") and cell["grpo"].get("log"):
            grpo_logs.setdefault(name, []).append(cell["grpo"]["log"])
            grpo_per_pass.setdefault(name, []).append(cell["grpo"].get("steps_per_pass"))
    setup = [f"models: {', '.join(cfg['models'])}; methods: {', '.join(cfg['methods'])}; seeds: {cfg['seeds']}; "
             f"benchmarks: {', '.join(cfg['benchmarks'])}; rho1 reference: {cfg['rho1_reference']}"]
    for section in SECTIONS:  # the stage configs' non-default fields, whatever they are named
        if section == "grpo" and not cfg.get("grpo_from"):
            continue
        values = cfg.get(section) or {}
        setup.append(f"{section}: {', '.join(f'{k}={v}' for k, v in values.items()) or 'the stage defaults'}")
    if cfg.get("sample_limit") is not None:
        which = ", ".join(cfg.get("sample_benchmarks") or []) or "each benchmark"
        setup.append(f"pass@k, maj@k and entropy on the first {cfg['sample_limit']} problems of {which}")
    if cfg.get("grpo_from"):
        setup.append(f"GRPO from {', '.join(cfg['grpo_from'])}, seeds {cfg.get('grpo_seeds') or cfg['seeds']}")
    for model, s in agg.get("shared", {}).items():
        setup.append(f"{model}: D_correct = {s['d_correct']} of {s['train_problems']} training problems")
    ablations = {}
    if agg.get("ablations"):  # the main run is the reference row of the ablation table
        ablations = {MAIN: {"overrides": {}, "results": results, "shared": agg.get("shared", {}),
                            "bootstrap": agg.get("bootstrap", {}), "finished_cells": agg.get("finished_cells"),
                            "planned_cells": agg.get("planned_cells")}, **agg["ablations"]}
    return RunData(
        title=f"cft experiment: {run_dir}", benchmarks=list(stats), methods=methods, stats=stats,
        paired=paired_stats, baseline=agg["baseline"], loss_curves=loss_curves, grpo_logs=grpo_logs,
        grpo_per_pass=grpo_per_pass,
        critical={m: {"critical_fraction": s["critical_fraction"], "critical_by_kind": s["critical_by_kind"]}
                  for m, s in agg.get("shared", {}).items()},
        setup=setup, missing=[f"{meth} seed {seed}" if n_models == 1 else f"{m}/{meth} seed {seed}"
                              for m, meth, seed in agg.get("missing_cells", [])],
        models=list(results), tuning=agg.get("tuning") or {}, curves=agg.get("curves") or {},
        bootstrap=agg.get("bootstrap") or {}, ablations=ablations, costs=cost_rows(agg),
        machines=sorted({", ".join(f"{k} {v}" for k, v in c["machine"].items())
                         for c in agg["cells"] if c.get("machine")}))


def cost_rows(agg: dict[str, Any]) -> list[list[str]]:
    """Per stage: runs, wall seconds, seconds per run, decoded tokens and tokens/s, from the records the runs
    wrote (stages A and B: each sitting, or only the one that finished them in a record made before sittings;
    a cell: its own training and evaluation)."""
    rows: list[list[str]] = []

    def add(stage: str, seconds: list[float], tokens: int | None = None) -> None:
        if not seconds:
            return
        total = sum(seconds)
        rows.append([stage, str(len(seconds)), f"{total:,.0f}", f"{total / len(seconds):,.0f}",
                     "" if tokens is None else f"{tokens:,}",
                     f"{tokens / max(total, 1e-9):,.0f}" if tokens else ""])  # nothing decoded: no rate

    for model, s in agg.get("shared", {}).items():
        sec, sittings = s.get("seconds") or {}, s.get("sittings") or {}
        for stage, name in (("generate", "A (generate)"), ("identify", "B (identify)")):
            tokens = (s.get("decoded_tokens") or {}).get(stage)
            if sittings.get(stage):  # every sitting of a resumed stage, one run each
                add(f"{model}: {name}, sittings", [x["seconds"] for x in sittings[stage]], tokens)
            elif stage in sec:  # a record made before cft kept sittings: the one that finished the stage
                add(f"{model}: {name}, last sitting", [sec[stage]], tokens)
    tuning = [r for t in (agg.get("tuning") or {}).values() for m in t.values() for r in m["runs"]
              if r.get("seconds")]
    add("tuning: training", [r["seconds"].get("train", 0.0) for r in tuning])
    add("tuning: evaluation", [r["seconds"].get("eval", 0.0) for r in tuning],
        sum((r.get("eval_decoded") or {}).get("decoded_tokens", 0) for r in tuning))
    cells = [c for c in agg["cells"] if c.get("status") == "finished" and c.get("seconds")]
    grpo = [c for c in cells if c["method"].startswith(GRPO_PREFIX)]
    trained = [c for c in cells if c["method"] != BASE and c not in grpo and not c.get("trained_by")]
    add("training (C)", [c["seconds"].get("train", 0.0) for c in trained])
    add("GRPO", [c["seconds"].get("train", 0.0) for c in grpo])
    evaluated = [c for c in cells if c.get("eval_decoded")]
    add("evaluation (D)", [c["eval_decoded"]["seconds"] for c in evaluated],
        sum(c["eval_decoded"]["decoded_tokens"] for c in evaluated))
    return [["stage", "runs", "seconds", "per run", "decoded tokens", "tok/s"], *rows] if rows else []


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    if not (run_dir / AGGREGATE).exists():
        raise FileNotFoundError(f"{run_dir} holds no {AGGREGATE} (written by cft experiment and cft demo)")
    return load_experiment(run_dir)


# ---------------------------------------------------------------- plots


def _pyplot():
    require("matplotlib", "drawing the report's plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = {"base": "#7f7f7f", "sft": "#1f77b4", "cft": "#d62728", "random": "#ff7f0e", "entropy": "#2ca02c",
          "numeric": "#9467bd", "rho1": "#8c564b", "dft": "#e377c2", "attn": "#393b79", "grpo:sft": "#17becf",
          "grpo:cft": "#bcbd22"}


def color(method: str, index: int) -> str:
    """The same colour for a method in every plot (tab10 by position for names not listed)."""
    return COLORS.get(method.rsplit("/", 1)[-1], f"C{index % 10}")


def _ks(data: RunData, bench: str, prefix: str = "pass@") -> list[int]:
    """The k of every ``prefix``-metric (pass@k, maj@k) any method has on ``bench``."""
    return sorted({int(k[len(prefix):]) for row in data.stats[bench].values() for k in row if k.startswith(prefix)})


def _mean_err(stat: dict | None) -> tuple[float, float]:
    if not stat or stat.get("mean") is None:
        return float("nan"), 0.0
    return stat["mean"], stat.get("half_width") or 0.0


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def bar_plot(data: RunData, metric: str, ylabel: str, path: Path, scale: float = 100.0) -> Path:
    """One panel per benchmark: the metric's mean per method with its 95% interval over seeds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(data.benchmarks), figsize=(4.2 * len(data.benchmarks), 3.6), squeeze=False)
    for ax, bench in zip(axes[0], data.benchmarks):
        methods = [m for m in data.methods if metric in data.stats[bench].get(m, {})]
        means, errs = zip(*[_mean_err(data.stats[bench][m][metric]) for m in methods]) if methods else ((), ())
        x = range(len(methods))
        colors = [color(m, data.methods.index(m)) for m in methods]
        ax.bar(x, [scale * v for v in means], yerr=[scale * e for e in errs], capsize=3, color=colors)
        for i, v, e in zip(x, means, errs):
            ax.annotate(f"{scale * v:.1f}" if scale != 1 else f"{v:.3f}", (i, scale * (v + e)), ha="center",
                        va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(list(x), methods, rotation=45, ha="right")
        ax.set_title(bench)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{ylabel} by method (error bars: 95% t interval over seeds)", fontsize=10)
    return _save(fig, path)


def diff_plot(data: RunData, metric: str, path: Path) -> Path | None:
    """Forest plot: paired difference against the baseline, per method, with its 95% interval."""
    rows = [(b, m, d[metric]) for b in data.benchmarks for m, d in data.paired.get(b, {}).items()
            if metric in d and d[metric].get("ci95")]
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(data.benchmarks), figsize=(4.2 * len(data.benchmarks), 3.6), squeeze=False,
                             sharey=True)
    methods = list(dict.fromkeys(m for _, m, _ in rows))
    for ax, bench in zip(axes[0], data.benchmarks):
        for i, method in enumerate(methods):
            d = data.paired.get(bench, {}).get(method, {}).get(metric)
            if not d or not d.get("ci95"):
                continue
            lo, hi = d["ci95"]
            ax.errorbar(100 * d["mean"], i, xerr=[[100 * (d["mean"] - lo)], [100 * (hi - d["mean"])]], fmt="o",
                        color="#d62728" if d["excludes_zero"] else "#1f77b4", capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(methods)), methods)
        ax.set_title(bench)
        ax.set_xlabel(f"Δ {metric} vs {data.baseline} (points)")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"paired difference in {metric} against {data.baseline}, same seed (red: 95% interval excludes 0)",
                 fontsize=10)
    return _save(fig, path)


LADDERS = {"pass@": "pass@k (unbiased estimator; error bars: 95% interval over seeds)",
           "maj@": "maj@k: accuracy of the majority answer of k samples (mean over all k-subsets; error bars: 95% "
                   "interval over seeds)"}


def ladder_plot(data: RunData, prefix: str, path: Path) -> Path | None:
    """pass@k or maj@k against k, one curve per method, one panel per benchmark."""
    if not any(_ks(data, b, prefix) for b in data.benchmarks):
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(data.benchmarks), figsize=(4.6 * len(data.benchmarks), 3.6), squeeze=False)
    for ax, bench in zip(axes[0], data.benchmarks):
        ks = _ks(data, bench, prefix)
        for i, method in enumerate(data.methods):
            row = data.stats[bench].get(method, {})
            points = [(k, *_mean_err(row.get(f"{prefix}{k}"))) for k in ks if f"{prefix}{k}" in row]
            if not points:
                continue
            k, mean, err = zip(*points)
            ax.errorbar(k, [100 * v for v in mean], yerr=[100 * e for e in err], marker="o", ms=3, capsize=2,
                        label=method, color=color(method, i), lw=2 if method in ("sft", "cft") else 1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k")
        ax.set_ylabel(f"{prefix}k (%)")
        ax.set_title(bench)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(LADDERS[prefix], fontsize=10)
    return _save(fig, path)


def critical_plot(data: RunData, path: Path) -> Path | None:
    if not data.critical:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(data.critical), figsize=(4.6 * len(data.critical), 3.4), squeeze=False)
    for ax, (model, c) in zip(axes[0], data.critical.items()):
        kinds = list(c["critical_by_kind"])
        fracs = [c["critical_by_kind"][k]["fraction"] for k in kinds]
        ax.bar(kinds, [100 * f for f in fracs], color="#d62728")
        for i, k in enumerate(kinds):
            v = c["critical_by_kind"][k]
            ax.annotate(f"{v['critical']}/{v['tokens']}", (i, 100 * v["fraction"]), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.axhline(100 * c["critical_fraction"], color="black", ls="--", lw=0.8,
                   label=f"all tokens {c['critical_fraction']:.1%}")
        ax.set_ylabel("critical tokens (% of tested positions)")
        ax.set_title(model)
        ax.legend(fontsize=8)
    fig.suptitle("stage B: share of response tokens that are critical, by token kind", fontsize=10)
    return _save(fig, path)


def seed_band(runs: list[list[tuple[float, float]]]) -> tuple[list[float], list[dict]]:
    """Per x any seed has: ``summarize`` of the seeds' values there (one ``(x, value)`` series per seed)."""
    by_x: dict[float, list[float]] = {}
    for run in runs:
        for x, v in run:
            by_x.setdefault(x, []).append(v)
    xs = sorted(by_x)
    return xs, [summarize(by_x[x]) for x in xs]


def band(ax, xs: list[float], stats: list[dict | None], c: str, label: str | None, scale: float = 1.0,
         lw: float = 1.8) -> None:
    """The mean over seeds as a line and, where there are 2+ seeds, the 95% t interval (``ci95``) shaded."""
    pts = [(x, s) for x, s in zip(xs, stats) if s and s.get("mean") is not None]
    if not pts:
        return
    xs, stats = zip(*pts)
    ax.plot(xs, [scale * s["mean"] for s in stats], color=c, lw=lw, label=label, marker="o" if len(xs) < 12 else None,
            ms=3)
    has = [bool(s.get("ci95")) for s in stats]
    if any(has):
        lo = [scale * s["ci95"][0] if h else float("nan") for s, h in zip(stats, has)]
        hi = [scale * s["ci95"][1] if h else float("nan") for s, h in zip(stats, has)]
        ax.fill_between(xs, lo, hi, where=has, color=c, alpha=0.2, lw=0)


def loss_plot(data: RunData, path: Path) -> Path | None:
    if not data.loss_curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (method, runs) in enumerate(data.loss_curves.items()):
        c = color(method, i)
        for run in runs:
            ax.plot(*zip(*run), color=c, alpha=0.25, lw=0.8)
        steps, stats = seed_band(runs)
        ax.plot(steps, [s["mean"] for s in stats], color=c, lw=1.8, label=method)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean over the trained tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("training loss (thin: each seed; thick: mean). Methods train different tokens, so levels "
                 "are not comparable", fontsize=8)
    return _save(fig, path)


def _smooth(values: list[float], window: int = SMOOTH) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def grpo_series(logs: list[list[dict]], key: str) -> tuple[list[float], list[dict]]:
    """Per GRPO step: ``summarize`` over seeds of each seed's ``SMOOTH``-step moving average of ``key``."""
    runs = []
    for rows in logs:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            steps, values = zip(*pts)
            runs.append(list(zip(steps, _smooth(list(values)))))
    return seed_band(runs)


def grpo_plot(data: RunData, path: Path) -> Path | None:
    if not data.grpo_logs:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, (method, logs) in enumerate(data.grpo_logs.items()):
        for ax, key in zip(axes, ("reward", "entropy")):
            band(ax, *grpo_series(logs, key), color(method, i), f"{method} ({len(logs)} seeds)")
    for ax, key in zip(axes, ("reward (= accuracy of the sampled completions)", "policy entropy")):
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"GRPO from each starting checkpoint: mean over seeds of the {SMOOTH}-step moving average "
                 "(band: 95% t interval over seeds)", fontsize=10)
    return _save(fig, path)


CURVE_METRICS = (("accuracy", "greedy accuracy (%)", 100.0), ("entropy", "mean token entropy (nats)", 1.0))


def _curve_benches(methods: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(b for curve in methods.values() for p in curve["points"] for b in p["metrics"]))


def curves_plot(data: RunData, path: Path) -> Path | None:
    """Rows: accuracy, entropy; columns: benchmarks; per method the mean over seeds with its 95% t band."""
    columns = [(model, bench) for model, methods in data.curves.items() for bench in _curve_benches(methods)]
    if not columns:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(CURVE_METRICS), len(columns), figsize=(4.8 * len(columns), 6.6), squeeze=False,
                             layout="constrained")
    for col, (model, bench) in enumerate(columns):
        for row, (metric, ylabel, scale) in enumerate(CURVE_METRICS):
            ax = axes[row][col]
            for i, (method, curve) in enumerate(data.curves[model].items()):
                pts = [(p["fraction"], p["metrics"][bench].get(metric)) for p in curve["points"]
                       if bench in p["metrics"]]
                if pts:
                    band(ax, *zip(*pts), color(method, i), method, scale)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[0][col].set_title(_label(model, bench, len(data.models)), fontsize=9)
        axes[-1][col].set_xlabel("fraction of training steps")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("learning curves: checkpoints during training (0 = the base model); mean over seeds, band: 95% t "
                 "interval over seeds", fontsize=10)
    return _save(fig, path)


def tuning_plot(data: RunData, path: Path) -> Path | None:
    """Per model and tuned method: a heatmap of the validation score, first setting key down, the rest across,
    the chosen setting outlined."""
    panels = [(model, method, t) for model, methods in data.tuning.items() for method, t in methods.items()
              if t.get("runs")]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (model, method, t) in zip(axes[0], panels):
        metric = t.get("metric", "accuracy")
        scale, digits = _scale(metric)
        first = next(iter(t["runs"][0]["setting"]))
        down = list(dict.fromkeys(r["setting"][first] for r in t["runs"]))
        across = list(dict.fromkeys(fmt_setting({k: v for k, v in r["setting"].items() if k != first})
                                    for r in t["runs"]))
        grid = [[float("nan")] * len(across) for _ in down]
        for r in t["runs"]:
            rest = fmt_setting({k: v for k, v in r["setting"].items() if k != first})
            if r.get(metric) is not None:
                grid[down.index(r["setting"][first])][across.index(rest)] = scale * r[metric]
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):  # dark text on the light end of the colour map
                ax.annotate(f"{v:.{digits}f}", (j, i), ha="center", va="center", fontsize=8,
                            color="black" if image.norm(v) > 0.6 else "white")
        chosen = t.get("chosen") or {}
        if chosen.get(first) in down:
            rest = fmt_setting({k: v for k, v in chosen.items() if k != first})
            if rest in across:
                ax.add_patch(plt.Rectangle((across.index(rest) - 0.5, down.index(chosen[first]) - 0.5), 1, 1,
                                           fill=False, ec="#d62728", lw=2.5))
        ax.set_yticks(range(len(down)), [fmt_setting({first: v}) for v in down])
        ax.set_xticks(range(len(across)), across, rotation=30, ha="right")
        ax.set_title(f"{method}" if len(data.tuning) == 1 else f"{model} · {method}", fontsize=9)
    fig.suptitle("tuning: validation score per setting (red box: chosen)", fontsize=10, y=1.03)
    return _save(fig, path)


def make_plots(data: RunData, out_dir: Path) -> dict[str, Path]:
    """Every plot the data allows, by name."""
    plots = {
        "accuracy": bar_plot(data, "accuracy", "greedy accuracy (%)", out_dir / "accuracy.png"),
        "accuracy_diff": diff_plot(data, "accuracy", out_dir / "accuracy_diff.png"),
        "pass_at_k": ladder_plot(data, "pass@", out_dir / "pass_at_k.png"),
        "maj_at_k": ladder_plot(data, "maj@", out_dir / "maj_at_k.png"),
        "entropy": bar_plot(data, "entropy", "mean token entropy (nats)", out_dir / "entropy.png", scale=1.0),
        "critical": critical_plot(data, out_dir / "critical_by_kind.png"),
        "train_loss": loss_plot(data, out_dir / "train_loss.png"),
        "grpo": grpo_plot(data, out_dir / "grpo.png"),
        "curves": curves_plot(data, out_dir / "learning_curves.png"),
        "tuning": tuning_plot(data, out_dir / "tuning.png"),
    }
    return {k: v for k, v in plots.items() if v is not None}


# ---------------------------------------------------------------- documents


@dataclass
class Block:
    kind: str  # "h1" | "h2" | "p" | "table" | "figure"
    text: str = ""
    rows: list[list[str]] = field(default_factory=list)  # table: header first
    path: Path | None = None  # figure


def result_tables(data: RunData) -> list[Block]:
    blocks = []
    for bench in data.benchmarks:
        shown, deltas = headline_metrics({k for row in data.stats[bench].values() for k in row})
        diff = data.baseline is not None and any(data.paired.get(bench, {}).values())
        header = ["method", "seeds", "accuracy (%)", *([f"Δ accuracy vs {data.baseline}"] if diff else []),
                  *(f"{k} (%)" for k in shown), *(f"Δ {k}" for k in (deltas if diff else [])), "entropy",
                  *(["Δ entropy"] if diff else [])]
        rows = [header]
        for method in data.methods:
            m = data.stats[bench].get(method)
            if m is None:
                continue
            d = data.paired.get(bench, {}).get(method, {})
            n = max((s.get("n", 0) for s in m.values()), default=0)
            rows.append([method, str(n), fmt_stat(m.get("accuracy")),
                         *([fmt_diff(d.get("accuracy"))] if diff else []), *(fmt_stat(m.get(k)) for k in shown),
                         *(fmt_diff(d.get(k)) for k in (deltas if diff else [])),
                         fmt_stat(m.get("entropy"), 1.0, 3), *([fmt_diff(d.get("entropy"), 1.0, 3)] if diff else [])])
        blocks += [Block("h2", f"Results on {bench}"), Block("table", rows=rows)]
    return blocks


def _scale(metric: str) -> tuple[float, int]:
    """Scale and digits of a metric in tables: rates in percent (points), entropy in nats."""
    return (1.0, 3) if metric == "entropy" else (100.0, 1)


SETTING_NAMES = {"learning_rate": "lr {}", "num_train_epochs": "{} ep"}


def fmt_setting(setting: dict[str, Any]) -> str:
    """A tuning grid point, short: {"learning_rate": 1e-4, "num_train_epochs": 1.0} -> "lr 1e-4 · 1 ep"."""
    return " · ".join(SETTING_NAMES.get(k, f"{k} {{}}").format(fmt_number(v) if isinstance(v, (int, float)) else v)
                      for k, v in setting.items())


def tuning_tables(data: RunData) -> list[Block]:
    """Per model: the validation score of every grid point per method, the chosen one in bold."""
    blocks = []
    for model, methods in data.tuning.items():
        grid = list(dict.fromkeys(fmt_setting(r["setting"]) for t in methods.values() for r in t.get("runs", [])))
        where = sorted({f"{t.get('metric', 'accuracy')} on {t['benchmark']}, seed {t['seed']}"
                        for t in methods.values() if t.get("runs")})
        sizes = sorted({r["n"] for t in methods.values() for r in t.get("runs", []) if r.get("n")})
        rows = [["method", *grid, "chosen"]]
        for method, t in methods.items():
            chosen = fmt_setting(t["chosen"]) if t.get("chosen") else "-"
            scale, digits = _scale(t.get("metric", "accuracy"))
            scores = {fmt_setting(r["setting"]): r.get(t.get("metric", "accuracy")) for r in t.get("runs", [])}
            cells = ["-" if scores.get(g) is None else f"{scale * scores[g]:.{digits}f}" for g in grid]
            cells = [f"**{c}**" if g == chosen and c != "-" else c for g, c in zip(grid, cells)]
            rows.append([method, *cells, f"{chosen} (setting of {t['from']})" if t.get("from") else chosen])
        blocks += [Block("h2", "Hyperparameter tuning" + ("" if len(data.tuning) == 1 else f": {model}")),
                   Block("p", f"Validation {'; '.join(where) or 'score'}"
                              + (f" ({'/'.join(map(str, sizes))} problems)" if sizes else "")
                              + ", in percent (entropy in nats), per grid point; bold: the chosen setting, "
                                "which the test-set cells train with."),
                   Block("table", rows=rows)]
    return blocks


def curve_tables(data: RunData) -> list[Block]:
    """Per model: accuracy at every checkpoint of the learning curves, per method and benchmark."""
    blocks = []
    for model, methods in data.curves.items():
        benches = _curve_benches(methods)
        rows = [["method", "fraction", "step", "epoch", "seeds", *(f"{b} accuracy (%)" for b in benches)]]
        for method, curve in methods.items():
            for p in curve["points"]:
                acc = [p["metrics"].get(b, {}).get("accuracy") for b in benches]
                rows.append([method, f"{p['fraction']:.2f}", str(p.get("step", "-")),
                             "-" if p.get("epoch") is None else fmt_number(p["epoch"]),
                             str(max((a.get("n", 0) for a in acc if a), default=0)), *(fmt_stat(a) for a in acc)])
        blocks += [Block("h2", "Learning curves" + ("" if len(data.curves) == 1 else f": {model}")),
                   Block("table", rows=rows)]
    return blocks


def _split_comparison(name: str) -> tuple[str, str]:
    first, _, second = name.partition(" vs ")
    return first, second


def bootstrap_tables(data: RunData) -> list[Block]:
    """Per model and benchmark: the paired bootstrap difference of each comparison in every metric, beside the
    seed-only t interval of the results table where the comparison is the one that table makes."""
    blocks = []
    for model, benches in data.bootstrap.items():
        for bench, comparisons in benches.items():
            label = _label(model, bench, len(data.models))
            metrics = list(dict.fromkeys(k for c in comparisons.values() for k in c))
            seed_t = {}  # comparison -> the results table's paired dicts (the same Δ over seeds)
            for name in comparisons:
                first, second = _split_comparison(name)
                if data.baseline and reference_method(first, data.baseline) == second:
                    seed_t[name] = data.paired.get(label, {}).get(first, {})
            header, with_t = ["comparison"], []
            for m in metrics:
                header.append(f"Δ {m} (bootstrap)")
                if any(m in d for d in seed_t.values()):
                    with_t.append(m)
                    header.append(f"Δ {m} (seed-only t CI)")
            rows = [header]
            for name, by_metric in comparisons.items():
                row = [name]
                for m in metrics:
                    row.append(fmt_bootstrap(by_metric.get(m), *_scale(m)))
                    if m in with_t:
                        row.append("" if name not in seed_t else fmt_diff(seed_t[name].get(m), *_scale(m))
                                   if m in by_metric else "-")
                rows.append(row)
            every = [b for c in comparisons.values() for b in c.values()]
            sizes = "/".join(map(str, sorted({b["n_problems"] for b in every})))
            seeds = "/".join(map(str, sorted({b["n_seeds"] for b in every})))
            level = every[0]["level"] if every else 0.95
            blocks += [Block("h2", f"Paired bootstrap over problems and seeds: {label}"),
                       Block("p", f"Δ = first − second method in percentage points (entropy in nats) [{level:.0%} "
                                  f"percentile interval of {every[0]['resamples'] if every else '-'} resamples that "
                                  f"draw the {sizes} problems and the {seeds} seeds with replacement, the same draw "
                                  "for both methods]; * marks an interval that excludes 0. The seed-only t CI is "
                                  "the results table's 95% t interval of the per-seed differences.", ),
                       Block("table", rows=rows)]
    return blocks


def _bootstrap_against(comparisons: dict[str, Any], method: str, baseline: str | None) -> tuple[str, dict] | None:
    """The comparison of ``method`` with its reference (the baseline), else with whatever it is compared with."""
    mine = [n for n in comparisons if _split_comparison(n)[0] == method]
    if not mine:
        return None
    ref = reference_method(method, baseline) if baseline else None
    name = next((n for n in mine if _split_comparison(n)[1] == ref), mine[0])
    return _split_comparison(name)[1], comparisons[name]


def ablation_table(data: RunData) -> list[Block]:
    """One row per ablation, model and method: what changed, stage A/B outcomes and accuracy per benchmark."""
    if not data.ablations:
        return []
    runs = data.ablations
    benches = list(dict.fromkeys(b for a in runs.values() for per in a["results"].values() for b in per))
    models = list(dict.fromkeys(m for a in runs.values() for m in a["results"]))
    described = any(a.get("description") for a in runs.values())
    booted = any(a.get("bootstrap") for a in runs.values())
    ref = data.baseline or "sft"
    header = ["ablation", "change", *(["description"] if described else []), "cells",
              *(["model"] if len(models) > 1 else []), "method", "D_correct", "critical (%)"]
    for b in benches:
        header += [f"{b} accuracy (%)", *([f"{b} Δ accuracy vs {ref} (bootstrap)"] if booted else [])]
    rows = [header]
    for name, a in runs.items():
        first = True
        cells = (f"{a['finished_cells']}/{a['planned_cells']}" if a.get("planned_cells") is not None else "-")
        for model, per_bench in a["results"].items():
            shared = (a.get("shared") or {}).get(model, {})
            for method in dict.fromkeys(m for per_method in per_bench.values() for m in per_method):
                head = [name, "the experiment above" if name == MAIN else fmt_overrides(a.get("overrides") or {}),
                        *([a.get("description") or ""] if described else []), cells]
                row = head if first else [""] * len(head)  # an ablation's columns once, on its first row
                first = False
                cf = shared.get("critical_fraction")
                row += [*([model] if len(models) > 1 else []), method, str(shared.get("d_correct", "-")),
                        "-" if cf is None else f"{100 * cf:.1f}"]
                for b in benches:
                    result = per_bench.get(b, {}).get(method)
                    row.append(fmt_stat(result["metrics"].get("accuracy")) if result else "-")
                    if booted:
                        found = _bootstrap_against(((a.get("bootstrap") or {}).get(model) or {}).get(b) or {},
                                                   method, data.baseline)
                        text = fmt_bootstrap(found[1].get("accuracy")) if found else "-"
                        row.append(text if not found or found[0] == ref else f"{text} vs {found[0]}")
                rows.append(row)
    return [Block("h2", "Ablations"),
            Block("p", "Each ablation reruns the experiment with the change shown (the first row is the experiment "
                       "itself). Accuracy: mean over seeds ± 95% t half-width, in percent; Δ: paired bootstrap over "
                       "problems and seeds, percentage points [95% interval], * when it excludes 0."),
            Block("table", rows=rows)]


def critical_table(data: RunData) -> list[Block]:
    if not data.critical:
        return []
    rows = [["model", "kind", "critical", "tested", "critical share"]]
    for model, c in data.critical.items():
        for kind, v in c["critical_by_kind"].items():
            rows.append([model, kind, str(v["critical"]), str(v["tokens"]), f"{v['fraction']:.1%}"])
        rows.append([model, "all", "", "", f"{c['critical_fraction']:.1%}"])
    return [Block("h2", "Critical tokens by kind (stage B)"), Block("table", rows=rows)]


def grpo_pass_table(data: RunData) -> list[Block]:
    """Reward and policy entropy per pass over the GRPO training problems, and the last pass's change.

    Every pass draws the same problems, so the change from the pass before (per seed, 95% t interval over seeds)
    says whether the reward was still rising when the run stopped; windows of steps would compare different
    problems. Cells made before cft recorded ``steps_per_pass`` have no row.
    """
    blocks = []
    for key in ("reward", "entropy"):
        rows, width = [], 0
        for method, logs in data.grpo_logs.items():
            per = data.grpo_per_pass.get(method, [])
            seeds = [pass_means([r[key] for r in log if r.get(key) is not None], p)
                     for log, p in zip(logs, per) if p]
            n = min((len(m) for m in seeds), default=0)
            if not n:
                continue
            width = max(width, n)
            last = paired(dict(enumerate(m[n - 1] for m in seeds)), dict(enumerate(m[n - 2] for m in seeds))) \
                if n >= 2 else None
            rows.append([method, str(len(seeds)), ", ".join(str(p) for p in sorted({p for p in per if p})),
                         *(fmt_stat(summarize([m[i] for m in seeds]), 1.0, 3) for i in range(n)),
                         fmt_diff(last, 1.0, 3)])
        if rows:
            header = ["method", "seeds", "steps per pass", *(f"pass {i + 1}" for i in range(width)),
                      "last pass − the one before"]
            rows = [r[:-1] + ["-"] * (len(header) - len(r)) + r[-1:] for r in rows]
            blocks += [Block("h2", f"GRPO {key} per pass over the training problems"),
                       Block("p", f"Mean {key} of the logged steps of each complete pass (mean over seeds ± 95% t "
                                  "half-width); the last column: per seed, the last complete pass minus the one "
                                  "before, with its 95% t interval over seeds (* excludes 0)."),
                       Block("table", rows=[header, *rows])]
    return blocks


def cost_table(data: RunData) -> list[Block]:
    if not data.costs:
        return []
    where = "; ".join(data.machines) or "not recorded (cells made before cft recorded the machine)"
    return [Block("h2", "Costs"),
            Block("p", f"Wall seconds of each stage as its runs recorded them; machine: {where}. A grid cell "
                       "trained by its tuning run (the same training) is not counted twice."),
            Block("table", rows=data.costs)]


CAPTIONS = {
    "accuracy": "Greedy accuracy by method, in-distribution and OOD.",
    "accuracy_diff": "Paired differences in accuracy against the baseline (same seed).",
    "pass_at_k": "pass@k curves.",
    "maj_at_k": "maj@k curves (self-consistency: majority vote over k samples).",
    "entropy": "Mean per-token entropy of the sampling distribution (diversity).",
    "critical": "Critical-token share by token kind.",
    "train_loss": "Training loss curves.",
    "grpo": "GRPO reward and entropy per step: mean over seeds, shaded 95% t interval over seeds.",
    "curves": "Learning curves: accuracy and entropy against the fraction of training steps (mean over seeds, "
              "shaded 95% t interval over seeds).",
    "tuning": "Hyperparameter tuning: the validation score of every grid point (percent; red box: the chosen one).",
}


def build_blocks(data: RunData, plots: dict[str, Path]) -> list[Block]:
    blocks = [Block("h1", data.title), Block("h2", "Setup"), *(Block("p", s) for s in data.setup)]
    blocks.append(Block("p", "Values are means over seeds ± the half-width of a 95% t interval (none for one seed); "
                             f"Δ columns are paired differences against {data.baseline} of the same seed (GRPO rows "
                             f"against grpo:{data.baseline}) with their 95% t interval; * marks an interval that "
                             "excludes 0. Accuracy, pass@k and maj@k in percent, entropy in nats. maj@k counts "
                             "equivalent answers as one and breaks ties toward the answer sampled first."))
    if data.missing:
        blocks.append(Block("p", f"Not finished (not in the statistics): {', '.join(data.missing)}."))
    blocks += (result_tables(data) + bootstrap_tables(data) + critical_table(data) + tuning_tables(data)
               + curve_tables(data) + grpo_pass_table(data) + ablation_table(data) + cost_table(data)
               + [Block("h2", "Plots")])
    blocks += [Block("figure", CAPTIONS[name], path=path) for name, path in plots.items()]
    return blocks


def render_markdown(blocks: list[Block], base: Path) -> str:
    out = []
    for b in blocks:
        if b.kind == "h1":
            out.append(f"# {b.text}\n")
        elif b.kind == "h2":
            out.append(f"## {b.text}\n")
        elif b.kind == "p":
            out.append(f"{b.text}\n")
        elif b.kind == "table":
            header, *rows = b.rows
            out.append("\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                                  *("| " + " | ".join(r) + " |" for r in rows)]) + "\n")
        elif b.kind == "figure":
            out.append(f"![{b.text}]({b.path.relative_to(base).as_posix()})\n\n*{b.text}*\n")
    return "\n".join(out)


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px;"
         "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
         "img{max-width:100%}figure{margin:1.5em 0}figcaption{color:#555;font-size:14px}")


def _inline(text: str) -> str:
    """A table cell as HTML: escaped, with markdown's **bold** kept as bold."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))


def render_html(blocks: list[Block]) -> str:
    """One HTML file with every image inline (base64 PNG): no network, no sibling files."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(blocks[0].text)}</title><style>{STYLE}</style></head><body>"]
    for b in blocks:
        if b.kind in ("h1", "h2"):
            out.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{html.escape(b.text)}</p>")
        elif b.kind == "table":
            header, *rows = b.rows
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                       + "</table>")
        elif b.kind == "figure":
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``RUN_DIR/report.md`` (PNGs in ``RUN_DIR/report/``) and the self-contained ``RUN_DIR/report.html``."""
    run_dir = Path(run_dir)
    data = load_run(run_dir)
    plots = make_plots(data, run_dir / PLOTS)
    blocks = build_blocks(data, plots)
    md, page = run_dir / "report.md", run_dir / "report.html"
    md.write_text(render_markdown(blocks, run_dir))
    page.write_text(render_html(blocks))
    return md, page


@dataclass
class ReportConfig:
    """Options of ``cft report`` (``CONFIGS``)."""

    run_dir: str = option(help="a `cft experiment` output folder (aggregate.json) or a `cft demo` folder",
                          positional=True)


CONFIGS = (ReportConfig,)


def run(args: argparse.Namespace) -> int:
    cfg = from_args(ReportConfig, args)
    md, page = report(cfg.run_dir)
    print(f"wrote {md} and {page} (plots in {Path(cfg.run_dir) / PLOTS})")
    return 0
