"""The fast counterfactual engine: shared-prefix KV caches and continuous batching of branches.

Every branch (response r, position t, alternative a) starts from the KV cache of prompt + y_<t, which
is a prefix of the cache of one teacher-forced pass over prompt + Y — computed once per response. A
batch of rows decodes greedily one token per step; each row is a branch, right-aligned in a shared
cache (left columns it does not use are masked out, its own positions given explicitly). When a
branch ends its row is refilled at once from the queue (continuous batching); a failed rank-r branch
queues rank r+1 at the front, a succeeded one settles its position. The stop rule and verdicts are
``identify.Protocol``'s, the same as the reference engine's. Each step also records every row's
top-1 minus top-2 logit gap; a branch's smallest gap is its ``margin`` (see ``identify``'s near-ties).
Sliding-window layers need nothing special: every row ends at the step's column, so the model's own
mask from cache positions is the row's window (``check_supported`` names what is refused).

The shared cache is a window ``[s, w)`` over preallocated buffers: a step writes column ``w`` in
place (no per-step concatenation), placing a longer prefix moves ``s`` left, and trimming columns no
row uses moves it right; only when the window reaches the buffer's end is it copied back (rarely).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass

import psutil
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cft.artifacts import InputError
from cft.generate import is_out_of_memory
from cft.identify import IdentifyConfig, Protocol, Work, finish_branch
from cft.models import cache_kwarg

log = logging.getLogger(__name__)


@dataclass
class Row:
    work: Work
    t: int
    j: int
    response: list[int]  # y_<t + [a] + continuation so far
    n_new: int = 0
    margin: float = math.inf  # smallest top-1 minus top-2 logit gap over the decoded tokens


def check_supported(model, name: str) -> None:
    """Refuse a model whose layers the engine's shared key/value cache cannot represent.

    Full and sliding-window attention are supported: every layer keeps a row's whole sequence
    (the teacher-forced pass uses a plain cache, see ``identify.teacher_forced``), and the model
    builds its sliding mask from cache positions (``kv_idx > q_idx - window``); since every row's
    tokens are contiguous and end at the step's column, column differences are position differences.
    Layer kinds with no key/value cache (linear attention, state-space) and chunked attention are
    refused, naming the feature and the fallback.
    """
    c = model.config.get_text_config()
    fallback = "use --engine reference (one generate per branch, exact for any architecture)"
    other = sorted(set(getattr(c, "layer_types", None) or []) - {"full_attention", "sliding_attention"})
    if other:
        raise InputError(name, None, None, f"the fast engine does not support layer type(s) {', '.join(other)} "
                                           f"(it assumes a key/value cache in every layer); {fallback}")
    if getattr(c, "attention_chunk_size", None):
        raise InputError(name, None, None, f"the fast engine does not support chunked attention; {fallback}")


def kv_bytes_per_token(model) -> int:
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * heads * head_dim * next(model.parameters()).element_size()


def auto_batch_size(model, max_len: int) -> int:
    """Rows that fit in a quarter of free memory at the longest sequence (capped for CPU throughput)."""
    if model.device.type == "cuda":
        free = torch.cuda.mem_get_info(model.device)[0]
        cap = 1024
    else:
        free = psutil.virtual_memory().available
        cap = 256
    return int(max(1, min(cap, free // 4 // (kv_bytes_per_token(model) * max(max_len, 1) * 2))))


def _take_rows(buf: torch.Tensor, idx: torch.Tensor, live: slice, dim: int) -> torch.Tensor:
    """Move rows ``idx`` to the front of a buffer, in place, copying only its live columns (along ``dim``)."""
    cols = (slice(None),) * dim + (live,)
    front = buf[: len(idx)]
    front[cols] = buf[cols].index_select(0, idx)
    return front


class Window:
    """Columns ``[s, w)`` of the buffers are live; one object shared by every layer of the cache."""

    def __init__(self, s: int, w: int):
        self.s, self.w = s, w


class WindowLayer(DynamicLayer):
    """A cache layer over a preallocated (B, H, C, D) buffer: ``update`` writes column w in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, window: Window):
        super().__init__()
        self.kbuf, self.vbuf, self.window = keys, values, window
        self.is_initialized = True

    @property
    def keys(self):
        return self.kbuf[:, :, self.window.s : self.window.w]

    @keys.setter
    def keys(self, value):  # the base class's __init__ assigns None
        pass

    @property
    def values(self):
        return self.vbuf[:, :, self.window.s : self.window.w]

    @values.setter
    def values(self, value):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        w = self.window.w
        self.kbuf[:, :, w : w + 1] = key_states
        self.vbuf[:, :, w : w + 1] = value_states
        return self.kbuf[:, :, self.window.s : w + 1], self.vbuf[:, :, self.window.s : w + 1]

    def get_seq_length(self) -> int:
        return self.window.w - self.window.s


