"""Token selection: which response tokens each training method puts a loss on, and with what weight.

Every method turns a labels record into the same training example, so SFT, CFT and every baseline run
through one loss and their differences are attributable to the selection alone:

- ``input_ids`` = prompt_ids + response_ids;
- ``labels``: ``input_ids[i]`` where token i is selected, -100 elsewhere (prompt and unselected tokens).
  The model's shift makes position i-1 predict ``labels[i]``, i.e. position t of the sequence predicts y_t;
- ``weights``: the per-token loss weight (0 where the label is -100). A selected token's relative weight
  r_t is 1 (``cft_mix``: 1 on critical tokens, lambda on the others). With ``loss_norm="step"`` w_t = r_t
  and the trainer divides by the step's summed weight (the trained tokens of the optimizer step when every
  r_t is 1); with ``loss_norm="sequence"`` w_t = r_t / sum of r over the response, so each response's weights
  sum to 1 and dividing by the step's summed weight averages per-sequence (weighted) means.

Methods (``METHODS``):

- ``sft``: every response token (the final EOS included); ``dft``: the same tokens, and the trainer scales
  each token's loss by its own detached probability (-sg(p) log p, arXiv 2508.05629) at every step, which
  is why DFT's weight is not a static column here.
- ``cft``: the critical tokens of the labels file.
- ``cft_mix``: CFT plus a down-weighted SFT loss: every response token, weight 1 on the critical tokens and
  ``mix_lambda`` (in [0, 1]) on the others, so the step's normaliser is N_crit + lambda * N_other. Its
  examples equal ``cft``'s at lambda = 0 (only critical tokens carry a label) and ``sft``'s at lambda = 1.
  Under ``loss_norm="sequence"`` a response with no critical token is trained like SFT for every lambda > 0
  (its weights sum to 1 like any other response's) and left out at lambda = 0, as by CFT.
- ``random``, ``entropy``, ``rho1``: per response exactly as many tokens as CFT selects there, chosen among
  the eligible positions (the positions identification tested, so the same candidate pool as CFT):
  uniformly at random (seeded); the highest next-token entropy under the starting model; the highest
  excess loss, loss under the starting model minus loss under ``reference``. Ties are broken by a seeded
  random order, so with no reference (the default: the starting model itself) every excess loss is 0,
  all scores tie and ``rho1`` reduces exactly to ``random``.
- ``attn``: per response CFT's budget of eligible positions, those that receive the most attention from the
  final-answer statement under the starting model (the paper's "Attn" baseline; its exact rule is not public).
  The statement is the response tokens from the one holding the start of the last ``answer is``, ``\\boxed``,
  ``\\fbox`` or ``####`` to the end (the EOS included); with no such marker, the last ``ANSWER_TAIL`` tokens.
  A token's score is the attention weight it receives from the statement's tokens after it (its own
  self-attention excluded), summed over those queries and divided by the statement's length, then averaged
  over every head of the last ``ATTN_LAYERS`` layers. Eager attention is switched on for this one scoring
  pass only (SDPA and flash kernels return no weights) and each layer's weights are reduced as they are
  produced, so memory holds one layer's attention matrix of one batch at a time, and batches are cut so
  that matrix stays within ``ATTN_MEMORY`` bytes.
- ``numeric``: the response tokens whose decoded text contains a digit (``token_kind`` = ``digit``).

Each method is one function from a ``Batch`` (the records and what a method may need) to its 0/1 masks,
registered once with its help text (``@method("name", "help")``); ``METHODS``, ``METHOD_HELP`` (the
``--method`` option's) and ``select_masks`` read the registry, so a new method is one function and one
decorator.

A response with no selected token carries no loss: it is excluded from training and counted, never
trained as a silent zero.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from cft.artifacts import SCHEMAS, InputError, read_jsonl, record_key
from cft.kinds import KINDS, token_kind  # one definition of digit/operator/other for identify's and train's statistics

ATTN_LAYERS = 4  # attn: the last layers whose attention is averaged (all of them when the model has fewer)
ATTN_MEMORY = 1 << 30  # attn: bytes of one layer's float32 attention weights per batch (fewer rows if needed)
ANSWER_TAIL = 16  # attn: the statement when a response has no answer marker: its last tokens
ANSWER_MARK = re.compile(r"answer is|\\boxed|\\fbox|####", re.IGNORECASE)
LOSS_NORMS = ("step", "sequence")


@dataclass(frozen=True)
class LabeledResponse:
    """The fields of a ``cft.labels`` record (version 1 or 2) that training uses, validated."""

    id: str
    prompt_ids: list[int]
    response_ids: list[int]
    critical: list[int]
    eligible: list[int]
    line: int = field(default=0, compare=False)


def check_vocab(path: str, records: list[LabeledResponse], vocab_size: int) -> None:
    """Token ids past the model's vocabulary mean the labels were made with another tokenizer."""
    for rec in records:
        for name in ("prompt_ids", "response_ids"):
            if any(t >= vocab_size for t in getattr(rec, name)):
                raise InputError(path, rec.line, name, f"token id outside the model's vocabulary (size {vocab_size}); "
                                                       "were these labels made with another tokenizer?")


