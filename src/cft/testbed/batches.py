"""Training batches of testbed solutions: the testbed's pretraining and the zoo's tiny families learn from them."""

from __future__ import annotations

import random

import torch

from cft.prompts import render_ids
from cft.testbed.problems import SPLITS, make_problem


def training_batch(tok, rng: random.Random, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` fresh train-split problems as (prompt + solution ids, labels with the prompt masked), padded."""
    _, lo, hi, max_value = SPLITS["train"]
    seqs, labels = [], []
    for _ in range(n):
        p = make_problem(rng, "pretrain", lo, hi, max_value)
        prompt = render_ids(tok, p.question)
        resp = tok(p.solution + tok.eos_token, add_special_tokens=False).input_ids
        seqs.append(prompt + resp)
        labels.append([-100] * len(prompt) + resp)
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
    return ids, lab
