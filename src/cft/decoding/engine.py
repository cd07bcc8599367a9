"""The fast counterfactual engine: shared-prefix KV caches and continuous batching of branches.

Every branch (response r, position t, alternative a) starts from the KV cache of prompt + y_<t, which
is a prefix of the cache of one teacher-forced pass over prompt + Y — computed once per response. A
batch of rows decodes greedily one token per step; each row is a branch, right-aligned in a shared
cache (left columns it does not use are masked out, its own positions given explicitly). When a
branch ends its row is refilled at once from the queue (continuous batching); a failed rank-r branch
queues rank r+1 at the front, a succeeded one settles its position. The stop rule and verdicts are
``protocol.Protocol``'s (its ``decoding.StopRule``), the same as the reference engine's (each row carries the
answer rule's incremental state, ``cft.answer_watch``, so a trigger token costs its own text, not the whole
response's). Each step also records every row's top-1 minus top-2 logit gap; a branch's smallest gap is its
``margin`` (see ``identify``'s near-ties). Outputs are a function of the inputs and options alone, whatever the
draft width, the rows or the batch around a branch (``SHAPE_NOISE``: near-ties re-decided by the reference
path, margins near a rounding boundary recomputed alone). Sliding-window layers need nothing special: every
row ends at the step's column, so the model's own mask from cache positions is the row's window
(``check_supported`` names what is refused).

Re-convergence drafting: a branch usually rejoins the original solution a few tokens after its
substituted token. Each row proposes up to ``draft`` tokens from its own original prompt + response and
from its response's branches decoded so far (the tokens that followed the last ``ngram`` tokens of the
branch there, ``DraftIndex``) and the step verifies them:
the query holds the last accepted token plus the drafts, and a row keeps the longest draft prefix that
greedy decoding reproduces plus the model's next token (standard greedy speculative acceptance), so the
output is greedy decoding token for token, only fewer forwards. Rows with fewer drafts share the step;
their extra query columns are junk, discarded and masked out afterwards. Whether drafts pay depends on
the machine and the model (a CPU pays for every query column), so each run times its first steps at
several widths and keeps the fastest (``drafting.DraftTuner``; ``drafting.DraftIndex`` proposes); the output
is the same bytes at any width, and ``run`` returns the counts, the chosen width among them.

The shared cache (``rowcache.RowCache``, under both decoders) is a window ``[s, w)`` over preallocated
buffers: a step writes columns ``[w, w+q)`` in place (no per-step concatenation), placing a longer prefix
moves ``s`` left, and trimming columns no row uses moves it right. Rejected draft columns stay as holes
(mask 0) in their row; positions are given per row (its count of valid columns), so holes cost width only.
When the window reaches the buffer's end it is copied back with every row's holes squeezed out (rarely).

Prompt decoding (stages A and D, ``PromptDecoder``, behind ``decoding.api.decode``'s default ``engine``
backend) uses the same window cache and continuous batching with a prompt in place of a branch prefix:
new rows are prefilled together in one left-padded forward (a prompt shared by n samples once), their
key/values copied into free rows right-aligned at ``w``; every step decodes one token per row (no
drafting, so rows hold no holes and moving the window back is a plain copy). Greedy takes the argmax of
the raw logits; sampling draws from softmax(logits / T) by inverse CDF with one uniform from the
request's own random stream, so a sample does not depend on the batch around it. Nothing else acts on
the logits, which is ``decoding.pinned_generation_config``'s decoding (a checkpoint's penalties never
apply). The stop rule (``decoding.StopRule``), finish reason and entropy are those of the ``hf`` backend.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from dataclasses import dataclass
from itertools import islice, takewhile

import torch
from transformers import DynamicCache

from cft.answer_watch import AnswerWatch
from cft.artifacts import InputError
from cft.decoding import Output, StopRule, finish_reason, is_out_of_memory, left_pad
from cft.decoding.drafting import DRAFT_NGRAM, DraftIndex, DraftTuner, default_draft
from cft.decoding.rowcache import EngineStats, RowCache, Window, WindowLayer, auto_batch_size
from cft.models import cache_kwarg, last_logits_only
from cft.protocol import Protocol, Work, finish_branch, round_margin

log = logging.getLogger(__name__)


SQUEEZE_WIDTH = 1.5  # squeeze holes out once the window is this many times its fullest row, plus 4 steps
# (counted on 8 testbed responses, 4 drafts: 1.5 keeps 3 rebases in 147 forwards at mean width 175; 1.2 takes
# 12 for width 146; each rebase copies the cache once; which pays is for a timing on a quiet machine)


# Outputs must not depend on the draft width, the rows or the batch around a branch, which all change the shapes
# of the forwards a token's logits come from, and with them the last bits of the logits. ``SHAPE_NOISE`` bounds
# that change of a top-1/top-2 gap between any two decodes of a branch, per dtype. Measured in float32 on the
# testbed (40 responses, 3,331 branches, draft 0 / 4 / 2 at 64 / 512 / 7 rows, and against ``exact_margin``):
# at most 7.8e-5 (99th percentile 1e-5); 1e-5, the bound first assumed, let a resumed run write one margin
# differently. A branch whose fast decode met a gap within ``EXACT_BELOW`` (twice the noise) is decoded again by
# ``alone_branch`` (batch 1, shapes fixed by the branch), so a near-tie is decided the same way in every run;
# above it no shape changes the argmax. A margin is recorded as its power of ten (``protocol.round_margin``);
# where a decode's smallest gap is within ``SHAPE_NOISE`` of a power of ten it is computed again in one
# forward of the branch alone (``exact_margin``). So every recorded byte is a function of the inputs and options.
SHAPE_NOISE = {torch.float32: 2e-4, torch.float64: 1e-12, torch.bfloat16: 0.25, torch.float16: 0.03}
EXACT_BELOW = {torch.float32: 4e-4, torch.float64: 1e-6, torch.bfloat16: 0.5, torch.float16: 0.125}


@dataclass
class Row:
    work: Work
    t: int
    j: int
    response: list[int]  # y_<t + [a] + continuation so far
    n_new: int = 0
    margin: float = math.inf  # smallest top-1 minus top-2 logit gap over the tokens decoded so far
    cursor: int = 0  # where in the original prompt + response this branch is believed to be
    watch: AnswerWatch | None = None  # the answer rule's incremental state for ``response``


def check_supported(model, name: str,
                    fallback: str = "use --engine reference (one generate per branch, exact for any architecture)"
                    ) -> None:
    """Refuse a model whose layers the engine's shared key/value cache cannot represent.

    Full and sliding-window attention are supported: every layer keeps a row's whole sequence
    (the teacher-forced pass uses a plain cache, see ``protocol.teacher_forced``), and the model
    builds its sliding mask from cache positions (``kv_idx > q_idx - window``); since every row's
    tokens are contiguous and end at the step's column, column differences are position differences
    (which is why drafting, whose rejected columns leave holes, is off for such models).
    Layer kinds with no key/value cache (linear attention, state-space) and chunked attention are
    refused, naming the feature and the ``fallback`` (stage B's by default).
    """
    c = model.config.get_text_config()
    other = sorted(set(getattr(c, "layer_types", None) or []) - {"full_attention", "sliding_attention"})
    if other:
        raise InputError(name, None, None, f"the fast engine does not support layer type(s) {', '.join(other)} "
                                           f"(it assumes a key/value cache in every layer); {fallback}")
    if getattr(c, "attention_chunk_size", None):
        raise InputError(name, None, None, f"the fast engine does not support chunked attention; {fallback}")


def has_sliding_window(model) -> bool:
    """Whether any layer attends over a sliding window (its mask is built from column differences)."""
    c = model.config.get_text_config()
    types = getattr(c, "layer_types", None) or []
    return "sliding_attention" in types or (not types and getattr(c, "sliding_window", None) is not None)


def _alone_cache(prefix_kv: list, p: int, room: int) -> DynamicCache:
    """A batch-1 cache holding the first ``p`` prefix key/values (from the teacher-forced pass) and room for more."""
    window = Window(0, p)
    layers = []
    for pk, pv in prefix_kv:
        k = pk.new_empty(1, pk.shape[1], p + room, pk.shape[3])
        v = pv.new_empty(1, pv.shape[1], p + room, pv.shape[3])
        k[:, :, :p], v[:, :, :p] = pk[:, :, :p], pv[:, :, :p]
        layers.append(WindowLayer(k, v, window))
    cache = DynamicCache()
    cache.layers = layers
    return cache


def _greedy_and_gap(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` (..., V): the greedy token (argmax's rule, the lowest id, on an exact tie) and the
    top-1 minus top-2 gap, from one top-k pass."""
    top2 = logits.topk(2, dim=-1)
    greedy, values = top2.indices[..., 0], top2.values
    tie = values[..., 0] == values[..., 1]
    if bool(tie.any()):
        greedy = torch.where(tie, logits.argmax(-1), greedy)
    return greedy, values[..., 0].float() - values[..., 1].float()


@torch.inference_mode()
def exact_margin(model, prefix_kv: list, prompt_len: int, t: int, alternative: int, cont: list[int]) -> float:
    """A branch's smallest top-1 minus top-2 logit gap over its continuation, from one teacher-forced forward of the
    branch alone: the prefix key/values of prompt + y_<t (from ``prefix_kv``, the teacher-forced pass), then the
    alternative and the continuation but its last token. Its shapes depend on the branch only."""
    p, ids = prompt_len + t, [alternative, *cont[:-1]]
    cache = _alone_cache(prefix_kv, p, len(ids))
    dev = model.device
    logits = model(input_ids=torch.tensor([ids], device=dev), attention_mask=torch.ones(1, p + len(ids), device=dev,
                   dtype=torch.long), position_ids=torch.arange(p, p + len(ids), device=dev)[None],
                   use_cache=True, **{cache_kwarg(model): cache}).logits
    return float(_greedy_and_gap(logits[0])[1].min())


ALONE_DRAFT = 8  # drafts per step of ``alone_branch``: fixed, so its shapes depend on the branch only (on the 11
# near ties of 40 testbed responses: 13.3 / 10.0 / 8.5 forwards and 34 / 20 / 19 ms a branch at 4 / 8 / 16)


@torch.inference_mode()
def alone_branch(model, proto: Protocol, prefix_kv: list, prompt_ids: list[int], response_ids: list[int],
                 t: int, alternative: int, draft: int = ALONE_DRAFT) -> tuple[list[int], float]:
    """Decode branch (t, ``alternative``) by itself: batch 1, from the teacher-forced pass's prefix key/values,
    each step verifying up to ``draft`` tokens proposed from the original prompt + response alone (greedy
    speculative acceptance: the output is greedy decoding token for token). Every shape is fixed by the branch
    and the original response, so a near-tie is decided the same way in every run, whatever the rows, the draft
    width or the batch of the run that met it. Returns the continuation and its smallest top-1 minus top-2 gap."""
    p, dev = len(prompt_ids) + t, model.device
    cache = _alone_cache(prefix_kv, p, proto.budget(t) + draft + 1)
    window = cache.layers[0].window
    index = DraftIndex(prompt_ids + response_ids, DRAFT_NGRAM) if draft else None
    response, watch, margin, n_new, cursor = response_ids[:t] + [alternative], proto.watch(), math.inf, 0, p + 1
    while True:
        room = min(draft, proto.budget(t) - n_new - 1)
        src, drafts = index.propose(response, cursor, room) if index is not None and room > 0 else (cursor, [])
        w, ids = window.w, [response[-1], *drafts]
        logits = model(input_ids=torch.tensor([ids], device=dev),
                       attention_mask=torch.ones(1, w + len(ids), device=dev, dtype=torch.long),
                       position_ids=torch.arange(w, w + len(ids), device=dev)[None], use_cache=True,
                       **{cache_kwarg(model): cache}).logits
        greedy, gaps = (x.tolist() for x in _greedy_and_gap(logits[0]))
        accepted = next((k for k, d in enumerate(drafts) if greedy[k] != d), len(drafts))
        window.w = w + accepted + 1  # rejected draft columns are overwritten by the next step
        for k in range(accepted + 1):
            response.append(greedy[k])
            n_new += 1
            margin = min(margin, gaps[k])
            if proto.stopped(response, n_new, t, watch):
                return response[t + 1 :], margin
        cursor = src + accepted + 1 if drafts and src is not None else cursor + accepted + 1


class BranchDecoder(RowCache):
    """Decode every branch of a stream of responses, ``batch_size`` rows at a time.

    Up to ``draft`` tokens per row and step are proposed from the row's original response by the longest
    matching suffix of at most ``ngram`` tokens (``draft=0``: plain one-token steps). The width of each step
    is ``DraftTuner``'s choice, or ``draft`` itself when ``cfg.draft`` sets it.
    """

    what = "identify"

    def __init__(self, model, tok, cfg, proto: Protocol, draft: int | None = None,
                 ngram: int | None = None):
        self.model, self.tok, self.cfg, self.proto = model, tok, cfg, proto
        draft = cfg.draft if draft is None else draft
        fixed = draft is not None
        self.draft = default_draft(model.device) if draft is None else draft
        self.ngram = DRAFT_NGRAM if ngram is None else ngram
        if self.draft < 0 or (self.draft and self.ngram < 1):
            raise ValueError(f"draft={self.draft} ngram={self.ngram}: need draft >= 0 and ngram >= 1")
        if has_sliding_window(model):
            self.draft = 0  # holes of rejected drafts would count against a column-based sliding window
        self.batch_size = cfg.batch_size
        self.cache_arg = cache_kwarg(model)
        self.rows: list[Row | None] = []
        self.queue: deque[tuple[Work, int, int]] = deque()
        self.prefix_kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.prefix_stack: dict[str, list[torch.Tensor]] = {}  # the same in the row cache's form (``stack``)
        self.index: dict[str, DraftIndex] = {}
        dtype = next(model.parameters()).dtype
        self.exact_below = EXACT_BELOW.get(dtype, max(EXACT_BELOW.values()))
        self.noise = SHAPE_NOISE.get(dtype, max(SHAPE_NOISE.values()))
        self.stats = EngineStats()
        self.tuner = DraftTuner(self.draft, fixed)

    # -- queue -------------------------------------------------------------------------------
    def _admit(self, work: Work, cache) -> None:
        """Queue the first alternative of every tested position, longest continuations first."""
        self.prefix_kv[work.key] = [(layer.keys, layer.values) for layer in cache.layers]
        if self.draft:
            self.index[work.key] = DraftIndex(work.prompt_ids + work.response_ids, self.ngram)
        positions = [t for t, alts in enumerate(work.alternatives) if alts]
        work.open_branches = len(positions)
        if not positions:
            self._finish(work)
        for t in positions:
            self._enqueue(work, t, 0, front=False)

    def _finish(self, work: Work) -> None:
        self.prefix_kv.pop(work.key, None)
        self.prefix_stack.pop(work.key, None)
        self.index.pop(work.key, None)
        self.on_done(work)

    def _enqueue(self, work: Work, t: int, j: int, front: bool) -> None:
        response = work.response_ids[:t] + [work.alternatives[t][j]]
        if self.proto.stopped(response, 0, t):
            self._settle(work, t, j, [], None)
        elif front:
            self.queue.appendleft((work, t, j))
        else:
            self.queue.append((work, t, j))

    def _settle(self, work: Work, t: int, j: int, cont: list[int], margin: float | None) -> None:
        """Grade branch (t, j). ``margin`` is the decode's smallest gap, whose last bits depend on the step shapes: a
        branch with a gap within ``exact_below`` is decoded again alone (``alone_branch``), and a margin within the
        shape noise of a recording boundary is computed again by ``exact_margin`` (see ``SHAPE_NOISE``)."""
        if cont and margin <= self.exact_below:
            cont, margin = alone_branch(self.model, self.proto, self.prefix_kv[work.key], work.prompt_ids,
                                        work.response_ids, t, work.alternatives[t][j])
            self.stats.redecided += 1  # its margin comes from shapes fixed by the branch: recorded as it is
        elif cont and round_margin(max(margin - self.noise, 0.0)) != round_margin(margin + self.noise):
            margin = exact_margin(self.model, self.prefix_kv[work.key], len(work.prompt_ids), t,
                                  work.alternatives[t][j], cont)
            self.stats.rescores += 1
        ok = finish_branch(work, t, j, cont, self.proto, margin=margin if cont else None)
        if cont and work.key in self.index:
            self.index[work.key].add([work.alternatives[t][j], *cont])
        if not ok and j + 1 < len(work.alternatives[t]):
            self._enqueue(work, t, j + 1, front=True)
            return
        work.open_branches -= 1
        if work.done:
            self._finish(work)

    # -- cache surgery -----------------------------------------------------------------------
    def _new_batch(self, work: Work) -> None:
        """Buffers for ``batch_size`` rows of at most ``max_len`` tokens, twice as wide (see ``rebase``)."""
        n = self.batch_size = self.batch_size or auto_batch_size(self.model, self.max_len)
        self._buffers(self.prefix_kv[work.key], n, 2 * self.max_len + self.draft + 1)
        self.rows = [None] * n
        self.stats.batch_size = n

    def _place(self, i: int, work: Work, t: int, j: int) -> None:
        """Put branch (t, j) of ``work`` into row i: its prefix KV right-aligned at w, the rest masked."""
        p = len(work.prompt_ids) + t
        if p > self.window.w:
            self.rebase(p)
        if work.key not in self.prefix_stack:  # stacked at its first row: the buffers' layout is known by then
            self.prefix_stack[work.key] = self.stack(self.prefix_kv[work.key])
        self.put(i, self.prefix_stack[work.key], p)
        self.rows[i] = Row(work, t, j, work.response_ids[:t] + [work.alternatives[t][j]], cursor=p + 1,
                           watch=self.proto.watch())

    def _compact(self) -> None:
        """Drop empty rows when nothing can refill them (once a quarter are empty), and unused left columns.

        Rebases (squeezing out holes) when the next step's ``draft + 1`` columns would not fit, or when
        holes make the window much wider than its fullest row (attention reads every column).
        """
        keep = [i for i, r in enumerate(self.rows) if r is not None]
        if not self.queue and (not keep or len(keep) <= 0.75 * len(self.rows)):
            self.keep_rows(keep)
        tight = 0
        if self.rows and self.window.w > self.window.s:
            mask = self.mbuf[:, self.window.s : self.window.w]
            first, tight = torch.stack([mask.any(0).long().argmax(), mask.sum(1).max()]).tolist()
            self.window.s = self.window.s + first if tight else self.window.w
        width = self.window.w - self.window.s
        if self.window.w + self.draft + 1 > self.mbuf.shape[1] or (
                self.draft and width > SQUEEZE_WIDTH * tight + 4 * (self.draft + 1)):
            self.rebase(0)

    def _requeue(self, row: Row) -> None:
        self.queue.appendleft((row.work, row.t, row.j))

    # -- main loop ---------------------------------------------------------------------------
    def _fill(self, works) -> None:
        """Refill every free row from the queue, admitting new responses when it runs dry."""
        for i, row in enumerate(self.rows):
            if row is not None:
                continue
            while not self.queue:
                nxt = next(works, None)
                if nxt is None:
                    return
                self._admit(*nxt)
            self._place(i, *self.queue.popleft())

    def _drafts(self, width: int) -> list[tuple[int, list[int]]]:
        """Per row: (source position in the original, up to ``width`` draft tokens), within the row's token budget."""
        out = []
        for row in self.rows:
            room = 0 if row is None else min(width, self.proto.budget(row.t) - row.n_new - 1)
            out.append(self.index[row.work.key].propose(row.response, row.cursor, room) if room > 0 else (0, []))
        return out

    def _step(self, drafts: list[tuple[int, list[int]]]):
        """One forward over every row's last token and drafts; returns the greedy tokens, accepted counts, gaps.

        Row i keeps its last token's column and its first ``n_i`` draft columns (those greedy decoding
        reproduced); its remaining columns become holes. None when the forward ran out of memory.
        """
        q = 1 + max(len(d) for _, d in drafts)
        s, w = self.window.s, self.window.w
        dev = self.model.device
        pad = self.tok.pad_token_id or 0
        ids = torch.tensor([[r.response[-1] if r else pad] + d + [pad] * (q - 1 - len(d))
                            for r, (_, d) in zip(self.rows, drafts)], device=dev)
        cols = torch.arange(q, device=dev)
        positions = self.mbuf[:, s:w].sum(1, keepdim=True) + cols
        self.mbuf[:, w : w + q] = 1
        try:
            logits = self.model(input_ids=ids, attention_mask=self.mbuf[:, s : w + q], position_ids=positions,
                                use_cache=True, **{self.cache_arg: self.cache}).logits
        except RuntimeError as exc:
            if not is_out_of_memory(exc) or len(self.rows) == 1:
                raise
            return None  # the exception's tensors are released before the caller halves the batch
        greedy, gaps = _greedy_and_gap(logits)
        if q > 1:
            accepted = (greedy[:, :-1] == ids[:, 1:]).long().cumprod(1).sum(1)
            lengths = torch.tensor([len(d) for _, d in drafts], device=dev)
            accepted = torch.minimum(accepted, lengths)  # a pad column that happens to match is no draft
        else:
            accepted = torch.zeros(len(self.rows), dtype=torch.long, device=dev)
        live = torch.tensor([r is not None for r in self.rows], device=dev)
        self.mbuf[:, w : w + q] = ((cols <= accepted[:, None]) & live[:, None]).long()
        self.window.w = w + q
        self.stats.forwards += 1
        self.stats.width_sum += w - s
        self.stats.row_steps += sum(r is not None for r in self.rows)
        self.stats.batch_rows += len(self.rows)
        self.stats.query_columns += q
        self.stats.widths[q] = self.stats.widths.get(q, 0) + 1
        return greedy.tolist(), accepted.tolist(), gaps.tolist()

    @torch.inference_mode()
    def run(self, works, on_done, progress, max_prompt_len: int) -> EngineStats:
        """Decode every branch of ``works``; a row holds at most max_prompt_len + max_new_tokens tokens.
        Returns the run's counts (the draft width it chose among them)."""
        self.on_done = on_done
        self.max_len = max_prompt_len + self.cfg.max_new_tokens
        works = iter(works)
        while not self.queue:  # the first response sizes the batch
            first = next(works, None)
            if first is None:
                return self.stats
            self._admit(*first)
        self._new_batch(first[0])
        while True:
            self._fill(works)
            self._compact()
            if not self.rows:
                self.stats.draft = self.tuner.chosen
                return self.stats
            width = self.tuner.choose()
            t0 = time.perf_counter()
            drafts = self._drafts(width) if width else [(0, [])] * len(self.rows)
            out = self._step(drafts)
            seconds = time.perf_counter() - t0  # the width's own cost (finishing responses, timed here, is not)
            if out is None:
                self.halve()
                continue
            greedy, accepted, gaps = out
            decoded = 0
            for i, row in enumerate(self.rows):
                if row is None:
                    continue
                for k in range(accepted[i] + 1):  # the stop rule, token by token, as one-token decoding
                    row.response.append(greedy[i][k])
                    row.n_new += 1
                    row.margin = min(row.margin, gaps[i][k])
                    decoded += 1
                    if self.proto.stopped(row.response, row.n_new, row.t, row.watch):
                        self.rows[i] = None
                        self.mbuf[i] = 0
                        self._settle(row.work, row.t, row.j, row.response[row.t + 1 :], row.margin)
                        break
                else:
                    src, d = drafts[i]
                    row.cursor = src + accepted[i] + 1 if d and src is not None else row.cursor + accepted[i] + 1
            self.stats.tokens += decoded
            self.tuner.record(width, seconds, decoded)
            progress.advance(0, tokens=decoded)


# -- prompt decoding (stages A and D) ----------------------------------------------------------


REFILL_SHARE = 8  # rows whose prompt needs a prefill are refilled once 1/REFILL_SHARE of the batch is free (or
# none is live): a prefill forward costs a small model about a decode step. A request whose prompt is prefilled
# already (another sample of it) takes a free row at once: on 16 testbed prompts x 16 samples, 262 forwards at
# 57 live rows of 64 for refilling at once, 275 at 54 for refilling at 1/8 free, 319 at 47 at 1/2 free


STEP_ROOM = 128  # buffer columns past a full row: zeroing the buffers costs more than moving the window back
# (a copy of its live columns) every STEP_ROOM steps


@dataclass
class Request:
    """One output to decode from a prompt: greedy (temperature 0) or sampled from its own random stream.

    ``stream`` seeds the request's random numbers (one uniform per sampled token, inverse-CDF sampling),
    so a sampled output depends on its prompt, temperature and stream only, not on the batch around it.
    """

    prompt_ids: list[int]
    temperature: float = 0.0
    stream: str = ""
    tag: object = None  # the caller's
    max_new_tokens: int | None = None  # this request's own cap, at most the config's (None: the config's)


@dataclass
class PromptRow:
    request: Request
    ids: list[int]  # decoded so far; the last one is not in the cache yet
    rng: random.Random | None
    entropy: float = 0.0  # summed per-token entropy of the sampling distribution
    watch: AnswerWatch | None = None  # the answer rule's incremental state for ``ids``


class PromptDecoder(RowCache):
    """Decode ``Request``s with continuous batching over the same window cache as ``BranchDecoder``.

    Decoding is ``decoding.api.decode``'s (``DecodeConfig``'s ``max_new_tokens``, ``stop_at_answer`` and
    ``batch_size``; temperature and randomness per request): greedy is the argmax of the raw logits and
    sampling draws from softmax(logits / T), nothing else applied, as under ``pinned_generation_config``
    (a checkpoint's repetition penalty, n-gram ban, top-k/top-p... never act). A row stops at EOS, once
    ``verify.answer_complete`` holds after a trigger token (checked incrementally, ``cft.answer_watch``, where
    the tokenizer allows), or at ``max_new_tokens``; the output, finish
    reason and mean entropy are built as the ``hf`` backend builds them.

    New rows are prefilled together in one left-padded forward (a prompt shared by several requests once)
    and their key/values copied into free rows, right-aligned at the window's end like a branch prefix.
    """

    def __init__(self, model, tok, cfg, stats: EngineStats | None = None):
        self.model, self.tok, self.cfg = model, tok, cfg
        self.batch_size = cfg.batch_size
        self.rule = StopRule.of(tok, model, cfg.stop_at_answer)
        self.cache_arg = cache_kwarg(model)
        self.last_only = last_logits_only(model)
        self.pad = tok.pad_token_id or 0
        self.stats = EngineStats() if stats is None else stats  # the caller's, to read after the run
        self.prefills = 0  # prefill forwards (not in stats.forwards, which counts decode steps)
        self.cache = None
        self.queue: deque[Request] = deque()
        self.prefilled: dict[tuple[int, ...], tuple[list, torch.Tensor]] = {}  # prompt -> its key/values, logits
        self.uses: dict[tuple[int, ...], int] = {}  # prompt -> queued requests (its prefill is dropped at 0)

    # -- rows --------------------------------------------------------------------------------
    def _prefill(self, prompts: list[tuple[int, ...]]) -> dict[tuple[int, ...], tuple[list, torch.Tensor]]:
        """Key/values and last logits of each prompt, from one left-padded forward (one by one if out of memory)."""

        ids, mask = left_pad([list(p) for p in prompts], self.pad, self.model.device)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{self.cache_arg: DynamicCache()}, **self.last_only)
        except RuntimeError as exc:
            if not is_out_of_memory(exc) or len(prompts) == 1:
                raise
            out = None
        if out is None:
            return {k: v for p in prompts for k, v in self._prefill([p]).items()}
        self.prefills += 1
        cache, width = getattr(out, self.cache_arg), ids.shape[1]
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        logits = out.logits[:, -1].float()
        return {p: ([(k[r : r + 1, :, width - len(p) :], v[r : r + 1, :, width - len(p) :]) for k, v in kv], logits[r])
                for r, p in enumerate(prompts)}

    def _new_batch(self, kv: list) -> None:
        # every STEP_ROOM steps the window moves back (``_compact``)
        self._buffers(kv, len(self.rows), self.max_len + min(self.max_len, STEP_ROOM) + 1)

    def _choose(self, logits: torch.Tensor, rows: list[PromptRow]) -> list[int]:
        """Each row's next token from its logits (B, V): argmax, or a draw from softmax(logits / T)."""
        logits = logits.float()
        tokens = logits.argmax(-1)
        sampled = [i for i, r in enumerate(rows) if r.request.temperature > 0]
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            temps = torch.tensor([rows[i].request.temperature for i in sampled], device=logits.device)
            logp = torch.log_softmax(logits[idx] / temps[:, None], dim=-1)
            entropy = -(logp.exp() * logp).nan_to_num().sum(-1)
            cdf = logp.double().exp().cumsum(-1)
            u = torch.tensor([rows[i].rng.random() for i in sampled], dtype=torch.float64, device=logits.device)
            draw = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=logits.shape[-1] - 1)
            tokens[idx] = draw
            for i, e in zip(sampled, entropy.tolist()):
                rows[i].entropy += e
        return tokens.tolist()

    def _ended(self, row: PromptRow) -> bool:
        return self.rule.ended(row.ids, len(row.ids), self._cap(row.request), row.watch)

    def _cap(self, request: Request) -> int:
        cap = self.cfg.max_new_tokens
        return cap if request.max_new_tokens is None else min(cap, request.max_new_tokens)

    def _output(self, row: PromptRow):

        text = self.tok.decode(row.ids, skip_special_tokens=True)
        entropy = row.entropy / len(row.ids) if row.rng is not None else None
        return Output(row.ids, text, finish_reason(row.ids, self.rule.eos, text, self.cfg.stop_at_answer), entropy)

    def _fill(self) -> list:
        """Refill free rows from the queue (prefilling new prompts in one forward); returns the outputs that
        ended at their first token."""
        free = [i for i, r in enumerate(self.rows) if r is None]
        live = len(self.rows) - len(free)
        if not self.queue or not free:
            return []
        if live and len(free) * REFILL_SHARE < len(self.rows):  # only requests that need no prefill
            ready = takewhile(lambda r: tuple(r.prompt_ids) in self.prefilled, islice(self.queue, len(free)))
            free = free[: sum(1 for _ in ready)]
        take = [self.queue.popleft() for _ in range(min(len(free), len(self.queue)))]
        if not take:
            return []
        keys = [tuple(r.prompt_ids) for r in take]
        new = list(dict.fromkeys(k for k in keys if k not in self.prefilled))
        if new:
            fresh = self._prefill(new)
            if self.cache is None:  # the first prefill sizes the buffers (layers, heads, dtype)
                self._new_batch(fresh[new[0]][0])
            self.prefilled.update({k: (self.stack(kv), logits) for k, (kv, logits) in fresh.items()})
        rows = [PromptRow(req, [], random.Random(req.stream) if req.temperature > 0 else None,
                          watch=self.rule.watch()) for req in take]
        first = self._choose(torch.stack([self.prefilled[k][1] for k in keys]), rows)
        done = []
        for i, row, key, token in zip(free, rows, keys, first):
            stacked = self.prefilled[key][0]
            self.uses[key] -= 1
            if not self.uses[key]:
                del self.prefilled[key]
            row.ids.append(token)
            if self._ended(row):
                done.append((row.request, self._output(row)))
                continue
            self.put(i, stacked, len(key))
            self.rows[i] = row
        return done

    def _compact(self) -> None:
        """Drop empty rows when nothing can refill them (once a quarter are empty) and unused left columns;
        move the window back when the next step would not fit (rows hold no holes: a plain copy)."""
        keep = [i for i, r in enumerate(self.rows) if r is not None]
        if not self.queue and len(keep) <= 0.75 * len(self.rows):
            self.keep_rows(keep)
        cached = [len(r.request.prompt_ids) + len(r.ids) - 1 for r in self.rows if r is not None]
        s, w = self.window.s, self.window.w
        self.window.s = s = w - max(cached, default=0)
        if w + 1 > self.mbuf.shape[1]:
            new_s = self.max_len - (w - s)
            self.mbuf[:, new_s : self.max_len] = self.mbuf[:, s:w].clone()
            self.move_window(None, new_s)

    def _requeue(self, row: PromptRow) -> None:
        self.queue.appendleft(row.request)
        key = tuple(row.request.prompt_ids)
        self.uses[key] = self.uses.get(key, 0) + 1

    def _step(self) -> torch.Tensor | None:
        """One forward over every row's last token; its logits (B, V), or None when it ran out of memory."""
        s, w = self.window.s, self.window.w
        dev = self.model.device
        ids = torch.tensor([[r.ids[-1] if r else self.pad] for r in self.rows], device=dev)
        positions = torch.tensor([[len(r.request.prompt_ids) + len(r.ids) - 1 if r else 0] for r in self.rows],
                                 device=dev)
        self.mbuf[:, w] = 1  # an empty row attends to this column alone (no fully masked softmax)
        try:
            logits = self.model(input_ids=ids, attention_mask=self.mbuf[:, s : w + 1], position_ids=positions,
                                use_cache=True, **{self.cache_arg: self.cache}).logits[:, -1]
        except RuntimeError as exc:
            if not is_out_of_memory(exc) or len(self.rows) == 1:
                raise
            self.mbuf[:, w] = 0
            return None
        self.mbuf[:, w] = torch.tensor([r is not None for r in self.rows], device=dev)
        self.window.w = w + 1
        live = sum(r is not None for r in self.rows)
        self.stats.forwards += 1
        self.stats.width_sum += w - s
        self.stats.row_steps += live
        self.stats.batch_rows += len(self.rows)
        self.stats.query_columns += 1
        return logits

    def _row_count(self) -> int:
        """``cfg.rows`` (None: the batch size; 0: what memory holds, at least the batch size)."""
        if self.cfg.rows is None:
            return self.batch_size
        return self.cfg.rows or max(self.batch_size, auto_batch_size(self.model, self.max_len))

    # -- main loop ---------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, requests: list[Request], progress=None):
        """Yield ``(request, Output)`` for every request, as each ends (not in request order); the generator's
        return value (``yield from``'s) is the run's counts, also ``self.stats``."""
        if not requests:
            return self.stats
        self.max_len = max(len(r.prompt_ids) + self._cap(r) for r in requests)
        self.queue.extend(requests)
        for r in requests:
            self.uses[tuple(r.prompt_ids)] = self.uses.get(tuple(r.prompt_ids), 0) + 1
        self.stats.batch_size = self._row_count()
        # no more rows than requests (rows nothing can fill later are dropped before a step)
        self.rows: list[PromptRow | None] = [None] * min(self.stats.batch_size, len(requests))
        while True:
            done = self._fill()
            if self.cache is not None:
                self._compact()
            live_rows = any(self.rows)
            if live_rows:
                logits = self._step()
                while logits is None:
                    self.halve()
                    logits = self._step()
                live = [(i, r) for i, r in enumerate(self.rows) if r is not None]
                tokens = self._choose(logits if len(live) == len(self.rows) else logits[[i for i, _ in live]],
                                      [r for _, r in live])
                self.stats.tokens += len(live)
                if progress:  # per step: a log's tokens/s moves before any response ends
                    progress.advance(0, tokens=len(live))
                for (i, row), t in zip(live, tokens):
                    row.ids.append(t)
                    if self._ended(row):
                        self.rows[i] = None
                        self.mbuf[i] = 0
                        done.append((row.request, self._output(row)))
            for req, out in done:
                yield req, out
                if progress:
                    progress.advance(1, tokens=1)  # its first token, from the prefill; the rest counted per step
            if not live_rows and not self.queue:
                return self.stats