def read_labels(path: str, vocab_size: int | None = None) -> list[LabeledResponse]:
    """Validated labels; a bad record raises InputError naming the file, line and field."""
    out = []
    for lineno, rec in read_jsonl(path, SCHEMAS["labels"]):
        def bad(fld: str, msg: str, lineno: int = lineno) -> InputError:
            return InputError(path, lineno, fld, msg)

        for name in ("prompt_ids", "response_ids", "critical", "eligible"):
            value = rec.get(name)
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise bad(name, "missing or not a list of integers")
        if not rec["prompt_ids"]:
            raise bad("prompt_ids", "empty prompt: the first response token would have no position to predict it")
        if not rec["response_ids"]:
            raise bad("response_ids", "empty response")
        for name in ("prompt_ids", "response_ids"):
            if any(t < 0 for t in rec[name]):
                raise bad(name, "negative token id")
        n = len(rec["response_ids"])
        for name in ("critical", "eligible"):
            if len(rec[name]) != n:
                raise bad(name, f"has {len(rec[name])} entries for {n} response tokens")
            if any(v not in (0, 1) for v in rec[name]):
                raise bad(name, "entries must be 0 or 1")
        if any(c and not e for c, e in zip(rec["critical"], rec["eligible"], strict=True)):
            raise bad("critical", "a position is critical but not eligible")
        rid = rec.get("id")
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise bad("id", "missing or not a string")
        out.append(LabeledResponse(str(rid), rec["prompt_ids"], rec["response_ids"], rec["critical"], rec["eligible"],
                                   lineno))
    if not out:
        raise InputError(path, None, None, "no labels records")
    if vocab_size is not None:
        check_vocab(path, out, vocab_size)
    return out


def tie_order(rec: LabeledResponse, seed: int) -> list[int]:
    """A seeded random rank per response position, independent of record order and process count."""
    rng = random.Random(int(record_key("select", seed, rec.id, rec.response_ids), 16))
    order = list(range(len(rec.response_ids)))
    rng.shuffle(order)
    rank = [0] * len(order)
    for r, pos in enumerate(order):
        rank[pos] = r
    return rank


def budget_mask(scores: list[float], eligible: list[int], k: int, rank: list[int]) -> list[int]:
    """The k eligible positions with the highest score; equal scores are taken in ``rank`` order."""
    candidates = sorted((p for p, e in enumerate(eligible) if e), key=lambda p: (-scores[p], rank[p]))
    mask = [0] * len(scores)
    for p in candidates[:k]:
        mask[p] = 1
    return mask


def token_text(tok, token_id: int, cache: dict[int, str]) -> str:
    if token_id not in cache:
        cache[token_id] = tok.decode([token_id], skip_special_tokens=True)
    return cache[token_id]


@contextmanager
def scoring_mode(model, attn_implementation: str | None = None) -> Iterator[None]:
    """Eval mode (and, if given, that attention implementation) for one scoring pass; restored afterwards."""
    was_training = model.training
    previous = model.config._attn_implementation if attn_implementation else None
    model.eval()
    if attn_implementation and previous != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    try:
        yield
    finally:
        if attn_implementation and previous != attn_implementation:
            model.set_attn_implementation(previous)
        model.train(was_training)


