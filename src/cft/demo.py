"""``cft demo``: the whole method on the built-in testbed, in minutes on a laptop CPU.

Base model -> D_correct from ``testbed:train`` (stage A) -> critical tokens (stage B) -> SFT and CFT
from the same base with the same data and hyper-parameters (stage C) -> base/SFT/CFT evaluated on
``testbed:test`` and ``testbed:test_ood`` (stage D). It is ``cft experiment`` on the preset
``configs/experiment/demo.yaml`` (one seed) with ``--out`` as its folder: the same runner, folder layout,
resuming and ``aggregate.json`` (so ``cft report`` reads a demo like any experiment). ``key=value``
overrides work as for ``cft experiment`` (e.g. ``generate.limit=40 eval.limit=20``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

PRESET = Path(__file__).resolve().parents[2] / "configs" / "experiment" / "demo.yaml"


def print_table(result: dict[str, Any]) -> None:
    """Per model: accuracy in and out of distribution, pass@k and entropy of each method; critical-token shares."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    test, ood = result["benchmarks"][0], result["benchmarks"][-1]
    for model, benches in result["results"].items():
        rows = benches[test]
        ks = sorted({int(k[5:]) for r in rows.values() for k in r["metrics"] if k.startswith("pass@")})
        table = Table(title=f"{model}: base vs SFT vs CFT (test = in-distribution, ood = more steps, larger numbers)")
        for col in ["method", "accuracy", "accuracy ood", *[f"pass@{k}" for k in ks], "entropy"]:
            table.add_column(col, justify="right")

        def value(bench: str, method: str, metric: str, benches=benches) -> str:
            stat = benches.get(bench, {}).get(method, {}).get("metrics", {}).get(metric)
            return "-" if stat is None else f"{stat['mean']:.3f}"

        for method in rows:
            table.add_row(method, value(test, method, "accuracy"), value(ood, method, "accuracy"),
                          *[value(test, method, f"pass@{k}") for k in ks], value(test, method, "entropy"))
        console.print(table)
        shared = result["shared"].get(model)
        if shared:
            kinds = ", ".join(f"{k} {v['fraction']:.1%}" for k, v in shared["critical_by_kind"].items())
            console.print(f"critical tokens: {shared['critical_fraction']:.1%} of tested response tokens ({kinds}); "
                          f"D_correct = {shared['d_correct']} of {shared['train_problems']}")


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo", help="output folder (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help=f"override entries of the preset {PRESET.name}, e.g. generate.limit=40 eval.limit=20 "
                        "seeds=[1]")


def run(args: argparse.Namespace) -> int:
    from cft.experiment import AGGREGATE, run_experiment, work_done
    from cft.experiment_config import load_config

    t0 = time.time()
    cfg = replace(load_config(PRESET, args.overrides), out=args.out)
    result, counts = run_experiment(cfg, log=lambda msg: print(msg, flush=True))
    print_table(result)
    print(f"demo finished in {time.time() - t0:.0f}s: {work_done(counts)}; results in {Path(args.out) / AGGREGATE}")
    return 0
