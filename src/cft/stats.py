"""Statistics of an experiment's cells: t intervals over seeds, paired differences, a paired bootstrap.

Pure functions (no model, no files): ``cft experiment`` aggregates its cells with them, ``cft report``
formats them, and per-problem analyses draw on ``paired_bootstrap``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from typing import Any

GRPO_PREFIX = "grpo:"

# Two-sided 95% quantiles of Student's t (0.975 quantile) by degrees of freedom; between tabulated values
# the next smaller df is used, which widens the interval slightly (conservative).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
        29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
Z975 = 1.960


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


def pass_means(values: list[float], per_pass: int) -> list[float]:
    """The mean of each complete pass over the training problems (``per_pass`` steps; a partial last pass is
    left out). Each pass sees the same problems, so its means compare like with like, unlike two windows of
    steps that drew different problems."""
    if per_pass < 1:
        return []
    return [math.fsum(values[i : i + per_pass]) / per_pass for i in range(0, len(values) - per_pass + 1, per_pass)]


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


def paired_bootstrap(a: Mapping[Any, Mapping[Any, float]], b: Mapping[Any, Mapping[Any, float]],
                     resamples: int = 10_000, seed: int = 0, level: float = 0.95,
                     resample_seeds: bool = True) -> dict[str, Any]:
    """Percentile bootstrap interval of mean(a) - mean(b) over problems (and seeds), paired.

    ``a`` and ``b`` map a training seed to ``{problem id: correctness}`` (0/1, or any per-problem score such
    as a per-problem pass@k) of two methods. Both methods must cover the same problems in every seed they
    share (the experiment evaluates identical problems in every cell). Each resample draws the problems
    with replacement and, with ``resample_seeds``, the seeds with replacement, independently (a crossed
    design: a problem is the same problem under every seed), and applies the same draw to both methods,
    so what varies between them stays paired. With one seed only the problems are resampled.

    Returns the observed difference, the bootstrap standard error, the ``level`` percentile interval,
    whether it excludes 0, and the sizes. Deterministic for a given ``seed``.
    """
    import numpy as np

    seeds = sorted(set(a) & set(b), key=str)
    if not seeds:
        raise ValueError("the two methods share no seed")
    problems = sorted(a[seeds[0]], key=str)
    for s in seeds:
        for name, side in (("first", a), ("second", b)):
            if set(side[s]) != set(problems):
                raise ValueError(f"seed {s}: the {name} method's problems differ from those of seed {seeds[0]}")
    if not problems:
        raise ValueError("no problems to compare")
    diff = np.array([[float(a[s][p]) - float(b[s][p]) for p in problems] for s in seeds])  # seeds x problems
    n_seeds, n_problems = diff.shape
    rng = np.random.default_rng(seed)
    # A resample's mean is sum_ij c_i d_ij e_j / (n_seeds n_problems) with c, e the multinomial draw counts.
    prob_counts = rng.multinomial(n_problems, np.full(n_problems, 1.0 / n_problems), size=resamples)
    if resample_seeds and n_seeds > 1:
        seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds), size=resamples)
    else:
        seed_counts = np.ones((resamples, n_seeds))
    means = np.einsum("rs,sp,rp->r", seed_counts, diff, prob_counts) / (n_seeds * n_problems)
    alpha = (1.0 - level) / 2
    lo, hi = (float(v) for v in np.quantile(means, [alpha, 1.0 - alpha]))
    return {"mean": float(diff.mean()), "std": float(means.std(ddof=1)), "ci": [lo, hi], "level": level,
            "excludes_zero": lo > 0 or hi < 0, "n_seeds": n_seeds, "n_problems": n_problems,
            "resamples": resamples, "seed": seed}


# ---------------------------------------------------------------- formatting (tables of cft experiment and report)


def fmt_stat(s: dict[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
    if not s or s.get("mean") is None:
        return "-"
    text = f"{scale * s['mean']:.{digits}f}"
    return text if s.get("half_width") is None else f"{text} ± {scale * s['half_width']:.{digits}f}"


def _fmt_delta(mean: float, ci: list[float] | None, excludes_zero: bool | None, scale: float, digits: int) -> str:
    text = f"{scale * mean:+.{digits}f}"
    if ci:
        lo, hi = ci
        text += f" [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]" + ("*" if excludes_zero else "")
    return text


def fmt_diff(s: dict[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
    """A ``paired`` dict as "+5.0 [-2.5, +12.5]" (* when the 95% t interval excludes 0)."""
    if not s or s.get("mean") is None:
        return "-"
    return _fmt_delta(s["mean"], s.get("ci95"), s.get("excludes_zero"), scale, digits)


def fmt_bootstrap(b: dict[str, Any] | None, scale: float = 100.0, digits: int = 1) -> str:
    """A ``paired_bootstrap`` dict in the same form as ``fmt_diff`` (its percentile interval)."""
    if not b or b.get("mean") is None:
        return "-"
    return _fmt_delta(b["mean"], b.get("ci"), b.get("excludes_zero"), scale, digits)


def fmt_overrides(mapping: Mapping[str, Any], prefix: str = "") -> str:
    """A nested override mapping as dotted assignments: {"identify": {"k": 2}} -> "identify.k=2"."""
    parts = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            parts.append(fmt_overrides(value, f"{name}."))
        else:
            parts.append(f"{name}={value}")
    return ", ".join(parts)


def fmt_number(v: float) -> str:
    """Compact: 0.0001 -> "1e-4", 2.5e-05 -> "2.5e-5", 3.0 -> "3", 0.5 -> "0.5"."""
    if v != 0 and not 1e-2 <= abs(v) < 1e4:
        mantissa, exp = f"{v:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{v:g}"