def padded_batches(model, records: list[LabeledResponse], batch_size: int, row_cost=None,
                   budget: float = math.inf) -> Iterator[tuple[list[LabeledResponse], torch.Tensor, torch.Tensor]]:
    """``(records, input_ids, attention_mask)`` per batch: prompt + response, right-padded, on the model's device.

    A batch holds at most ``batch_size`` records and, when ``row_cost(width)`` is given, at most as many as keep
    rows x row_cost(padded width) within ``budget`` (always at least one).
    """
    device = next(model.parameters()).device
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    start = 0
    while start < len(records):
        end, width = start, 0
        while end < len(records) and end - start < batch_size:
            w = max(width, len(records[end].prompt_ids) + len(records[end].response_ids))
            if end > start and row_cost is not None and (end + 1 - start) * row_cost(w) > budget:
                break
            end, width = end + 1, w
        chunk, start = records[start:end], end
        seqs = [r.prompt_ids + r.response_ids for r in chunk]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        yield chunk, ids, mask


@torch.no_grad()
def response_scores(model, records: list[LabeledResponse],
                    batch_size: int = 4) -> list[tuple[list[float], list[float]]]:
    """Per response token: the entropy of the model's next-token distribution there, and the token's loss.

    Response token t sits at sequence index len(prompt)+t and is predicted from the index before it.
    """
    out: list[tuple[list[float], list[float]]] = []
    with scoring_mode(model):
        for chunk, ids, mask in padded_batches(model, records, batch_size):
            logits = model(input_ids=ids, attention_mask=mask).logits
            for row, rec in enumerate(chunk):
                p, t = len(rec.prompt_ids), len(rec.response_ids)
                logp = torch.log_softmax(logits[row, p - 1 : p + t - 1].float(), dim=-1)
                entropy = -(logp.exp() * logp).sum(-1)
                nll = -logp.gather(-1, torch.tensor(rec.response_ids, device=ids.device)[:, None])[:, 0]
                out.append((entropy.tolist(), nll.tolist()))
    return out


def answer_start(rec: LabeledResponse, tok, cache: dict[int, str]) -> int:
    """The first response token of the final-answer statement (see ``attn`` in the module doc)."""
    texts = [token_text(tok, t, cache) for t in rec.response_ids]
    marks = list(ANSWER_MARK.finditer("".join(texts)))
    if not marks:
        return max(0, len(texts) - ANSWER_TAIL)
    ends = list(itertools.accumulate(map(len, texts)))  # token i covers characters [ends[i-1], ends[i])
    return bisect.bisect_right(ends, marks[-1].start())


def attention_modules(model) -> tuple[list[torch.nn.Module], int]:
    """The attention modules of the last ``ATTN_LAYERS`` layers and where their output holds the weights.

    They are the modules transformers itself hooks for ``output_attentions`` (``_can_record_outputs``).
    """
    spec = (getattr(model, "_can_record_outputs", None) or {}).get("attentions")
    spec = spec[0] if isinstance(spec, list) else spec
    target, index = (spec, 1) if isinstance(spec, type) else (getattr(spec, "target_class", None),
                                                             getattr(spec, "index", 1))
    found = [m for m in model.modules() if target is not None and isinstance(m, target)]
    if not found:
        raise ValueError(f"attn selection: {type(model).__name__} declares no attention modules to read weights from")
    return found[-ATTN_LAYERS:], index


