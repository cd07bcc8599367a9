"""A plain-torch RLOO loop: the independent check of `cft grpo` (benchmarks/grpo_check.py, tests/test_grpo.py).

It shares nothing with TRL's GRPOTrainer or with transformers' ``generate``: prompts are the project's own
``render_ids``; completions are sampled token by token from the model's own forward (a KV cache; the step's
prompts left-padded to one batch with an attention mask and positions; no top-k/top-p, only the temperature); the
reward is
``cft.verify.grade`` on the decoded text; the baseline is leave-one-out over the prompt's k completions; the update
is one ``torch.optim.Adam`` step (constant learning rate) on ``-sum_i A_i log p(completion_i) / n`` (n:
completions of the step). If `cft grpo` and this loop disagree on whether the reward rises at comparable settings,
the difference is in the trainer, not in the model, data or reward.
"""

from __future__ import annotations

import random
import time

import torch

from cft.data import load_problems
from cft.models import cache_kwarg, load_model
from cft.prompts import render_ids
from cft.verify import grade

PROGRESS_EVERY = 32  # steps between rloo's progress lines


@torch.no_grad()
def sample(model, prompts: list[list[int]], k: int, max_new_tokens: int, eos: int, pad: int, temperature: float,
           generator: torch.Generator) -> list[list[list[int]]]:
    """k completions of each prompt, each ending at its first EOS (kept) or at ``max_new_tokens``.

    All ``len(prompts) * k`` rows decode together: prompts are left-padded to the longest, with an attention
    mask and positions that start at each prompt's first real token."""
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    rows = [p for p in prompts for _ in range(k)]
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    done = torch.zeros(len(rows), dtype=torch.bool)
    cache, step_in, new = DynamicCache(), ids, []
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -step_in.shape[1]:]
        logits = model(input_ids=step_in, attention_mask=mask, position_ids=positions, use_cache=True,
                       **{cache_kwarg(model): cache}).logits[:, -1].float()
        nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(1)
        nxt[done] = eos  # finished rows only pad; the padding is cut below
        new.append(nxt)
        step_in = nxt[:, None]
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype)], 1)
        done |= nxt == eos
        if done.all():
            break
    out = []
    for row in torch.stack(new, 1).tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return [out[i * k:(i + 1) * k] for i in range(len(prompts))]


def rollout(model, tok, batch, k: int, max_new_tokens: int, temperature: float, generator: torch.Generator):
    """k completions per problem of ``batch``: ``(sequences, advantages, rewards)``; the sequences are
    ``(prompt ids, completion ids)`` with a non-zero leave-one-out advantage (the others carry no gradient)."""
    seqs, advantages, rewards = [], [], []
    prompts = [render_ids(tok, p.question) for p in batch]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for p, prompt, comps in zip(batch, prompts, sample(model, prompts, k, max_new_tokens, tok.eos_token_id, pad,
                                                        temperature, generator), strict=True):
        r = [float(grade(tok.decode(c, skip_special_tokens=True), p.answer)[1]) for c in comps]
        rewards += r
        for c, ri in zip(comps, r, strict=True):
            a = ri - (sum(r) - ri) / (k - 1)
            if a != 0:
                seqs.append((prompt, c))
                advantages.append(a)
    return seqs, advantages, rewards


def policy_loss(model, tok, seqs, advantages, n: int, temperature: float) -> torch.Tensor:
    """``-sum_i A_i log p(completion_i | prompt_i) / n``, one right-padded forward over the sequences."""
    width = max(len(p) + len(c) for p, c in seqs)
    pad = tok.pad_token_id
    ids = torch.tensor([p + c + [pad] * (width - len(p) - len(c)) for p, c in seqs])
    attention = torch.tensor([[1] * (len(p) + len(c)) + [0] * (width - len(p) - len(c)) for p, c in seqs])
    scored = torch.tensor([[0] * len(p) + [1] * len(c) + [0] * (width - len(p) - len(c)) for p, c in seqs])[:, 1:]
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float() / temperature
    logp = torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None]).squeeze(2)
    return -(torch.tensor(advantages) * (logp * scored).sum(1)).sum() / n


