"""Stage D speed: ``cft eval``'s decoding on the ``hf`` backend vs the ``engine`` backend, in one process.

The work is the evaluation of round one of the testbed study (docs/RESULTS.md, in git history): per split
(testbed:test, testbed:test_ood) one greedy response to each of 200 problems and 16 samples at
temperature 1.0 for the first 40, max_new_tokens 256, stop at a complete answer, ``cft eval``'s defaults
otherwise: batch size 64 (the hf backend's rows) and ``--rows 0`` (the engine's rows: from free memory,
256 on a CPU). A third run, ``hf_rows``, decodes on ``model.generate`` in batches as large as the engine's
rows, so the engine is also compared at an equal batch. Each (split, part) unit is decoded by the three in
turn (who goes first alternates), through the same ``evaluate.plan`` / ``decode_chunks`` /
``decoding.api.decode_groups`` calls ``cft eval`` makes, so machine noise hits all alike. Grading is not
timed. Prints per run outputs, tokens, tokens/s, wall time, model forwards (prefills included), decoded
tokens per forward (how full the rows were kept: at most the rows) and rows, the metrics of hf and
engine, and as its last line

    speedup=<hf wall / engine wall> greedy_identical=<true|false> greedy_acc_hf=.. greedy_acc_engine=..
    sample_acc_hf=.. sample_acc_engine=.. entropy_hf=.. entropy_engine=.. sampled_z=<max |z|> hf_s=.. engine_s=..
    speedup_same_rows=<hf_rows wall / engine wall> hf_rows_s=.. rows=<the engine's rows>
    forward_ceiling_tok_s=<bare one-token forward loop> engine_vs_bare=<engine tok/s / that>
    needed_vs_bare=<2 x hf tok/s / that>

(one line). ``greedy_identical``: every greedy response has the same token ids on all three. The sampled
metrics cannot be equal (the backends draw different random numbers); ``sampled_z`` is the largest
|difference| / standard error of sample accuracy and mean entropy, paired by problem: below ~3 is
sampling noise.

The bare forward loop (``identify_speed.bare_forward``: a preallocated ``StaticCache``, argmax only, every
column valid) runs at the engine's mean rows and cache width per step, after the decoding: the rate at which
this machine runs the model's one-token forward, with no batching, stopping or sampling work at all.
``needed_vs_bare`` is the fraction of it that a 2x speed-up over ``hf`` takes; above 1 it is out of reach
of one-token decoding on this machine.

    python benchmarks/eval_speed.py                       # the study's size (a few minutes on a CPU)
    python benchmarks/eval_speed.py --problems 40 --samples 8 --sampled-problems 8
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from identify_speed import bare_forward

from cft import verify
from cft.decoding.api import decode_groups
from cft.decoding.engine import EngineStats
from cft.evaluate import EvalConfig, decode_chunks, load_items, plan
from cft.models import load_model, machine_line


def decode_unit(model, tok, cfg: EvalConfig) -> tuple[float, dict]:
    """Wall seconds and outputs ``{(kind, item, sample): Output}`` of ``cft eval``'s decoding of ``cfg``."""
    items = load_items(cfg, tok)
    _, keys, chunks = plan(cfg, items)
    outs = {}
    stats = EngineStats()
    t0 = time.perf_counter()
    for c, chunk_outs in decode_groups(model, tok, decode_chunks(cfg, items, chunks, keys), stats=stats):
        kind, n, idx = chunks[c]
        outs.update({(kind, i, j): chunk_outs[k][j] for k, i in enumerate(idx) for j in range(n)})
    seconds = time.perf_counter() - t0
    return seconds, {"items": items, "outs": outs, "stats": stats}


