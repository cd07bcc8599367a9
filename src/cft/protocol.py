"""Stage B's protocol, shared by both engines (``identify``'s reference path and ``cft.decoding.engine``).

A ``Work`` is one response under identification; ``teacher_forced`` ranks its candidates in the order
(-logit, then token id) with their true ranks; ``Protocol`` holds the stop rule of a branch and its
verdict; ``finish_branch`` records a branch's outcome as a ``branch_record``; ``reference_branch`` decodes
one branch the plain way (the reference engine, the crosscheck, and the fast engine's exact path at
near-ties). Both engines import these and nothing else of each other, so their labels follow one rule
(see ``cft.identify`` for the protocol).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteriaList

from cft import verify
from cft.answer_watch import AnswerWatch
from cft.decoding import AnswerStop, StopRule, pinned_generate, pinned_generation_config
from cft.models import cache_kwarg


@dataclass
class Work:
    """One response under identification and the outcome of its branches."""

    key: str
    record: dict
    prompt_ids: list[int]
    response_ids: list[int]
    gold: str
    alternatives: list[list[int]]  # per position, alternatives in rank order ([] = not tested)
    greedy_mismatches: list[int]
    results: list[list[dict | None]]  # per position, per alternative: branch outcome
    open_branches: int = 0
    ranks: list[list[int]] = field(default_factory=list)  # per position, each alternative's true rank
    alt_margin: list[float | None] = field(default_factory=list)  # last alternative's logit minus the next one's

    @property
    def done(self) -> bool:
        return self.open_branches == 0


@dataclass
class Verdict:
    """A branch's grade: ``ok`` is None when the verifier failed twice (unknown, never wrong)."""

    ok: bool | None
    answer: str | None
    error: str | None


class Protocol:
    """The stop rule and the verdict, shared by both engines so their labels agree.

    ``cfg`` is the run's ``IdentifyConfig`` (read: max_new_tokens, stop_at_answer, continuation_cap,
    store_continuations).
    """

    def __init__(self, tok, model, cfg):
        self.tok, self.cfg = tok, cfg
        self.rule = StopRule.of(tok, model, cfg.stop_at_answer)
        self.eos = self.rule.eos

    def watch(self) -> AnswerWatch | None:
        """Incremental answer detection for one branch (None: the tokenizer decodes only as a whole)."""
        return self.rule.watch()

    def budget(self, t: int) -> int:
        """How many tokens may follow the alternative at response position t."""
        left = self.cfg.max_new_tokens - (t + 1)
        if self.cfg.continuation_cap is not None:
            left = min(left, self.cfg.continuation_cap)
        return max(left, 0)

    def stopped(self, response: list[int], n_new: int, t: int, watch: AnswerWatch | None = None) -> bool:
        """Whether a branch whose response is ``response`` (ending in ``n_new`` continuation tokens) ends.

        ``watch`` (from ``watch``, fed this same growing list) gives the answer rule's verdict without
        decoding the whole response at every trigger token.
        """
        return self.rule.ended(response, n_new, self.budget(t), watch)

    def verdict(self, response: list[int], gold: str) -> Verdict:
        """Grade a branch; a verifier timeout or crash is retried once, then the verdict is unknown.

        The retry bypasses the verdict cache (which keeps timeouts), so machine load at one moment
        cannot make a token critical.
        """
        text = self.tok.decode(response, skip_special_tokens=True)
        result = verify.grade_detailed(text, gold)
        if result.timed_out or result.error:
            verify.clear_cache()
            result = verify.grade_detailed(text, gold)
        if result.timed_out or result.error:
            return Verdict(None, result.prediction, "timeout" if result.timed_out else result.error)
        return Verdict(result.correct, result.prediction, None)


