"""What `cft identify --predict` costs and how good its labels are, against exact labels of the same responses.

Runs exact identification, then ``--predict`` (its defaults unless options say otherwise) and the opt-in
approximations (``--skip-confident``, ``--continuation-cap``) on the same generations in one process, and
prints per setting: decoded tokens (``summary.decoded_tokens``), their fraction of the exact run's, and the
precision, recall and F1 of its critical labels against the exact ones over every response position.

The cost-quality curve: the ``--predict`` run's probe probabilities with the band chosen for a range of
targets on its held-out exact labels (the rule ``--predict-recall/--predict-precision`` applies), each band
applied to the predicted responses with the exact run's labels inside the band; its cost is the exact
responses' decoded tokens plus those of the band's positions, both read from the exact run's branches.

    python benchmarks/predict_quality.py --input gen.jsonl             # generations from `cft generate`
    python benchmarks/predict_quality.py --model smollm2 --data benchmarks/data/simple_sums.jsonl --gold self \\
        --responses 20 --problems 20 --max-new-tokens 64
    python benchmarks/predict_quality.py --compare exact.jsonl predicted.jsonl   # two labels files, no decoding
    python benchmarks/predict_quality.py --input gen.jsonl --exact exact.jsonl --predicted predicted.jsonl
        # reuse those two runs of gen.jsonl; only the approximations decode
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from cft.artifacts import load_records, read_meta
from cft.predict import choose_band, heldout_pairs, position_cost

TARGETS = (0.8, 0.85, 0.9, 0.92, 0.95, 0.97, 0.99)
APPROXIMATIONS = (("skip_confident=0.99", {"skip_confident": 0.99}), ("skip_confident=0.9", {"skip_confident": 0.9}),
                  ("continuation_cap=16", {"continuation_cap": 16}), ("continuation_cap=8", {"continuation_cap": 8}))


def agreement(exact: list[dict], labels: list[dict]) -> dict:
    """Precision, recall and F1 of ``labels``' critical positions against ``exact``'s (matched by id)."""
    by_id = {str(r["id"]): r for r in labels}
    missing = [r["id"] for r in exact if str(r["id"]) not in by_id]
    if missing:
        raise SystemExit(f"{len(missing)} responses of the exact labels are missing from the other file "
                         f"(first: {missing[0]!r}); were they made from the same generations?")
    tp = fp = fn = 0
    for e in exact:
        other = by_id[str(e["id"])]
        if other["response_ids"] != e["response_ids"]:
            raise SystemExit(f"response {e['id']!r} differs between the two files: not the same generations")
        for ce, ca in zip(e["critical"], other["critical"], strict=True):
            tp += ce and ca
            fp += ca and not ce
            fn += ce and not ca
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {"precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0}


def exact_cost(rec: dict) -> float:
    return sum(position_cost(rec, t) for t in range(len(rec["response_ids"])))


def curve(exact: list[dict], predicted: list[dict], targets=TARGETS) -> list[dict]:
    """One row per target (a number: recall and precision; or a pair (recall, precision)): the band chosen on
    the held-out labels, its labels' quality and cost (see the module)."""
    by_id = {str(r["id"]): r for r in exact}
    held = heldout_pairs(predicted)
    total = sum(exact_cost(r) for r in exact)
    rows = []
    for target in targets:
        recall, precision = target if isinstance(target, tuple) else (target, target)
        lo, hi = choose_band(held, recall, precision)
        labels, cost = [], 0.0
        for rec in predicted:
            e = by_id[str(rec["id"])]
            if rec["predict_role"] != "predicted":
                labels.append({"id": rec["id"], "response_ids": rec["response_ids"], "critical": e["critical"]})
                cost += exact_cost(e)
                continue
            critical = []
            for t, (p, c) in enumerate(zip(rec["probe_prob"], e["critical"])):
                if p is not None and lo <= p < hi:
                    critical.append(c)
                    cost += position_cost(e, t)
                else:
                    critical.append(int(p is not None and p >= hi))
            labels.append({"id": rec["id"], "response_ids": rec["response_ids"], "critical": critical})
        rows.append({"target": target, "band": (lo, hi), "fraction": cost / total, **agreement(exact, labels)})
    return rows


def parse_target(text: str) -> float | tuple[float, float]:
    recall, _, precision = text.partition(":")
    return (float(recall), float(precision)) if precision else float(recall)