def batches(problems: list, prompts_per_step: int, rng: random.Random):
    """Problems ``prompts_per_step`` at a time, from a fresh shuffle of all of them each epoch (as TRL's sampler)."""
    order: list = []
    while True:
        if len(order) < prompts_per_step:
            order += rng.sample(problems, len(problems))
        batch, order = order[:prompts_per_step], order[prompts_per_step:]
        yield batch


def rloo(init: str, *, data: str = "testbed:train", limit: int = 1000, steps: int = 60, lr: float = 3e-5,
         prompts_per_step: int = 4, k: int = 8, max_new_tokens: int = 128, temperature: float = 1.0,
         seed: int = 0, log=None) -> list[float]:
    """Train ``init`` with RLOO on the verifier's reward; returns the mean reward of each step's completions.

    ``limit`` problems of ``data``, ``prompts_per_step`` of them per step. ``log``: called with each step's row
    (default: a progress line every ``PROGRESS_EVERY`` steps on stdout; ``log=False`` for none).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, tok = load_model(init, device="cpu")
    model.eval()  # no dropout: the policy that samples is the one that is scored
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    stream = batches(load_problems(data, seed=seed, limit=limit), prompts_per_step, random.Random(seed))
    rewards_per_step, t0 = [], time.time()
    for step in range(steps):
        seqs, advantages, rewards = rollout(model, tok, next(stream), k, max_new_tokens, temperature, gen)
        if seqs:
            opt.zero_grad()
            policy_loss(model, tok, seqs, advantages, len(rewards), temperature).backward()
            opt.step()
        rewards_per_step.append(sum(rewards) / len(rewards))
        if log:
            log({"step": step + 1, "reward": rewards_per_step[-1]})
        elif log is None and (step + 1) % PROGRESS_EVERY == 0:
            recent = rewards_per_step[-PROGRESS_EVERY:]
            print(f"rloo: step {step + 1}/{steps}, mean reward of the last {len(recent)} steps "
                  f"{sum(recent) / len(recent):.3f}, {time.time() - t0:.0f} s", flush=True)
    return rewards_per_step


def gradient_agreement(init: str, *, data: str = "testbed:train", limit: int = 1000, batches_: int = 12,
                       prompts_per_step: int = 4, k: int = 4, max_new_tokens: int = 128, temperature: float = 1.0,
                       seed: int = 0) -> float:
    """Mean pairwise cosine between the policy gradients of ``batches_`` independent steps at ``init``.

    Near 0: one step's gradient is almost all sampling noise (the mean gradient's share of a step's squared norm
    is about this cosine); an optimizer that moves every weight by about the learning rate (Adam) then walks."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, tok = load_model(init, device="cpu")
    model.eval()
    stream = batches(load_problems(data, seed=seed, limit=limit), prompts_per_step, random.Random(seed))
    grads = []
    while len(grads) < batches_:
        seqs, advantages, rewards = rollout(model, tok, next(stream), k, max_new_tokens, temperature, gen)
        if not seqs:
            continue
        model.zero_grad()
        policy_loss(model, tok, seqs, advantages, len(rewards), temperature).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    g = torch.nn.functional.normalize(torch.stack(grads), dim=1)
    cos = g @ g.T
    return float((cos.sum() - cos.diagonal().sum()) / (batches_ * (batches_ - 1)))


if __name__ == "__main__":  # python benchmarks/rloo.py INIT [--limit N --prompts-per-step P --k K --steps S --lr LR]
    import argparse

    p = argparse.ArgumentParser(description="the plain-torch RLOO loop; prints the mean reward of the first and "
                                            "last fifth of the steps")
    p.add_argument("init")
    for name, kind, default in (("limit", int, 1000), ("prompts-per-step", int, 4), ("k", int, 8),
                                ("steps", int, 60), ("lr", float, 3e-5), ("seed", int, 0)):
        p.add_argument(f"--{name}", type=kind, default=default)
    a = p.parse_args()
    r = rloo(a.init, limit=a.limit, prompts_per_step=a.prompts_per_step, k=a.k, steps=a.steps, lr=a.lr, seed=a.seed)
    n = max(1, len(r) // 5)
    print(f"reward_first={sum(r[:n]) / n:.3f} reward_last={sum(r[-n:]) / n:.3f} steps={len(r)}")