def paired_z(a: dict[int, list[float]], b: dict[int, list[float]]) -> float:
    """|mean difference| / its standard error, the unit being a problem (its samples' mean on each side)."""
    diffs = [sum(a[p]) / len(a[p]) - sum(b[p]) / len(b[p]) for p in a]
    if len(diffs) < 2:
        return 0.0
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    return 0.0 if se == 0 else abs(mean) / se


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="testbed")
    ap.add_argument("--splits", default="testbed:test,testbed:test_ood")
    ap.add_argument("--problems", type=int, default=200, help="greedy problems per split")
    ap.add_argument("--sampled-problems", type=int, default=40, help="problems sampled per split")
    ap.add_argument("--samples", type=int, default=16, help="samples per sampled problem")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64, help="cft eval's --batch-size (hf's rows)")
    ap.add_argument("--rows", type=int, default=0, help="cft eval's --rows (the engine's; 0: from free memory)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    print(f"machine: {machine_line()}", flush=True)  # the CPU, its capability and bf16 support: which machine

    model, tok = load_model(args.model, args.dtype, args.device)
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    print(f"model={args.model} device={model.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"problems={args.problems} sampled={args.sampled_problems}x{args.samples} T={args.temperature} "
          f"max_new_tokens={args.max_new_tokens} batch={args.batch_size}")
    backends = ("hf", "engine", "hf_rows")
    rows = {}  # the engine's rows, read from its first run: hf_rows decodes in batches of as many
    shape = [0, 0, 0]  # the engine's summed cache width before each step and rows computed, and its steps
    seconds = dict.fromkeys(backends, 0.0)
    tokens = dict.fromkeys(backends, 0)
    outputs = dict.fromkeys(backends, 0)
    forwards = dict.fromkeys(backends, 0)
    greedy_ids = {b: {} for b in backends}  # by (split, problem): backends finish chunks in other orders
    greedy_ok = {b: [] for b in backends}
    sample_ok = {b: {} for b in backends}
    sample_ent = {b: {} for b in backends}
    units = [(split, n, limit) for split in args.splits.split(",")
             for n, limit in ((0, args.problems), (args.samples, args.sampled_problems)) if limit > 0]
    for u, (split, n, limit) in enumerate(units):
        for backend in ("hf", "engine", "hf_rows") if u % 2 == 0 else ("engine", "hf_rows", "hf"):
            batch = rows.get("engine", args.batch_size) if backend == "hf_rows" else args.batch_size
            cfg = EvalConfig(model=args.model, benchmarks=[split], out="-", limit=limit, n_samples=n,
                             temperature=args.temperature, max_new_tokens=args.max_new_tokens, batch_size=batch,
                             rows=args.rows, stop_at_answer=True, backend=backend.removesuffix("_rows"))
            before = calls[0]
            took, res = decode_unit(model, tok, cfg)
            if backend == "engine":
                rows.setdefault("engine", res["stats"].batch_size)
                shape[0] += res["stats"].width_sum
                shape[1] += res["stats"].batch_rows
                shape[2] += res["stats"].forwards
            seconds[backend] += took
            forwards[backend] += calls[0] - before
            for (kind, i, _), o in res["outs"].items():
                tokens[backend] += len(o.ids)
                outputs[backend] += 1
                if kind == "greedy" and n:
                    continue  # the sampled part's greedy responses (cft eval decodes them) repeat the greedy part's
                ok = verify.grade(o.text, res["items"][i].problem.answer)[1]
                if kind == "greedy":
                    greedy_ids[backend][split, i] = o.ids
                    greedy_ok[backend].append(ok)
                else:
                    sample_ok[backend].setdefault((split, i), []).append(float(ok))
                    sample_ent[backend].setdefault((split, i), []).append(o.entropy)
            print(f"  {split} {'sampled' if n else 'greedy'} {backend}: {took:.1f}s", flush=True)
    for b in backends:
        print(f"{b:7s} outputs={outputs[b]} tokens={tokens[b]} tok/s={tokens[b] / seconds[b]:.0f} "
              f"seconds={seconds[b]:.1f} forwards={forwards[b]} tokens_per_forward={tokens[b] / forwards[b]:.1f} "
              f"rows={rows['engine'] if b != 'hf' else args.batch_size}")
    width, batch = (max(1, round(x / max(shape[2], 1))) for x in shape[:2])
    _, bare = bare_forward(model, batch, width, 1)
    print(f"bare    forward loop (StaticCache, argmax only): batch={batch} width={width} q=1 tok/s={bare:.0f}")
    rate = {b: tokens[b] / seconds[b] for b in backends}

    def mean(xs) -> float:
        return sum(xs) / max(len(xs), 1)

    def pooled(d: dict) -> float:
        return mean([x for xs in d.values() for x in xs])

    z = max(paired_z(sample_ok["engine"], sample_ok["hf"]), paired_z(sample_ent["engine"], sample_ent["hf"])) \
        if sample_ok["hf"] else 0.0
    identical = greedy_ids["hf"] == greedy_ids["engine"] == greedy_ids["hf_rows"]
    print(f"speedup={seconds['hf'] / seconds['engine']:.2f} greedy_identical={str(identical).lower()} "
          f"greedy_acc_hf={mean(greedy_ok['hf']):.4f} greedy_acc_engine={mean(greedy_ok['engine']):.4f} "
          f"sample_acc_hf={pooled(sample_ok['hf']):.4f} sample_acc_engine={pooled(sample_ok['engine']):.4f} "
          f"entropy_hf={pooled(sample_ent['hf']):.4f} entropy_engine={pooled(sample_ent['engine']):.4f} "
          f"sampled_z={z:.2f} hf_s={seconds['hf']:.1f} engine_s={seconds['engine']:.1f} "
          f"speedup_same_rows={seconds['hf_rows'] / seconds['engine']:.2f} hf_rows_s={seconds['hf_rows']:.1f} "
          f"rows={rows['engine']} forward_ceiling_tok_s={bare:.0f} engine_vs_bare={rate['engine'] / bare:.2f} "
          f"needed_vs_bare={2 * rate['hf'] / bare:.2f}")


if __name__ == "__main__":
    main()
