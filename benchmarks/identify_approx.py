"""What the opt-in approximations of stage B cost in label quality and buy in speed.

Runs the exact fast engine once, then each approximation, on the same responses in one process, and
prints per setting: wall time, speed-up over exact, branches, and the precision / recall of its
critical labels against the exact ones (over every response position; a skipped position counts as
non-critical, which is what training sees).

    python benchmarks/identify_approx.py --responses 60
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from cft.artifacts import load_records
from cft.identify import IdentifyConfig, identify
from cft.models import load_model, machine_line


def precision_recall(exact: list[dict], approx: list[dict]) -> tuple[float, float]:
    tp = fp = fn = 0
    for e, a in zip(exact, approx):
        for ce, ca in zip(e["critical"], a["critical"]):
            tp += ce and ca
            fp += ca and not ce
            fn += ce and not ca
    return tp / max(tp + fp, 1), tp / max(tp + fn, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="testbed")
    p.add_argument("--data", default="testbed:train")
    p.add_argument("--responses", type=int, default=60)
    p.add_argument("--problems", type=int, default=200)
    args = p.parse_args()
    print(f"machine: {machine_line()}", flush=True)  # the CPU, its capability and bf16 support: which machine
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from identify_speed import collect_responses

    model, tok = load_model(args.model)
    settings = [("exact", {}), ("skip_confident=0.99", {"skip_confident": 0.99}),
                ("skip_confident=0.9", {"skip_confident": 0.9}), ("continuation_cap=16", {"continuation_cap": 16}),
                ("continuation_cap=8", {"continuation_cap": 8})]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ns = argparse.Namespace(model=args.model, data=args.data, template="chat", problems=args.problems,
                                max_new_tokens=256, gen_batch_size=64, gold="data", responses=args.responses)
        gen = collect_responses(model, tok, ns, work)
        results = {}
        for name, kw in settings:
            out = work / f"{name}.jsonl"
            s = identify(IdentifyConfig(model=args.model, input=str(gen), out=str(out), **kw), model=model, tok=tok)
            results[name] = (s, load_records(out, "labels"))
        exact_s, exact_l = results["exact"]
        print(f"{'setting':22s} {'seconds':>8s} {'speedup':>8s} {'branches':>9s} {'crit.frac':>9s} "
              f"{'precision':>9s} {'recall':>7s}")
        for name, (s, labels) in results.items():
            prec, rec = precision_recall(exact_l, labels)
            frac = sum(map(sum, (r["critical"] for r in labels))) / max(sum(len(r["critical"]) for r in labels), 1)
            print(f"{name:22s} {s['seconds']:8.1f} {exact_s['seconds'] / s['seconds']:8.2f} {s['branches']:9d} "
                  f"{frac:9.3f} {prec:9.3f} {rec:7.3f}")


if __name__ == "__main__":
    main()
