"""Stage B speed: the reference engine vs the fast engine on the same responses, in one process.

The reference engine labels the responses in ``--chunks`` chunks; the fast engine labels all of them at
once (its batch, as in use) ``--fast-runs`` times, spread among the reference's chunks, so machine noise
hits both alike (its time: the mean of its runs, which must agree). Prints, for each engine, branches, decoded tokens,
tokens/s, wall time and peak memory (the fast engine also its forwards and decoded tokens per row and
forward); the bare-forward ceiling: a loop of the model's forward alone at the engine's batch size and
mean cache width over a preallocated ``StaticCache``, argmax only, for one-token steps, for the
engine's most common query width and for its widest (1 + the most drafts); the throughput of plain
batched greedy ``model.generate`` (a concatenating cache: a reference point, not a bound); and as its last
line

    speedup=<reference wall / fast wall> labels_identical=<true|false> ceiling_fraction=<fast / generate tok/s>
    forward_ceiling_tok_s=<bare one-token tok/s> vs_bare=<fast tok/s / bare one-token tok/s>
    step_efficiency=<fast forwards/s / bare forwards/s of the same query width> tokens_per_forward=<...>
    vs_bare_bound=<the most bare tok/s of any query width / bare one-token tok/s>

(one line; with ``--compare-dtype D`` it goes on with ``dtype_speedup=<fast tok/s in D / in --dtype>
crosschecked=.. disagreements=.. disagreements_near_tie=..``, the crosscheck of the fast engine in D against
the reference engine in D). ``vs_bare`` above 1 is possible only by verifying drafts: several tokens per
row and forward. ``vs_bare_bound`` is what an engine would reach if every draft were accepted and it cost
nothing beyond the forward: the bare loop's own tokens/s at a wider query over its one-token tokens/s. No
engine's ``vs_bare`` can exceed it on the machine that printed it.

    python benchmarks/identify_speed.py                      # testbed model, 200 correct responses
    python benchmarks/identify_speed.py --model smollm2 --responses 10 --gold self --max-new-tokens 64
    python benchmarks/identify_speed.py --model smollm2 --responses 10 --gold self --max-new-tokens 64 \
        --compare-dtype bfloat16

``--gold self`` takes each response's own final answer as its gold, so every response is identified
(for a model that rarely solves a problem); the check is then on continuation token ids as well.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from cft.artifacts import load_records
from cft.decoding import engine, left_pad
from cft.decoding.api import DecodeConfig
from cft.decoding.engine import EngineStats
from cft.generate import GenerateConfig, generate
from cft.identify import IdentifyConfig, identify, summarize, without_margins
from cft.models import cache_kwarg, load_model, machine_line
from cft.verify import extract_answer


class PeakMemory:
    """Peak resident memory (CPU) or peak allocated memory (CUDA) above the level at entry."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peak = 0

    def __enter__(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.proc, self.stop = psutil.Process(), threading.Event()
        self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)

    def __exit__(self, *exc):
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()


def collect_responses(model, tok, args, work: Path) -> Path:
    """Greedy generations with at least ``--responses`` correct ones (or any, with ``--gold self``)."""
    gen = work / "generations.jsonl"
    generate(GenerateConfig(model=args.model, data=args.data, out=str(gen), template=args.template,
                            limit=args.problems, decode=DecodeConfig(max_new_tokens=args.max_new_tokens,
                                                                     batch_size=args.gen_batch_size)),
             model=model, tok=tok)
    records = load_records(gen, "generations")
    if args.gold == "self":
        for r in records:
            r["gold"] = extract_answer(r["response"]) or "<none>"
            r["correct"] = True
    # stage B skips responses cut at the length cap (their answer may be a fallback): choose finished ones
    chosen = [r for r in records if r["correct"] and r.get("finish") != "length"][: args.responses]
    if len(chosen) < args.responses:
        raise SystemExit(f"only {len(chosen)} correct, finished responses in {len(records)} problems; raise "
                         "--problems or --max-new-tokens")
    out = work / "chosen.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    Path(str(out) + ".meta.json").write_text(Path(str(gen) + ".meta.json").read_text())  # stage A's protocol
    return out


def run_engine(model, tok, args, gen: Path, work: Path, engine_name: str, tag: str = "",
               **options) -> tuple[dict, list[dict]]:
    out = work / f"labels-{engine_name}-{gen.stem}{tag}.jsonl"
    cfg = IdentifyConfig(model=args.model, input=str(gen), out=str(out), engine=engine_name, k=args.k,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, draft=args.draft, **options)
    with PeakMemory(model.device) as mem:
        s = identify(cfg, model=model, tok=tok)
    s["peak_memory_mb"] = mem.peak / 2**20
    return s, load_records(out, "labels")