@torch.no_grad()
def attention_scores(model, records: list[LabeledResponse], tok, batch_size: int = 4) -> list[list[float]]:
    """Per response token: the attention it receives from the final-answer statement (``attn``, module doc)."""
    modules, index = attention_modules(model)
    cache: dict[int, str] = {}
    starts = [answer_start(r, tok, cache) for r in records]
    out: list[list[float]] = []
    heads = model.config.num_attention_heads
    with scoring_mode(model, "eager"):
        done = 0
        for chunk, ids, mask in padded_batches(model, records, batch_size, lambda w: 4 * heads * w * w,
                                               ATTN_MEMORY):
            query = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)  # 1/|statement| on its queries
            for row, rec in enumerate(chunk):
                p, t, a = len(rec.prompt_ids), len(rec.response_ids), starts[done + row]
                query[row, p + a : p + t] = 1.0 / (t - a)
            received = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)

            def reduce(module, args, output, query=query, received=received):
                weights = output[index] if isinstance(output, tuple) else None
                if weights is None:
                    raise ValueError(f"attn selection: {type(module).__name__} returned no attention weights")
                w = weights.float()  # (batch, heads, query, key)
                mass = torch.einsum("bhqk,bq->bk", w, query)
                self_mass = (torch.diagonal(w, dim1=-2, dim2=-1) * query[:, None, :]).sum(1)
                received.add_((mass - self_mass) / (w.shape[1] * len(modules)))

            hooks = [m.register_forward_hook(reduce) for m in modules]
            try:
                model.base_model(input_ids=ids, attention_mask=mask)  # the transformer only: no logits needed
            finally:
                for h in hooks:
                    h.remove()
            for row, rec in enumerate(chunk):
                p = len(rec.prompt_ids)
                out.append(received[row, p : p + len(rec.response_ids)].tolist())
            done += len(chunk)
    return out


def check_mix_lambda(mix_lambda: float | None) -> float:
    """``cft_mix``'s weight of non-critical tokens: required, and in [0, 1] (0 is CFT, 1 is SFT)."""
    if mix_lambda is None:
        raise ValueError("method cft_mix needs mix_lambda, the weight of non-critical tokens (0: cft, 1: sft)")
    if isinstance(mix_lambda, bool) or not isinstance(mix_lambda, (int, float)) or not 0 <= mix_lambda <= 1:
        raise ValueError(f"mix_lambda must be a number in [0, 1], got {mix_lambda!r}")
    return float(mix_lambda)


@dataclass
class Batch:
    """What a selection method reads: the records, and the models and settings some methods need.

    ``model`` is the starting model (needed by ``entropy``, ``attn`` and ``rho1``); ``reference`` is Rho-1's
    reference model (None: the starting model, so excess losses are all zero); ``mix_lambda`` is
    ``cft_mix``'s weight of non-critical tokens.
    """

    records: list[LabeledResponse]
    tok: Any
    model: Any = None
    reference: Any = None
    seed: int = 0
    batch_size: int = 4
    mix_lambda: float | None = None

    def starting_model(self, method: str):
        if self.model is None:
            raise ValueError(f"{method} selection needs the starting model")
        return self.model

    def budgeted(self, scores: list[list[float]]) -> list[list[int]]:
        """Per response CFT's number of eligible positions, those with the highest ``scores`` (seeded tie order)."""
        return [budget_mask(s, r.eligible, sum(r.critical), tie_order(r, self.seed))
                for s, r in zip(scores, self.records, strict=True)]


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    masks: Callable[[Batch], list[list[int]]]


REGISTRY: dict[str, Method] = {}


def method(name: str, help: str) -> Callable:
    """Register ``fn(batch) -> masks`` as training method ``name`` (``help``: its part of ``--method``'s help)."""
    def register(fn: Callable[[Batch], list[list[int]]]) -> Callable[[Batch], list[list[int]]]:
        if name in REGISTRY:
            raise ValueError(f"selection method {name!r} is registered twice")
        REGISTRY[name] = Method(name, help, fn)
        return fn
    return register


@method("sft", "every response token")
def _sft(batch: Batch) -> list[list[int]]:
    return [[1] * len(r.response_ids) for r in batch.records]


@method("cft", "the critical tokens")
def _cft(batch: Batch) -> list[list[int]]:
    return [list(r.critical) for r in batch.records]


@method("cft_mix", "every response token, weight 1 on the critical tokens and --mix-lambda on the others "
                   "(0: cft, 1: sft)")
def _cft_mix(batch: Batch) -> list[list[int]]:
    everything = check_mix_lambda(batch.mix_lambda) > 0
    return [[int(everything or c) for c in r.critical] for r in batch.records]


@method("random", "CFT's number of tokens per response, chosen at random")
def _random(batch: Batch) -> list[list[int]]:
    return batch.budgeted([[0.0] * len(r.response_ids) for r in batch.records])