def compare(exact_path: str, other_path: str) -> None:
    exact, other = load_records(exact_path, "labels"), load_records(other_path, "labels")
    es, os_ = read_meta(exact_path)["summary"], read_meta(other_path)["summary"]
    q = agreement(exact, other)
    print(f"{other_path} against {exact_path}: precision {q['precision']:.3f} recall {q['recall']:.3f} "
          f"F1 {q['f1']:.3f}; decoded tokens {os_['decoded_tokens']} of {es['decoded_tokens']} "
          f"({os_['decoded_tokens'] / es['decoded_tokens']:.1%})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", nargs=2, metavar=("EXACT", "OTHER"), help="only compare two labels files")
    p.add_argument("--model", default="testbed")
    p.add_argument("--input", help="generations JSONL (cft generate); default: generate from --data")
    p.add_argument("--data", default="testbed:train")
    p.add_argument("--template", default="chat")
    p.add_argument("--problems", type=int, default=200)
    p.add_argument("--responses", type=int, default=60)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--gold", choices=["data", "self"], default="data")
    p.add_argument("--no-approximations", action="store_true", help="skip the --skip-confident/--continuation-cap runs")
    p.add_argument("--exact", help="exact labels of --input already made (`cft identify`): not rerun")
    p.add_argument("--predicted", help="labels of --input already made by `cft identify --predict`: not rerun")
    p.add_argument("--predict-fraction", type=float, default=None, help="--predict option (default: identify's)")
    p.add_argument("--targets", nargs="+", default=None, metavar="R[:P]",
                   help="curve targets: recall and precision R, or recall R with precision P (default: "
                        f"{' '.join(map(str, TARGETS))})")
    args = p.parse_args()
    if args.compare:
        compare(*args.compare)
        return
    from cft.identify import IdentifyConfig, identify
    from cft.models import load_model, machine_line

    print(f"machine: {machine_line()}", flush=True)
    sys.path.insert(0, str(Path(__file__).parent))
    from identify_speed import collect_responses

    model, tok = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.input:
            gen = Path(args.input)
        else:
            ns = argparse.Namespace(model=args.model, data=args.data, template=args.template, problems=args.problems,
                                    max_new_tokens=args.max_new_tokens, gen_batch_size=64, gold=args.gold,
                                    responses=args.responses)
            gen = collect_responses(model, tok, ns, work)

        def made(path: str) -> tuple[dict, list[dict]]:
            print(f"{path}: made before from {read_meta(path)['config']['input']}", flush=True)
            return read_meta(path)["summary"], load_records(path, "labels")

        def run(name: str, **kw) -> tuple[dict, list[dict]]:
            out = work / f"{name}.jsonl"
            s = identify(IdentifyConfig(model=args.model, input=str(gen), out=str(out), **kw), model=model, tok=tok)
            print(f"{name}: {s['responses']} responses, {s['decoded_tokens']} decoded tokens", flush=True)
            return s, load_records(out, "labels")

        exact_s, exact = made(args.exact) if args.exact else run("exact")
        extra = {"predict_fraction": args.predict_fraction} if args.predict_fraction is not None else {}
        pred_s, pred = made(args.predicted) if args.predicted else run("predict", predict=True, **extra)
        results = {"exact": (exact_s, exact), "predict (defaults)": (pred_s, pred)}
        if not args.no_approximations:
            for name, kw in APPROXIMATIONS:
                results[name] = run(name, **kw)
        ps = pred_s["predict"]
        print(f"predict: {ps['responses']}; band {ps['band']}; held-out probe AUC {ps['probe']['auc']}")
        print(f"{'setting':24s} {'decoded':>9s} {'fraction':>8s} {'precision':>9s} {'recall':>7s} {'F1':>6s}")
        for name, (s, labels) in results.items():
            q = agreement(exact, labels)
            print(f"{name:24s} {s['decoded_tokens']:9d} {s['decoded_tokens'] / exact_s['decoded_tokens']:8.3f} "
                  f"{q['precision']:9.3f} {q['recall']:7.3f} {q['f1']:6.3f}")
        print("the band as the target rises (held-out choice; cost from the exact run's branches):")
        print(f"{'target':>11s} {'band':>15s} {'fraction':>8s} {'precision':>9s} {'recall':>7s} {'F1':>6s}")
        targets = [parse_target(t) for t in args.targets] if args.targets else TARGETS
        for row in curve(exact, pred, targets):
            lo, hi = row["band"]
            t = row["target"]
            name = f"{t[0]:.2f}:{t[1]:.2f}" if isinstance(t, tuple) else f"{t:.2f}"
            print(f"{name:>11s} [{lo:.3f}, {hi:.3f}) {row['fraction']:8.3f} {row['precision']:9.3f} "
                  f"{row['recall']:7.3f} {row['f1']:6.3f}")


if __name__ == "__main__":
    main()
