"""The ``hf`` backend: transformers' ``model.generate`` over left-padded token-id prompts, in fixed batches.

A batch that runs out of memory is retried in halves. Sampling applies the temperature in ``Temperature``
(which also records each step's entropy) and draws from torch's global generator, seeded once per call.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from cft.decoding import (
    AnswerStop,
    Output,
    StopRule,
    finish_reason,
    is_out_of_memory,
    left_pad,
    pinned_generate,
    pinned_generation_config,
)
from cft.decoding.api import DecodeConfig
from cft.decoding.backends import register
from cft.models import stop_token_ids
from cft.progress import Progress

log = logging.getLogger(__name__)


class Temperature(LogitsProcessor):
    """Apply the temperature ourselves and record each step's entropy of the sampling distribution."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.entropies: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        scores = scores.float() / self.temperature
        logp = torch.log_softmax(scores, dim=-1)
        self.entropies.append(-(logp.exp() * logp).nan_to_num().sum(-1))
        return scores


@torch.inference_mode()
def decode_hf(model, tok, prompts: list[list[int]], cfg: DecodeConfig,
               progress: Progress | None = None) -> list[list[Output]]:
    """``model.generate`` in batches of ``cfg.batch_size`` rows; an out-of-memory batch is retried in halves."""
    eos = stop_token_ids(tok, model)
    rule = StopRule.of(tok, model, cfg.stop_at_answer)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[Output]] = [[] for _ in prompts]
    jobs = [i for i in order for _ in range(cfg.n)]
    torch.manual_seed(cfg.seed)
    start, size = 0, cfg.batch_size
    while start < len(jobs):
        batch = jobs[start : start + size]
        try:
            outs = _decode_batch(model, tok, [prompts[i] for i in batch], cfg, eos, rule)
        except RuntimeError as exc:
            if not is_out_of_memory(exc) or len(batch) == 1:
                raise
            outs = None  # retried below, once the exception (and the failed batch's tensors) are released
        if outs is None:
            size = len(batch) // 2  # later batches keep the size that fits
            log.warning("decode: out of memory on a batch of %d, retrying with batches of %d", len(batch), size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        for i, o in zip(batch, outs):
            results[i].append(o)
        if progress:
            progress.advance(len(batch), tokens=sum(len(o.ids) for o in outs))
        start += len(batch)
    return results


def _decode_batch(model, tok, prompts: list[list[int]], cfg: DecodeConfig, eos: list[int],
                  rule: StopRule) -> list[Output]:
    """One ``model.generate`` call over left-padded prompts: one output per prompt."""
    pad = tok.pad_token_id
    input_ids, mask = left_pad(prompts, pad, model.device)
    width = input_ids.shape[1]
    answer_stop = AnswerStop(rule, width, model.device) if rule.stop_at_answer else None
    stops = StoppingCriteriaList([answer_stop] if answer_stop else [])
    temp = Temperature(cfg.temperature) if cfg.temperature > 0 else None
    out = pinned_generate(
        model, pinned_generation_config(eos, pad, cfg.max_new_tokens, temp is not None),
        input_ids=input_ids, attention_mask=mask,
        logits_processor=LogitsProcessorList([temp] if temp else []), stopping_criteria=stops,
    )
    new = out[:, width:].tolist()
    ent = torch.stack(temp.entropies, dim=1).tolist() if temp else None
    outputs = []
    for row, ids in enumerate(new):
        # A row ends at its EOS or where the answer rule stopped it; what follows is padding, which may
        # be the EOS token itself (pad == eos), so the recorded stop length decides, not the padding.
        end = next((k + 1 for k, t in enumerate(ids) if t in eos), len(ids))
        if answer_stop is not None:
            end = min(end, answer_stop.lengths.get(row, end))
        ids = ids[:end]
        text = tok.decode(ids, skip_special_tokens=True)
        mean_ent = sum(ent[row][: len(ids)]) / max(len(ids), 1) if ent else None
        outputs.append(Output(ids, text, finish_reason(ids, set(eos), text, cfg.stop_at_answer), mean_ent))
    return outputs


def prompts(model, tok, groups, first, wanted, progress=None, stats=None):
    """Group by group (its sampling draws from one generator per call): a group with any wanted output is
    decoded whole and only those are yielded."""
    for g, (group_prompts, cfg) in enumerate(groups):
        keep = [(i, j) for i in range(len(group_prompts)) for j in range(cfg.n) if wanted(g, i, j)]
        if not keep:
            continue
        outs = decode_hf(model, tok, group_prompts, replace(cfg, backend="hf"), progress)
        yield from ((g, i, j, outs[i][j]) for i, j in keep)


def continuations(model, tok, starts, cfg):
    """Decodes to the largest cap and cuts (a greedy decode cut at n tokens is the decode capped at n)."""
    eos = set(stop_token_ids(tok, model))
    cut = []
    for (_, cap), (out,) in zip(starts, decode_hf(model, tok, [ids for ids, _ in starts], cfg)):
        ids = out.ids[:cap]
        text = tok.decode(ids, skip_special_tokens=True)
        cut.append(Output(ids, text, finish_reason(ids, eos, text, cfg.stop_at_answer)))
    return cut


register("hf", prompts=prompts, continuations=continuations)