def alternate(model, tok, args, chosen: Path, work: Path) -> tuple[dict, EngineStats]:
    """The reference engine chunk by chunk, and the fast engine on all the responses between its chunks.

    The fast engine runs ``--fast-runs`` times on every response at once (its batch is all of them, as in
    use), spread evenly among the reference's chunks (before the first, between, after the last), so that
    machine noise hits both alike; its time is the mean of its runs, and every run must give the same
    labels. Returns {engine: totals with its labels} and the fast engine's counts (of its last run).
    """
    records = load_records(chosen, "generations")
    n = max(1, min(args.chunks, len(records)))
    runs = max(1, args.fast_runs)
    slots = [round(i * n / max(runs - 1, 1)) for i in range(runs)] if runs > 1 else [0]
    totals = {e: {"labels": [], "seconds": 0.0, "decoded_tokens": 0, "branches": 0, "peak_memory_mb": 0.0}
              for e in ("reference", "fast")}
    fast_labels, fast_seconds = [], []
    meta = Path(str(chosen) + ".meta.json")
    for c in range(n + 1):
        for _ in range(slots.count(c)):
            s, labels = run_engine(model, tok, args, chosen, work, "fast", tag=f"run{len(fast_seconds)}")
            fast_seconds.append(s["seconds"])
            fast_labels.append(labels)
            t = totals["fast"]
            t.update(labels=labels, decoded_tokens=s["decoded_tokens"], branches=s["branches"],
                     peak_memory_mb=max(t["peak_memory_mb"], s["peak_memory_mb"]))
            stats = EngineStats(**{**{k: v for k, v in s["engine"].items() if k != "tokens_per_forward"},
                                   "widths": {int(q): n for q, n in s["engine"]["widths"].items()}})
        if c == n:
            break
        part = work / f"chunk{c}.jsonl"
        part.write_text("".join(json.dumps(r) + "\n" for r in records[c::n]))
        if meta.exists():  # stage A's protocol, for identify to inherit
            Path(str(part) + ".meta.json").write_text(meta.read_text())
        s, labels = run_engine(model, tok, args, part, work, "reference")
        t = totals["reference"]
        t["labels"] += labels
        t["seconds"] += s["seconds"]
        t["decoded_tokens"] += s["decoded_tokens"]
        t["branches"] += s["branches"]
        t["peak_memory_mb"] = max(t["peak_memory_mb"], s["peak_memory_mb"])
    totals["fast"]["seconds"] = sum(fast_seconds) / len(fast_seconds)
    totals["fast"]["runs_seconds"] = fast_seconds
    first = [without_margins(r) for r in fast_labels[0]]
    totals["fast"]["runs_identical"] = all([without_margins(r) for r in x] == first for x in fast_labels)
    order = {str(r["id"]): i for i, r in enumerate(records)}
    for t in totals.values():  # back into input order (chunk c holds responses c, c+n, ...)
        t["labels"].sort(key=lambda r: order[str(r["id"])])
        t["responses"] = len(t["labels"])
        t["tokens_per_second"] = t["decoded_tokens"] / max(t["seconds"], 1e-9)
        t["critical_fraction"] = summarize(t["labels"], tok)["critical_fraction"]
    return totals, stats


def compare_dtype(model, tok, args, chosen: Path, work: Path) -> dict:
    """The fast engine on the same responses in ``--dtype`` and in ``--compare-dtype``, ``--fast-runs`` times each,
    alternating (who goes first alternates too); the first run of the other dtype is crosschecked against
    the reference engine in that dtype (``--crosscheck`` random branches plus every near-tie).

    Returns tokens/s per dtype, their ratio, and the crosscheck's counts."""
    other, _ = load_model(args.model, args.compare_dtype, args.device)
    models = {args.dtype: model, args.compare_dtype: other}
    seconds = {d: [] for d in models}
    tokens, check = {}, {}
    for i in range(max(1, args.fast_runs)):
        for dtype in list(models) if i % 2 == 0 else list(models)[::-1]:
            first = dtype == args.compare_dtype and not seconds[dtype]
            s, _ = run_engine(models[dtype], tok, args, chosen, work, "fast", tag=f"-{dtype}{i}", dtype=dtype,
                              force_protocol=True, crosscheck=args.crosscheck if first else None)
            seconds[dtype].append(s["seconds"])
            tokens[dtype] = s["decoded_tokens"]
            if first:
                check = {k: s[k] for k in ("crosschecked", "crosschecked_near_ties", "disagreements",
                                           "disagreements_near_tie", "near_ties", "branches")}
    rate = {d: tokens[d] / (sum(seconds[d]) / len(seconds[d])) for d in models}
    return {"seconds": seconds, "tokens": tokens, "rate": rate, "ratio": rate[args.compare_dtype] / rate[args.dtype],
            **check}


