"""float32 against bfloat16 on this machine: evaluation's decoding and one training step, alternated in one process.

Whether bfloat16 pays depends on the CPU: with native bfloat16 (AVX512_BF16, AMX) its matrix products run
faster than float32's, without it (AVX2 only) several times slower. This measures the two costs a study pays
most often, on the model it will use, so the choice of ``eval_dtype`` and ``train_args.bf16`` in an experiment
config is a measurement, not a guess:

- decode: ``decoding.api.decode`` (the engine backend ``cft eval`` uses) greedy on ``--problems`` problems of
  ``--data``, the model loaded in each dtype (the outputs differ in the last bits of the logits, so the token
  counts differ a little; tokens/s is the comparison);
- train step: forward, backward and AdamW on a batch of ``--batch`` x ``--seq`` tokens (the first half of each
  sequence unlabelled, as a prompt), float32 weights, with and without ``torch.autocast(bfloat16)`` (what
  ``bf16: true`` in TRL's arguments does), scored as ``cft train`` and ``cft grpo`` score tokens off a GPU
  (``train.plain_lm_head``: from the model's own logits);
- the head: the same bfloat16 step scored through TRL's fused LM head (``add_fused_lm_head``, what both trainers
  use on a GPU) instead, to show what the plain head saves off a GPU.

Each side runs once uncounted, then ``--rounds`` times in ABBA order, so drift hits both alike. Prints every
run and as its last line

    decode_bf16_over_fp32=<tokens/s ratio> train_fp32_over_bf16=<seconds ratio> decode_fp32_tok_s=..
    decode_bf16_tok_s=.. train_fp32_s=.. train_bf16_s=.. fused_over_plain=<seconds ratio> train_bf16_fused_s=..
    native_bf16=<true|false> rounds=<n>

(one line; a ratio above 1 means bfloat16, or the plain head, is faster).

    python benchmarks/dtype_speed.py --model smollm2 --data arith:test --problems 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from types import SimpleNamespace

import torch
from trl.trainer.utils import add_fused_lm_head

from cft.data import load_problems
from cft.decoding.api import DecodeConfig, decode
from cft.models import cpu_bf16_native, load_model, machine_line
from cft.prompts import render_ids
from cft.train import plain_lm_head


def decode_rate(model, tok, prompts: list[list[int]], max_new_tokens: int) -> float:
    t = time.perf_counter()
    outs = decode(model, tok, prompts, DecodeConfig(max_new_tokens=max_new_tokens))
    return sum(len(o[0].ids) for o in outs) / (time.perf_counter() - t)


def train_step(model, batch: dict[str, torch.Tensor], bf16: bool, fused_head=None) -> float:
    """One step; ``fused_head``: TRL's fused forward of ``model`` to score through instead of the plain head."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-12)  # a real step, too small to drift between rounds
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        scores = (fused_head or model)(**batch, use_cache=False, fused_lm_head=True)
        loss = -scores.log_probs.sum() / scores.label_mask.sum()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="testbed")
    ap.add_argument("--data", default="testbed:test")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16, help="training sequences per step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per training sequence")
    ap.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each runs both sides twice)")
    args = ap.parse_args()
    print(machine_line(), f"load={os.getloadavg()[0]:.2f}")
    models = {dt: load_model(args.model, dt, "cpu") for dt in ("float32", "bfloat16")}
    tok = models["float32"][1]
    prompts = [render_ids(tok, p.question, "chat") for p in load_problems(args.data, limit=args.problems)]
    trainee = load_model(args.model, "float32", "cpu")[0].train()
    add_fused_lm_head(trainee, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does
    fused_head = trainee.forward
    plain_lm_head(SimpleNamespace(model=trainee))  # as cft's trainers then do off a GPU
    seeded = torch.Generator().manual_seed(0)
    ids = torch.randint(0, trainee.config.vocab_size, (args.batch, args.seq), generator=seeded)
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    runs = {(part, dt): [] for part in ("decode", "train") for dt in models} | {("fused", "bfloat16"): []}
    order = ["float32", "bfloat16"]
    for r in range(args.rounds * 2 + 1):
        for dt in order if r % 2 == 0 else order[::-1]:
            times = {"decode": decode_rate(*models[dt], prompts, args.max_new_tokens),
                     "train": train_step(trainee, batch, bf16=dt == "bfloat16")}
            if dt == "bfloat16":
                times["fused"] = train_step(trainee, batch, bf16=True, fused_head=fused_head)
            counted = r > 0
            print(f"round {r}{'' if counted else ' (warm-up)'} {dt}: decode {times['decode']:.1f} tok/s, train step "
                  f"{times['train']:.2f} s" + (f", fused head {times['fused']:.2f} s" if "fused" in times else ""))
            if counted:
                for part, value in times.items():
                    runs[part, dt].append(value)
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"decode_bf16_over_fp32={med['decode', 'bfloat16'] / med['decode', 'float32']:.3f} "
          f"train_fp32_over_bf16={med['train', 'float32'] / med['train', 'bfloat16']:.3f} "
          f"decode_fp32_tok_s={med['decode', 'float32']:.1f} decode_bf16_tok_s={med['decode', 'bfloat16']:.1f} "
          f"train_fp32_s={med['train', 'float32']:.3f} train_bf16_s={med['train', 'bfloat16']:.3f} "
          f"fused_over_plain={med['fused', 'bfloat16'] / med['train', 'bfloat16']:.3f} "
          f"train_bf16_fused_s={med['fused', 'bfloat16']:.3f} "
          f"native_bf16={str(cpu_bf16_native()).lower()} rounds={args.rounds}")


if __name__ == "__main__":
    main()