def ranked(logits: torch.Tensor, n: int, extra: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` (values, ids) of every row in the stable order (-logit, then token id).

    ``torch.topk`` leaves the order of exact ties unspecified (common in bf16); this sorts a few more
    candidates by id and value, and sorts the whole row only when a tie reaches past them.
    """
    vocab = logits.shape[-1]
    n = min(n, vocab)
    m = min(n + extra, vocab)
    vals, ids = torch.topk(logits, m, dim=-1)
    ids, perm = torch.sort(ids, dim=-1)
    vals = vals.gather(-1, perm)
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    vals, ids = vals.gather(-1, order), ids.gather(-1, order)
    if m < vocab:
        for row in torch.nonzero(vals[:, n - 1] == vals[:, m - 1]).flatten().tolist():
            v, i = torch.sort(logits[row], descending=True, stable=True)
            vals[row], ids[row] = v[:m], i[:m]
    return vals[:, :n], ids[:, :n]


def true_ranks(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Rank (1 = first) of ``tokens[t]`` in row t of ``logits`` under the order (-logit, then id)."""
    own = logits.gather(-1, tokens[:, None])
    ids = torch.arange(logits.shape[-1], device=logits.device)
    ahead = (logits > own) | ((logits == own) & (ids[None, :] < tokens[:, None]))
    return ahead.sum(-1) + 1


@dataclass
class Forced:
    """The teacher-forced pass over prompt + Y: ranked candidates per position and Y's own ranks."""

    values: list[list[float]]  # per position, the top k+1 logits in order
    ids: list[list[int]]  # their token ids
    y_rank: list[int]
    top1_prob: list[float]
    cache: object = None


@torch.inference_mode()
def teacher_forced(model, prompt_ids: list[int], response_ids: list[int], k: int, use_cache: bool = False) -> Forced:
    """The top k+1 tokens at every response position (order (-logit, id)) from one forward pass."""
    from transformers import DynamicCache

    ids = torch.tensor([prompt_ids + response_ids], device=model.device)
    # a plain DynamicCache keeps every layer's keys (a config-built one would drop a sliding layer's
    # older keys, which the branches of later positions still need)
    cache = {cache_kwarg(model): DynamicCache()} if use_cache else {}
    out = model(input_ids=ids, use_cache=use_cache, **cache)
    logits = out.logits[0, len(prompt_ids) - 1 : -1].float()
    vals, top = ranked(logits, k + 1)
    y = torch.tensor(response_ids, device=logits.device)
    top1_prob = torch.exp(vals[:, 0] - torch.logsumexp(logits, dim=-1))
    return Forced(vals.tolist(), top.tolist(), true_ranks(logits, y).tolist(), top1_prob.tolist(),
                  getattr(out, cache_kwarg(model)) if use_cache else None)


def finish_branch(work: Work, t: int, j: int, cont: list[int], proto: Protocol, margin: float | None = None) -> bool:
    """Record branch (t, j)'s outcome; True when it succeeded (the token is then replaceable).

    ``margin`` is the smallest top-1 minus top-2 logit gap over the decoded continuation (None: nothing
    decoded), recorded as its order of magnitude (``round_margin``). An unknown verdict is not a success: the
    next rank still runs.
    """
    response = work.response_ids[:t] + [work.alternatives[t][j]] + cont
    v = proto.verdict(response, work.gold)
    work.results[t][j] = branch_record(work, t, j, ok=v.ok, answer=v.answer,
                                       ids=cont if proto.cfg.store_continuations else None,
                                       margin=None if margin is None else round_margin(margin), verify_error=v.error)
    return v.ok is True


def round_margin(margin: float) -> float:
    """A margin as recorded: the largest power of ten not above it (its order of magnitude; 0 for an exact tie).
    Its last bits depend on the shapes of the forwards that decoded the branch; a coarse scale keeps the values
    near one of its steps, which the fast engine must recompute alone (``cft.decoding.engine.SHAPE_NOISE``), few
    (a 1-2-5 scale needed 2.8 times as many on the testbed). A tolerance that is a power of ten (1e-3, 0.1)
    compares the same on the recorded and the true value."""
    if not margin > 0:
        return 0.0
    k = math.floor(math.log10(margin))
    step = float(f"1e{k}")
    return step if step <= margin else float(f"1e{k - 1}")  # log10's floor can be one too high just under 10^k


def branch_record(work: Work, t: int, j: int, ok=None, answer=None, ids=None, margin=None, verify_error=None) -> dict:
    """One branch of the labels file; every key present on every branch (``datasets`` needs one schema), and
    ``verify_error`` a string ("" when grading went fine): a column null throughout the first block ``datasets``
    reads cannot take a later error string (docs/FORMATS.md)."""
    return {"token": work.alternatives[t][j], "rank": work.ranks[t][j], "ok": ok, "answer": answer, "ids": ids,
            "margin": margin, "verify_error": verify_error or ""}


@torch.inference_mode()
def reference_branch(model, tok, proto: Protocol, prompt_ids: list[int], response: list[int], t: int):
    """One branch the plain way: greedy ``generate`` from the full token prefix ``prompt + y_<t + a``.

    Returns the continuation and its smallest top-1 minus top-2 logit gap (None when nothing was decoded).
    """
    if proto.stopped(response, 0, t):
        return [], None
    prefix = torch.tensor([prompt_ids + response], device=model.device)
    stops = []
    if proto.cfg.stop_at_answer:
        stops = [AnswerStop(proto.rule, len(prompt_ids), model.device)]
    # pinned: no repetition penalty, n-gram ban or minimum length from the checkpoint, as in the fast engine
    gen = pinned_generation_config(sorted(proto.eos), tok.pad_token_id, proto.budget(t))
    gen.output_logits = gen.return_dict_in_generate = True
    out = pinned_generate(model, gen, input_ids=prefix, attention_mask=torch.ones_like(prefix),
                          stopping_criteria=StoppingCriteriaList(stops))
    cont = out.sequences[0, prefix.shape[1] :].tolist()
    gaps = [_gap(step[0]) for step in out.logits[: len(cont)]]
    return cont, (min(gaps) if gaps else None)


def _gap(logits: torch.Tensor) -> float:
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])