@torch.inference_mode()
def bare_forward(model, batch: int, width: int, q: int, steps: int = 16) -> tuple[float, float]:
    """(forwards/s, tokens/s) of the model's forward alone: ``batch`` rows, a preallocated cache of
    ``width`` tokens plus the steps, ``q`` query tokens a row, argmax only (B*q tokens a forward)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=width + (steps + 2) * q)
    arg = {cache_kwarg(model): cache}
    ids = torch.randint(0, model.config.vocab_size, (batch, width), device=model.device)
    model(input_ids=ids, use_cache=True, **arg)
    step = ids[:, -q:]
    for i in range(steps + 1):  # the first step warms up
        if i == 1:
            sync(model)
            t0 = time.perf_counter()
        step = model(input_ids=step, use_cache=True, **arg).logits.argmax(-1)
    sync(model)
    seconds = time.perf_counter() - t0
    return steps / seconds, batch * q * steps / seconds


def sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


@torch.inference_mode()
def ceiling(model, tok, records: list[dict], batch_size: int, new_tokens: int) -> tuple[float, int]:
    """Decode tokens/s of plain batched greedy ``model.generate`` on ``batch_size`` prompts (prompt + half a response).

    No stop token and no stopping rule: every row decodes ``new_tokens`` tokens, and the tokens are
    counted from the output's shape, not assumed. The prefill is timed separately (a 1-token run) and
    subtracted, so the figure is decoding throughput alone. Returns (tokens/s, decode steps).
    """
    prompts = [r["prompt_ids"] + r["response_ids"][: len(r["response_ids"]) // 2] for r in records]
    prompts = (prompts * (batch_size // len(prompts) + 1))[:batch_size]
    pad = tok.pad_token_id
    ids, mask = left_pad(prompts, pad, model.device)
    width = ids.shape[1]
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # otherwise generate stops once every row has ended
    try:
        runs = []
        for n in (1, 1, new_tokens):  # the first 1-token run warms up
            t0 = time.time()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                 do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad)
            runs.append((time.time() - t0, out.shape[1] - width))
    finally:
        model.generation_config.eos_token_id = eos
    (_, _), (t1, n1), (tn, nn) = runs
    return batch_size * (nn - n1) / (tn - t1), nn


def compare(ref: list[dict], fast: list[dict]) -> tuple[bool, int, int]:
    """Labels identical? And over the branches both engines ran: how many, how many differ."""
    identical = len(ref) == len(fast) and all(a["critical"] == b["critical"] for a, b in zip(ref, fast))
    shared = differ = 0
    for a, b in zip(ref, fast):
        for ba, bb in zip(a["branches"], b["branches"]):
            for x, y in zip(ba, bb):
                if x["ok"] is not None and y["ok"] is not None:
                    shared += 1
                    differ += (x["ids"], x["ok"]) != (y["ids"], y["ok"])
    return identical, shared, differ


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="testbed")
    p.add_argument("--data", default="testbed:train")
    p.add_argument("--template", default="chat")
    p.add_argument("--responses", type=int, default=200)
    p.add_argument("--problems", type=int, default=600, help="problems to generate from")
    p.add_argument("--gold", choices=["data", "self"], default="data")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=None, help="fast engine rows (default: auto)")
    p.add_argument("--gen-batch-size", type=int, default=64)
    p.add_argument("--ceiling-tokens", type=int, default=128)
    p.add_argument("--chunks", type=int, default=4, help="the reference engine's chunks (the fast engine runs between)")
    p.add_argument("--fast-runs", type=int, default=3, help="fast engine runs on all the responses, spread among the "
                                                            "reference's chunks")
    p.add_argument("--draft", type=int, default=None, help="fast engine draft tokens (default: the engine's tuner)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--compare-dtype", default=None, help="also time the fast engine in this dtype (e.g. bfloat16) on "
                                                         "the same responses, alternating with --dtype")
    p.add_argument("--crosscheck", type=int, default=50, help="with --compare-dtype: random branches re-decoded by the "
                                                              "reference engine in that dtype, besides every near-tie")
    p.add_argument("--device", default=None)
    p.add_argument("--keep", default=None, help="keep the generations and both engines' labels in this folder")
    args = p.parse_args()
    print(f"machine: {machine_line()}", flush=True)  # the CPU, its capability and bf16 support: which machine

    model, tok = load_model(args.model, args.dtype, args.device)
    print(f"model={args.model} device={model.device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"draft={args.draft if args.draft is not None else f'tuned up to {engine.default_draft(model.device)}'} "
          f"ngram={engine.DRAFT_NGRAM}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        gen = collect_responses(model, tok, args, work)
        results, stats = alternate(model, tok, args, gen, work)
        for name, s in results.items():  # each engine's labels of every chunk, in one file (read by the tests)
            (work / f"labels-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in s["labels"]))
        widths = ",".join(f"{q}:{n}" for q, n in sorted(stats.widths.items()))  # forwards per query width
        for name, s in results.items():
            extra = (f" forwards={stats.forwards} mean_rows={stats.batch_rows / max(stats.forwards, 1):.1f} "
                     f"mean_q={stats.query_columns / max(stats.forwards, 1):.2f} "
                     f"tokens_per_forward={stats.tokens_per_forward:.2f} query_widths={widths} "
                     f"runs={'/'.join(f'{x:.1f}' for x in s['runs_seconds'])}s "
                     f"runs_identical={str(s['runs_identical']).lower()}" if name == "fast" else "")
            print(f"{name:9s} responses={s['responses']} branches={s['branches']} "
                  f"decoded_tokens={s['decoded_tokens']} tok/s={s['tokens_per_second']:.0f} "
                  f"wall={s['seconds']:.1f}s peak_mem={s['peak_memory_mb']:.0f}MB "
                  f"critical_fraction={s['critical_fraction']:.4f}{extra}")
        fast = results["fast"]
        batch = stats.batch_size
        width = round(stats.width_sum / max(stats.forwards, 1))
        q = max(stats.widths, key=stats.widths.get)
        widest = 1 + (args.draft if args.draft is not None else engine.default_draft(model.device))
        bare = {w: bare_forward(model, batch, width, w) for w in sorted({1, q, widest})}
        for w, (fps, tps) in bare.items():
            print(f"bare      forward loop (StaticCache, argmax only): batch={batch} width={width} q={w} "
                  f"forwards/s={fps:.1f} tok/s={tps:.0f}")
        ceil, steps = ceiling(model, tok, fast["labels"], batch, args.ceiling_tokens)
        print(f"ceiling   plain batched greedy generate: batch={batch} new_tokens={steps} tok/s={ceil:.0f}")
        identical, shared, differ = compare(results["reference"]["labels"], fast["labels"])
        print(f"branches run by both engines: {shared}, with different continuation ids or verdicts: {differ}")
        dtypes = ""
        if args.compare_dtype:
            c = compare_dtype(model, tok, args, gen, work)
            for d in c["rate"]:
                print(f"dtype     {d}: fast engine tok/s={c['rate'][d]:.0f} decoded_tokens={c['tokens'][d]} "
                      f"runs={'/'.join(f'{x:.1f}' for x in c['seconds'][d])}s")
            print(f"crosscheck ({args.compare_dtype}, fast vs reference engine): {c['crosschecked']} re-decoded "
                  f"({c['crosschecked_near_ties']} near-ties of {c['branches']} branches), {c['disagreements']} "
                  f"disagreements, {c['disagreements_near_tie']} of them on near-ties")
            dtypes = (f" dtype_speedup={c['ratio']:.2f} crosschecked={c['crosschecked']} "
                      f"disagreements={c['disagreements']} disagreements_near_tie={c['disagreements_near_tie']}")
        speedup = results["reference"]["seconds"] / fast["seconds"]
        same = identical and differ == 0 and fast["runs_identical"]
        print(f"speedup={speedup:.1f} labels_identical={str(same).lower()} "
              f"ceiling_fraction={fast['tokens_per_second'] / ceil:.2f} "
              f"forward_ceiling_tok_s={bare[1][1]:.0f} vs_bare={fast['tokens_per_second'] / bare[1][1]:.2f} "
              f"step_efficiency={stats.forwards / fast['seconds'] / bare[q][0]:.2f} "
              f"tokens_per_forward={stats.tokens_per_forward:.2f} "
              f"vs_bare_bound={max(t for _, t in bare.values()) / bare[1][1]:.2f}{dtypes}")


if __name__ == "__main__":
    main()
