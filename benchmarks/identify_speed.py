"""Stage B speed: the reference engine vs the fast engine on the same responses, in one process.

Prints, for each engine, branches, decoded tokens, tokens/s, wall time and peak memory; the
throughput of plain batched greedy decoding of the same model (``model.generate`` on a full batch,
no early stop: the practical ceiling); and as its last line
``speedup=<fast vs reference> labels_identical=<true|false> ceiling_fraction=<fast tok/s / ceiling tok/s>``.

    python benchmarks/identify_speed.py                      # testbed model, 200 correct responses
    python benchmarks/identify_speed.py --model smollm2 --responses 10 --gold self --max-new-tokens 64

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
from cft.engine import auto_batch_size
from cft.generate import DecodeConfig, GenerateConfig, generate, left_pad
from cft.identify import IdentifyConfig, identify
from cft.models import load_model
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
    chosen = [r for r in records if r["correct"]][: args.responses]
    if len(chosen) < args.responses:
        raise SystemExit(f"only {len(chosen)} correct responses in {len(records)} problems; raise --problems")
    out = work / "chosen.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return out


def run_engine(model, tok, args, gen: Path, work: Path, engine: str) -> tuple[dict, list[dict]]:
    out = work / f"labels-{engine}.jsonl"
    cfg = IdentifyConfig(model=args.model, input=str(gen), out=str(out), engine=engine, k=args.k,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    with PeakMemory(model.device) as mem:
        s = identify(cfg, model=model, tok=tok)
    s["peak_memory_mb"] = mem.peak / 2**20
    return s, load_records(out, "labels")


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
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--keep", default=None, help="keep the generations and both engines' labels in this folder")
    args = p.parse_args()

    model, tok = load_model(args.model, args.dtype, args.device)
    print(f"model={args.model} device={model.device} dtype={args.dtype} threads={torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        gen = collect_responses(model, tok, args, work)
        results = {}
        for engine in ("reference", "fast"):
            results[engine], labels = run_engine(model, tok, args, gen, work, engine)
            results[engine]["labels"] = labels
            s = results[engine]
            print(f"{engine:9s} responses={s['responses']} branches={s['branches']} "
                  f"decoded_tokens={s['decoded_tokens']} tok/s={s['tokens_per_second']:.0f} "
                  f"wall={s['seconds']:.1f}s peak_mem={s['peak_memory_mb']:.0f}MB "
                  f"critical_fraction={s['critical_fraction']:.4f}")
        batch = args.batch_size or auto_batch_size(
            model, max(len(r["prompt_ids"]) for r in results["fast"]["labels"]) + args.max_new_tokens)
        ceil, steps = ceiling(model, tok, results["fast"]["labels"], batch, args.ceiling_tokens)
        print(f"ceiling   plain batched greedy generate: batch={batch} new_tokens={steps} tok/s={ceil:.0f}")
        identical, shared, differ = compare(results["reference"]["labels"], results["fast"]["labels"])
        print(f"branches run by both engines: {shared}, with different continuation ids or verdicts: {differ}")
        speedup = results["reference"]["seconds"] / results["fast"]["seconds"]
        print(f"speedup={speedup:.1f} labels_identical={str(identical and differ == 0).lower()} "
              f"ceiling_fraction={results['fast']['tokens_per_second'] / ceil:.2f}")


if __name__ == "__main__":
    main()