@method("entropy", "CFT's number of tokens per response, those of highest next-token entropy")
def _entropy(batch: Batch) -> list[list[int]]:
    model = batch.starting_model("entropy")
    return batch.budgeted([ent for ent, _ in response_scores(model, batch.records, batch.batch_size)])


@method("numeric", "digit tokens")
def _numeric(batch: Batch) -> list[list[int]]:
    cache: dict[int, str] = {}
    return [[int(token_kind(token_text(batch.tok, t, cache)) == "digit") for t in r.response_ids]
            for r in batch.records]


@method("rho1", "CFT's number of tokens per response, those of highest excess loss against --reference")
def _rho1(batch: Batch) -> list[list[int]]:
    if batch.reference is None:
        return batch.budgeted([[0.0] * len(r.response_ids) for r in batch.records])
    if batch.model is None:
        raise ValueError("rho1 selection with a reference needs the starting model")
    start = response_scores(batch.model, batch.records, batch.batch_size)
    ref = response_scores(batch.reference, batch.records, batch.batch_size)
    return batch.budgeted([[a - b for a, b in zip(s[1], q[1], strict=True)] for s, q in zip(start, ref, strict=True)])


@method("dft", "every token, weighted by its own detached probability")
def _dft(batch: Batch) -> list[list[int]]:
    return _sft(batch)  # the same tokens: the trainer scales each loss by its probability


@method("attn", "CFT's number of tokens per response, those that receive the most attention from the final-answer "
                "statement (from the last 'answer is', \\boxed or #### to the end), averaged over heads and the "
                f"last {ATTN_LAYERS} layers")
def _attn(batch: Batch) -> list[list[int]]:
    model = batch.starting_model("attn")
    return batch.budgeted(attention_scores(model, batch.records, batch.tok, batch.batch_size))


METHODS = tuple(REGISTRY)
METHOD_HELP = "; ".join(f"{m.name}: {m.help}" for m in REGISTRY.values())


def select_masks(method: str, records: list[LabeledResponse], tok, model=None, reference=None,
                 seed: int = 0, batch_size: int = 4, mix_lambda: float | None = None) -> list[list[int]]:
    """The 0/1 selection (the tokens with a loss) over each response's tokens for ``method`` (see ``Batch``)."""
    if method not in REGISTRY:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[method].masks(Batch(records, tok, model, reference, seed, batch_size, mix_lambda))


def relative_weights(rec: LabeledResponse, mask: list[int], mix_lambda: float | None = None) -> list[float]:
    """r_t per response token: 1 where selected (``mix_lambda`` given: 1 on critical, lambda on the rest), else 0."""
    if mix_lambda is None:
        return [1.0 if m else 0.0 for m in mask]
    lam = check_mix_lambda(mix_lambda)
    return [(1.0 if c else lam) if m else 0.0 for m, c in zip(mask, rec.critical, strict=True)]


def build_example(rec: LabeledResponse, mask: list[int], loss_norm: str = "step",
                  mix_lambda: float | None = None) -> dict[str, list]:
    """``input_ids``, ``labels`` (labels[i] = input_ids[i] where the weight is > 0) and ``weights`` for one response.

    ``mix_lambda`` (``cft_mix``): the relative weight of the selected non-critical tokens (critical ones weigh 1).
    """
    if loss_norm not in LOSS_NORMS:
        raise ValueError(f"unknown loss_norm {loss_norm!r}; choose from {', '.join(LOSS_NORMS)}")
    rel = relative_weights(rec, mask, mix_lambda)
    total = sum(rel)
    if total == 0:
        raise ValueError(f"response {rec.id!r} has no selected token")
    w = rel if loss_norm == "step" else [r / total for r in rel]
    pad = [-100] * len(rec.prompt_ids)
    return {
        "input_ids": rec.prompt_ids + rec.response_ids,
        "labels": pad + [t if r > 0 else -100 for t, r in zip(rec.response_ids, rel, strict=True)],
        "weights": [0.0] * len(rec.prompt_ids) + w,
    }


