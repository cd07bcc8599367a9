"""How far can `cft identify --predict` go on one model? The probe's ceiling, from exact labels alone.

``--predict`` pays for its exactly labelled subset and for the band of positions it still decodes; both shrink
only as the probe separates critical from non-critical positions better. This script asks, without decoding
anything, whether any subset size (``--fractions``) or probe reaches a quality target at a given cost:

1. the learning curve: the probe (``cft.predict.features`` and ``Probe``, identify's defaults) trained on a
   growing number of exactly labelled responses, its AUC on a fixed test part (``--test-share``) that never
   trains it;
2. ``--predict`` replayed for each subset fraction: ``cft.predict.roles`` draws the subset and its held-out
   part as identify would, the band is chosen on the held-out labels for ``--target``, and the predicted
   responses take the exact run's labels inside the band (the same replay as ``predict_quality.py``'s curve).
   The cost is the subset's decoded tokens plus those of the band's positions, read from the exact run's
   branches, as a fraction of the exact run's; precision and recall are over every position of the run.

    python benchmarks/predict_ceiling.py --exact exact.jsonl                 # exact labels from `cft identify`
    python benchmarks/predict_ceiling.py --exact exact.jsonl --model smollm2 --fractions 0.15 0.3 --probe mlp

Its last line is ``key=value`` pairs: the largest test AUC (``auc_max``) and, per fraction, the cost at the
target (``cost_at_<fraction>``).
"""

from __future__ import annotations

import argparse
import random

import torch

from cft.artifacts import load_records, read_meta
from cft.kinds import token_kind
from cft.predict import Probe, auc, choose_band, confusion, features, position_cost, roles, scores


def tested(rec: dict) -> torch.Tensor:
    return torch.tensor(rec["eligible"], dtype=torch.bool)


def table(model, tok, records: list[dict], layers, k: int) -> dict[str, tuple[torch.Tensor, list[int], list[float]]]:
    """Per response, by its key: features (as identify computes them for alternatives up to rank ``k``), exact
    labels and decoding costs of its tested positions."""
    kind = {}

    def kind_of(y: int) -> str:
        if y not in kind:
            kind[y] = token_kind(tok.decode([y]))
        return kind[y]

    out = {}
    for rec in records:
        mask = tested(rec)
        x = features(model, rec["prompt_ids"], rec["response_ids"], kind_of, layers, k)[mask]
        ys = [c for c, e in zip(rec["critical"], rec["eligible"]) if e]
        costs = [position_cost(rec, t) for t, e in enumerate(rec["eligible"]) if e]
        out[rec["key"]] = (x, ys, costs)
    return out


def fit(rows, keys: list[str], probe: str, seed: int) -> Probe:
    return Probe(probe, seed).fit(torch.cat([rows[k][0] for k in keys]),
                                  torch.tensor([y for k in keys for y in rows[k][1]], dtype=torch.float32))


def pairs(rows, keys: list[str], model: Probe) -> list[tuple[float, int, float]]:
    out = []
    for k in keys:
        x, ys, costs = rows[k]
        out += list(zip(model.predict(x), ys, costs))
    return out


def learning_curve(rows, sizes: list[int], test_share: float, probe: str, seed: int) -> list[tuple[int, float]]:
    keys = sorted(rows)
    random.Random(seed).shuffle(keys)
    n_test = round(test_share * len(keys))
    test, pool = keys[:n_test], keys[n_test:]
    return [(n, auc(pairs(rows, test, fit(rows, pool[:n], probe, seed)))) for n in sizes if n <= len(pool)]


def replay(rows, fraction: float, heldout: float, target: float, probe: str, seed: int) -> dict:
    """``--predict`` at this subset fraction, replayed on the exact labels (see the module)."""
    role = roles(list(rows), fraction, heldout, seed)
    train = [k for k in rows if role[k] == "train"]
    held = [k for k in rows if role[k] == "heldout"]
    pred = [k for k in rows if role[k] == "predicted"]
    model = fit(rows, train, probe, seed)
    band = choose_band(pairs(rows, held, model), target, target)
    counts = confusion(pairs(rows, pred, model), band)
    subset_pos = [(y, c) for k in train + held for y, c in zip(rows[k][1], rows[k][2])]
    subset_tp = sum(y for y, _ in subset_pos)
    whole = {"tp": counts["tp"] + subset_tp, "fp": counts["fp"], "fn": counts["fn"],
             "cost": counts["cost"] + sum(c for _, c in subset_pos),
             "exact_cost": counts["exact_cost"] + sum(c for _, c in subset_pos)}
    return {"fraction": fraction, "responses": (len(train), len(held), len(pred)), "band": band, **scores(whole),
            "heldout_auc": auc(pairs(rows, held, model))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exact", required=True, help="exact labels from `cft identify` (branches stored)")
    p.add_argument("--model", default="testbed", help="the model that made the labels")
    p.add_argument("--probe", choices=["logistic", "mlp"], default="logistic")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="hidden-state layers (default: identify's)")
    p.add_argument("--sizes", type=int, nargs="+", default=[18, 36, 72, 144, 250],
                   help="training responses of the learning curve")
    p.add_argument("--test-share", type=float, default=0.35, help="responses kept out of the learning curve")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.15, 0.25, 0.4],
                   help="--predict-fraction values to replay")
    p.add_argument("--heldout", type=float, default=0.4, help="--predict-heldout")
    p.add_argument("--target", type=float, default=0.9, help="recall and precision the band must reach")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from cft.models import load_model, machine_line

    print(f"machine: {machine_line()}", flush=True)
    records = load_records(args.exact, "labels")
    if any(b["ids"] is None and b["ok"] is not None for rec in records for bs in rec["branches"] for b in bs):
        raise SystemExit(f"{args.exact}: branches were stored without their continuations; the costs need them")
    model, tok = load_model(args.model)
    rows = table(model, tok, records, tuple(args.layers) if args.layers else None,
                 read_meta(args.exact)["label_params"]["k"])
    n_pos = sum(len(r[1]) for r in rows.values())
    print(f"{len(rows)} responses, {n_pos} tested positions, {sum(sum(r[1]) for r in rows.values())} critical")
    print(f"\nlearning curve ({args.probe} probe, AUC on {round(args.test_share * len(rows))} test responses):")
    curve = learning_curve(rows, args.sizes, args.test_share, args.probe, args.seed)
    for n, a in curve:
        print(f"  {n:4d} training responses: AUC {a:.3f}")
    print(f"\n--predict replayed at target {args.target} (precision and recall over every position):")
    print("| fraction | train/held-out/predicted | band | cost (of exact) | precision | recall | held-out AUC |")
    print("|---|---|---|---|---|---|---|")
    results = [replay(rows, f, args.heldout, args.target, args.probe, args.seed) for f in args.fractions]
    for r in results:
        lo, hi = r["band"]
        print(f"| {r['fraction']} | {'/'.join(map(str, r['responses']))} | [{lo:.3f}, {hi:.3f}) | "
              f"{r['cost_fraction']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['heldout_auc']:.3f} |")
    print(" ".join([f"auc_max={max(a for _, a in curve):.3f}"]
                   + [f"cost_at_{r['fraction']}={r['cost_fraction']:.3f}" for r in results]))


if __name__ == "__main__":
    main()
