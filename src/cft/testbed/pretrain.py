"""Pretrain the testbed model from scratch until its greedy accuracy lands in a target band.

The model must be imperfect (room to improve) yet right often enough to give D_correct; training
stops at the first evaluation whose greedy accuracy on the held-out ``valid`` split falls inside
``target``. Fresh problems are drawn every step, so there is no over-fitting to a fixed set.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cft.decoding.api import DecodeConfig, decode
from cft.prompts import render_ids
from cft.testbed.batches import training_batch
from cft.testbed.problems import generate_split
from cft.testbed.tokenizer import build_tokenizer
from cft.verify import grade


@dataclass
class PretrainConfig:
    seed: int = 0
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 384
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    max_steps: int = 6000
    eval_every: int = 100
    eval_size: int = 200
    test_size: int = 500  # testbed:test problems scored once training stops (recorded as test_accuracy_N)
    target: tuple[float, float] = (0.40, 0.65)
    threads: int = 1  # one thread: the same float sums (so the same model) on any machine, no OpenMP contention


def build_model(tok, cfg: PretrainConfig) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


def greedy_accuracy(model, tok, split: str, n: int) -> float:
    problems = generate_split(split, n)
    outs = decode(model, tok, [render_ids(tok, p.question) for p in problems],
                  DecodeConfig(max_new_tokens=160, batch_size=128))
    return sum(grade(o[0].text, p.answer)[1] for o, p in zip(outs, problems)) / len(problems)


def pretrain(out_dir: str | Path, cfg: PretrainConfig = PretrainConfig(), log=print) -> dict:
    """Train, stop inside the target band, save a standard HF folder; returns the training record."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tok = build_tokenizer()
    model = build_model(tok, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    history, t0, acc = [], time.time(), 0.0
    for step in range(1, cfg.max_steps + 1):
        model.train()
        ids, lab = training_batch(tok, rng, cfg.batch_size)
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0:
            log(json.dumps({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - t0, 1)}))
        if step % cfg.eval_every == 0:
            model.eval()
            acc = greedy_accuracy(model, tok, "valid", cfg.eval_size)
            history.append({"step": step, "loss": round(loss.item(), 4), "valid_accuracy": acc,
                            "seconds": round(time.time() - t0, 1)})
            log(json.dumps(history[-1]))
            if cfg.target[0] <= acc <= cfg.target[1]:
                break
            if acc > cfg.target[1]:
                raise RuntimeError(f"accuracy {acc:.3f} jumped past the target band; lower eval_every or lr")
    model.eval()
    test_acc = greedy_accuracy(model, tok, "test", cfg.test_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    record = {"config": asdict(cfg), "history": history, "steps": step, "valid_accuracy": acc,
              f"test_accuracy_{cfg.test_size}": test_acc, "parameters": sum(p.numel() for p in model.parameters())}
    (out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
