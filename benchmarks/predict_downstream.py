"""Does training on `cft identify --predict` labels learn what training on exact labels learns?

Trains CFT from the same starting model on two labels files of the same responses (exact, and --predict),
for each seed, evaluates every checkpoint greedily on the same problems, and prints each side's mean
accuracy and the paired bootstrap interval of the difference over problems and seeds (``cft.stats``).
Each run goes through `cft train` and `cft eval` (in this process); the folders stay under --out, so a
rerun reuses finished checkpoints and evaluations.

    python benchmarks/predict_downstream.py --exact exact.jsonl --predicted predicted.jsonl --out runs/downstream
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cft.artifacts import load_records
from cft.cli import main as cft
from cft.stats import paired_bootstrap


def accuracy_by_problem(folder: Path) -> dict[str, float]:
    return {str(r["id"]): float(r["correct"]) for r in load_records(folder / "samples.jsonl", "samples")
            if r["kind"] == "greedy"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exact", required=True, help="exact labels (cft identify)")
    p.add_argument("--predicted", required=True, help="labels of the same responses from cft identify --predict")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="testbed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--benchmark", default="testbed:test")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--learning-rate", default="1e-4", help="CFT's setting chosen on testbed:val (docs/RESULTS.md)")
    p.add_argument("--epochs", default="1")
    args = p.parse_args()
    out = Path(args.out)
    scores: dict[str, dict[int, dict[str, float]]] = {"exact": {}, "predict": {}}
    for name, labels in (("exact", args.exact), ("predict", args.predicted)):
        for seed in args.seeds:
            run = out / name / f"seed{seed}"
            if not (run / "train_summary.json").exists():
                assert cft(["train", "--model", args.model, "--input", labels, "--method", "cft", "--out", str(run),
                            "--learning-rate", args.learning_rate, "--num-train-epochs", args.epochs,
                            "--per-device-train-batch-size", "16", "--seed", str(seed)]) == 0
            ev = run / "eval"
            if not (ev / "metrics.json").exists():
                assert cft(["eval", "--model", str(run), "--benchmarks", args.benchmark, "--limit", str(args.limit),
                            "--n-samples", "0", "--max-new-tokens", "256", "--out", str(ev)]) == 0
            scores[name][seed] = accuracy_by_problem(ev)
    means = {name: sum(sum(v.values()) / len(v) for v in s.values()) / len(s) for name, s in scores.items()}
    boot = paired_bootstrap(scores["predict"], scores["exact"])
    result = {"means": means, "predict_minus_exact": boot, "seeds": args.seeds, "benchmark": args.benchmark,
              "limit": args.limit, "exact": args.exact, "predicted": args.predicted}
    (out / "downstream.json").write_text(json.dumps(result, indent=1))
    print(f"greedy accuracy on {args.benchmark} ({args.limit} problems, seeds {args.seeds}): CFT on exact labels "
          f"{means['exact']:.1%}, on --predict labels {means['predict']:.1%}; predict - exact "
          f"{boot['mean'] * 100:+.1f} points, 95% paired bootstrap interval [{boot['ci'][0] * 100:+.1f}, "
          f"{boot['ci'][1] * 100:+.1f}] over problems and seeds")


if __name__ == "__main__":
    main()