def token_statistics(method: str, records: list[LabeledResponse], masks: list[list[int]], tok,
                     mix_lambda: float | None = None) -> dict[str, Any]:
    """What a method actually trains: tokens, their share of response tokens, and their kinds.

    ``trained_weight`` is the summed relative weight (the step normaliser's share of these responses): the
    trained tokens, or for ``cft_mix`` its critical tokens + lambda x the other trained tokens.
    """
    mix_lambda = check_mix_lambda(mix_lambda) if method == "cft_mix" else None
    cache: dict[int, str] = {}
    trained, response = Counter(), Counter()
    weight = critical_weight = 0.0
    for rec, mask in zip(records, masks, strict=True):
        rel = relative_weights(rec, mask, mix_lambda)
        weight += sum(rel)
        critical_weight += sum(r for r, c in zip(rel, rec.critical, strict=True) if c)
        for t, m in zip(rec.response_ids, mask, strict=True):
            kind = token_kind(token_text(tok, t, cache))
            response[kind] += 1
            trained[kind] += m
    excluded = [rec.id for rec, mask in zip(records, masks, strict=True) if not any(mask)]
    total_trained, total_response = sum(trained.values()), sum(response.values())
    return {
        "method": method,
        "responses": len(records),
        "responses_trained": len(records) - len(excluded),
        "responses_excluded": len(excluded),
        "excluded_ids": excluded[:20],
        "response_tokens": total_response,
        "trained_tokens": total_trained,
        "trained_fraction": total_trained / total_response if total_response else 0.0,
        "critical_tokens": sum(sum(r.critical) for r in records),
        "mix_lambda": mix_lambda,
        "trained_weight": weight,
        "critical_weight_share": critical_weight / weight if weight else 0.0,
        "trained_by_kind": {k: trained[k] for k in KINDS},
        "response_by_kind": {k: response[k] for k in KINDS},
    }


def format_statistics(stats: dict[str, Any]) -> str:
    """The token statistics as a few lines for the screen."""
    t, r = stats["trained_by_kind"], stats["response_by_kind"]
    kinds = ", ".join(f"{k} {t[k]}/{r[k]} ({t[k] / r[k]:.1%})" if r[k] else f"{k} 0/0" for k in KINDS)
    lines = [
        f"method {stats['method']}: trains {stats['trained_tokens']} of {stats['response_tokens']} response tokens "
        f"({stats['trained_fraction']:.1%}); critical tokens in the labels: {stats['critical_tokens']}",
        f"  by kind (trained/all): {kinds}",
        *([f"  weights: 1 on critical tokens, {stats['mix_lambda']:g} on the others; summed weight "
           f"{stats['trained_weight']:.1f}, {stats['critical_weight_share']:.1%} of it on critical tokens"]
          if stats.get("mix_lambda") is not None else []),
        f"  responses: {stats['responses_trained']} trained, {stats['responses_excluded']} excluded "
        "(no selected token, so no loss)",
    ]
    if stats["responses_excluded"]:
        lines[-1] += f", e.g. {', '.join(stats['excluded_ids'][:5])}"
    return "\n".join(lines)


@dataclass
class Selection:
    """A method's training examples (responses with no selected token left out) and its token statistics."""

    method: str
    examples: list[dict[str, list]]
    masks: list[list[int]]
    stats: dict[str, Any] = field(default_factory=dict)


def select(method: str, records: list[LabeledResponse], tok, model=None, reference=None, seed: int = 0,
           loss_norm: str = "step", batch_size: int = 4, mix_lambda: float | None = None) -> Selection:
    """Masks, examples and statistics for ``method`` in one call (the trainer's entry point).

    ``mix_lambda``: ``cft_mix``'s weight of non-critical tokens (required there, ignored by the other methods).
    """
    masks = select_masks(method, records, tok, model=model, reference=reference, seed=seed, batch_size=batch_size,
                         mix_lambda=mix_lambda)
    lam = mix_lambda if method == "cft_mix" else None
    examples = [build_example(r, m, loss_norm, lam) for r, m in zip(records, masks, strict=True) if any(m)]
    return Selection(method, examples, masks, token_statistics(method, records, masks, tok, lam))