class BranchDecoder:
    """Decode every branch of a stream of responses, ``batch_size`` rows at a time."""

    def __init__(self, model, tok, cfg: IdentifyConfig, proto: Protocol):
        self.model, self.tok, self.cfg, self.proto = model, tok, cfg, proto
        self.batch_size = cfg.batch_size
        self.cache_arg = cache_kwarg(model)
        self.rows: list[Row | None] = []
        self.queue: deque[tuple[Work, int, int]] = deque()
        self.prefix_kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    # -- queue -------------------------------------------------------------------------------
    def _admit(self, work: Work, cache) -> None:
        """Queue the first alternative of every tested position, longest continuations first."""
        self.prefix_kv[work.key] = [(layer.keys, layer.values) for layer in cache.layers]
        positions = [t for t, alts in enumerate(work.alternatives) if alts]
        work.open_branches = len(positions)
        if not positions:
            self._finish(work)
        for t in positions:
            self._enqueue(work, t, 0, front=False)

    def _finish(self, work: Work) -> None:
        self.prefix_kv.pop(work.key, None)
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
        ok = finish_branch(work, t, j, cont, self.proto, margin)
        if not ok and j + 1 < len(work.alternatives[t]):
            self._enqueue(work, t, j + 1, front=True)
            return
        work.open_branches -= 1
        if work.done:
            self._finish(work)

    # -- cache surgery -----------------------------------------------------------------------
    def _new_batch(self, work: Work) -> None:
        """Buffers for ``batch_size`` rows of at most ``max_len`` tokens, twice as wide (see _rebase)."""
        n = self.batch_size or auto_batch_size(self.model, self.max_len)
        self.batch_size = n
        self.window = Window(self.max_len, self.max_len)
        cap = 2 * self.max_len
        layers = [WindowLayer(k.new_zeros(n, k.shape[1], cap, k.shape[3]), v.new_zeros(n, v.shape[1], cap, v.shape[3]),
                              self.window) for k, v in self.prefix_kv[work.key]]
        self.cache = DynamicCache()
        self.cache.layers = layers
        self.mbuf = torch.zeros(n, cap, dtype=torch.long, device=self.model.device)
        self.rows = [None] * n

    def _rebase(self, need: int) -> None:
        """Copy the live window so that it ends at ``max_len`` (room for ``need`` prefix, and steps)."""
        s, w = self.window.s, self.window.w
        span = w - s
        new_s = self.max_len - span
        if need > self.max_len:
            raise ValueError(f"a branch prefix of {need} tokens exceeds the engine's row length {self.max_len}")
        for layer in self.cache.layers:
            layer.kbuf[:, :, new_s : self.max_len] = layer.kbuf[:, :, s:w].clone()
            layer.vbuf[:, :, new_s : self.max_len] = layer.vbuf[:, :, s:w].clone()
        self.mbuf[:, new_s : self.max_len] = self.mbuf[:, s:w].clone()
        self.mbuf[:, : new_s] = 0
        self.window.s, self.window.w = new_s, self.max_len

    def _place(self, i: int, work: Work, t: int, j: int) -> None:
        """Put branch (t, j) of ``work`` into row i: its prefix KV right-aligned at w, the rest masked."""
        p = len(work.prompt_ids) + t
        if p > self.window.w:
            self._rebase(p)
        w = self.window.w
        if w - p < self.window.s:
            self.mbuf[:, w - p : self.window.s] = 0
            self.window.s = w - p
        for layer, (pk, pv) in zip(self.cache.layers, self.prefix_kv[work.key]):
            layer.kbuf[i, :, w - p : w] = pk[0, :, :p]
            layer.vbuf[i, :, w - p : w] = pv[0, :, :p]
        self.mbuf[i] = 0
        self.mbuf[i, w - p : w] = 1
        self.rows[i] = Row(work, t, j, work.response_ids[:t] + [work.alternatives[t][j]])

    def _compact(self) -> None:
        """Drop empty rows when nothing can refill them (once a quarter are empty), and unused left columns."""
        keep = [i for i, r in enumerate(self.rows) if r is not None]
        if not self.queue and (not keep or len(keep) <= 0.75 * len(self.rows)):
            idx = torch.tensor(keep, dtype=torch.long, device=self.model.device)
            live = slice(self.window.s, self.window.w)
            for layer in self.cache.layers:
                layer.kbuf = _take_rows(layer.kbuf, idx, live, 2)
                layer.vbuf = _take_rows(layer.vbuf, idx, live, 2)
            self.mbuf = _take_rows(self.mbuf, idx, live, 1)
            self.rows = [self.rows[i] for i in keep]
        if self.rows:
            used = int(self.mbuf[:, self.window.s : self.window.w].sum(1).max())
            self.window.s = self.window.w - used
        if self.window.w >= self.mbuf.shape[1]:
            self._rebase(0)

    def _halve(self) -> None:
        """Out of memory: requeue the second half of the rows (decoded again from their start) and shrink.

        Greedy decoding is deterministic, so a restarted branch yields the same continuation.
        """
        keep = len(self.rows) // 2
        for row in reversed(self.rows[keep:]):
            if row is not None:
                self.queue.appendleft((row.work, row.t, row.j))
        log.warning("identify: out of memory with %d rows; continuing with %d", len(self.rows), keep)
        self.mbuf[:, self.window.w] = 0
        idx = torch.arange(keep, device=self.model.device)
        live = slice(self.window.s, self.window.w)
        for layer in self.cache.layers:
            layer.kbuf = _take_rows(layer.kbuf, idx, live, 2)
            layer.vbuf = _take_rows(layer.vbuf, idx, live, 2)
        self.mbuf = _take_rows(self.mbuf, idx, live, 1)
        self.rows = self.rows[:keep]
        self.batch_size = keep
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

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

    @torch.inference_mode()
    def run(self, works, on_done, progress, max_prompt_len: int) -> None:
        """Decode every branch of ``works``; a row holds at most max_prompt_len + max_new_tokens tokens."""
        self.on_done = on_done
        self.max_len = max_prompt_len + self.cfg.max_new_tokens
        works = iter(works)
        while not self.queue:  # the first response sizes the batch
            first = next(works, None)
            if first is None:
                return
            self._admit(*first)
        self._new_batch(first[0])
        while True:
            self._fill(works)
            self._compact()
            if not self.rows:
                return
            s, w = self.window.s, self.window.w
            pad = self.tok.pad_token_id or 0
            input_ids = torch.tensor([[r.response[-1] if r else pad] for r in self.rows], device=self.model.device)
            positions = self.mbuf[:, s:w].sum(1, keepdim=True)
            self.mbuf[:, w] = 1
            try:
                logits = self.model(input_ids=input_ids, attention_mask=self.mbuf[:, s : w + 1],
                                    position_ids=positions, use_cache=True,
                                    **{self.cache_arg: self.cache}).logits[:, -1]
            except RuntimeError as exc:
                if not is_out_of_memory(exc) or len(self.rows) == 1:
                    raise
                logits = None  # handled below, once the exception's tensors are released
            if logits is None:
                self._halve()
                continue
            self.window.w = w + 1
            nxt = logits.argmax(-1).tolist()  # the first maximum: ties go to the lowest id, as in generate
            top2 = torch.topk(logits.float(), 2, dim=-1).values
            gaps = (top2[:, 0] - top2[:, 1]).tolist()
            active = [(i, row) for i, row in enumerate(self.rows) if row is not None]
            progress.advance(0, tokens=len(active))
            for i, row in active:
                row.response.append(nxt[i])
                row.n_new += 1
                row.margin = min(row.margin, gaps[i])
                if self.proto.stopped(row.response, row.n_new, row.t):
                    self.rows[i] = None
                    self.mbuf[i] = 0
                    self._settle(row.work, row.t, row.j, row.response[row.t + 1 :], row.margin)
