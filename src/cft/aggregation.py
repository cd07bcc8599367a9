"""Aggregation of ``cft experiment``: ``OUT/aggregate.json`` from the finished cells, beside ``cft.stats``.

Per model, benchmark and method, and per metric, the statistics over seeds (``stats.aggregate``); the
learning curves (each point's statistics over seeds); ``compare``'s paired bootstrap over problems and
seeds; the tuning record; and each ablation's own aggregate (also written in its folder). Reads cells
through a ``cft.grid.Grid`` and runs nothing, so ``cft experiment --aggregate-only`` and ``cft report``
need no model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cft.experiment_config import config_dict
from cft.grid import BASE, Grid, write_json_if_changed
from cft.stats import aggregate, paired_bootstrap, summarize

AGGREGATE = "aggregate.json"


def write_aggregate(grid: Grid, cells: list[dict[str, Any]], shared: dict[str, Any]) -> dict[str, Any]:
    """The aggregate of the finished ``cells`` and the shared-stage records (``Grid.collect``), written to
    ``OUT/aggregate.json`` (untouched when unchanged) and returned."""
    expected = {(m, meth, seed) for m, meth, seed in grid.plan()}
    done = {(c["model"], c["method"], c["seed"]) for c in cells if c.get("status") == "finished"}
    result = {
        "config": config_dict(grid.cfg),
        "finished_cells": len(done & expected),
        "planned_cells": len(expected),
        "missing_cells": [list(p) for p in grid.plan() if p not in done],
        "baseline": grid.cfg.baseline,
        "benchmarks": grid.cfg.benchmarks,
        "results": aggregate([c for c in cells if c.get("status") == "finished"], grid.cfg.baseline),
        "shared": {m: {"d_correct": s["generate"]["correct"], "train_problems": s["generate"]["n"],
                       "critical_fraction": s["identify"]["critical_fraction"],
                       "critical_by_kind": s["identify"]["critical_by_kind"],
                       "seconds": s.get("seconds"), "sittings": s.get("sittings"),
                       "decoded_tokens": {"identify": s["identify"].get("continuation_tokens",
                                                                        s["identify"].get("decoded_tokens"))}}
                   for m, s in shared.items()},
        "cells": [{k: c.get(k) for k in ("model", "method", "seed", "status", "seconds", "train", "grpo",
                                         "metrics", "curve", "eval_decoded", "trained_by", "machine")}
                  for c in cells],
    }
    tuning = {m: t for m in grid.cfg.models if (t := grid.tuning(m))}
    if tuning:
        result["tuning"] = tuning
    curves = learning_curves(grid, cells)
    if curves:
        result["curves"] = curves
    if grid.cfg.compare:
        result["bootstrap"] = bootstrap(grid, cells)
    if grid.cfg.ablations:
        result["ablations"] = {}
        for name, sub in grid.cfg.ablations.items():
            child = Grid(sub, grid.chosen)
            agg = write_aggregate(child, *child.collect())
            keys = ("results", "shared", "bootstrap", "finished_cells", "planned_cells")
            result["ablations"][name] = {"overrides": grid.cfg.ablation_overrides[name],
                                         **{k: agg[k] for k in keys if k in agg}}
    write_json_if_changed(Path(grid.cfg.out) / AGGREGATE, result)
    return result


def learning_curves(grid: Grid, cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model and method: each seed's curve points, and per point the statistics over seeds; the
    starting model's point (fraction 0) opens every method's curve."""
    out: dict[str, Any] = {}
    for model in grid.cfg.models:
        base = next((c["curve"] for c in cells if c["model"] == model and c["method"] == BASE and c.get("curve")),
                    [])
        for method in grid.curve_methods():
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


def bootstrap(grid: Grid, cells: list[dict[str, Any]]) -> dict[str, Any]:
    """``compare``'s paired bootstrap over problems and seeds, per model, benchmark and metric."""
    out: dict[str, Any] = {}
    for model in grid.cfg.models:
        by: dict[str, dict[int, dict]] = {}
        for c in cells:
            if c["model"] == model and c.get("problems"):
                by.setdefault(c["method"], {})[c["seed"]] = c["problems"]
        for item in grid.cfg.compare:
            a, b = (m.strip() for m in item.split(" vs "))
            if a not in by or b not in by:
                continue
            for bench in grid.cfg.benchmarks:
                metrics = set.intersection(*(set(p.get(bench, {})) for side in (by[a], by[b])
                                             for p in side.values()))
                row = {}
                for metric in sorted(metrics, key=lambda k: (k != "accuracy", len(k), k)):
                    try:
                        row[metric] = paired_bootstrap({s: p[bench][metric] for s, p in by[a].items()},
                                                       {s: p[bench][metric] for s, p in by[b].items()},
                                                       resamples=grid.cfg.bootstrap_resamples)
                    except ValueError as exc:  # e.g. seeds with different problems: say so, do not guess
                        row[metric] = {"error": str(exc)}
                out.setdefault(model, {}).setdefault(bench, {})[f"{a} vs {b}"] = row
    return out
