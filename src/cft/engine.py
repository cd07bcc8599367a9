"""The fast counterfactual engine: shared-prefix KV caches and continuous batching of branches.

Every branch (response r, position t, alternative a) starts from the KV cache of prompt + y_<t, which
is a prefix of the cache of one teacher-forced pass over prompt + Y — computed once per response. A
batch of rows decodes greedily one token per step; each row is a branch, right-aligned in a shared
cache (left columns it does not use are masked out, its own positions given explicitly). When a
branch ends its row is refilled at once from the queue (continuous batching); a failed rank-r branch
queues rank r+1 at the front, a succeeded one settles its position. The stop rule and verdicts are
``identify.Protocol``'s, the same as the reference engine's.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import psutil
import torch
from transformers import DynamicCache

from cft.identify import IdentifyConfig, Protocol, Work, finish_branch
from cft.models import cache_kwarg


@dataclass
class Row:
    work: Work
    t: int
    j: int
    response: list[int]  # y_<t + [a] + continuation so far
    n_new: int = 0


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


class BranchDecoder:
    """Decode every branch of a stream of responses, ``batch_size`` rows at a time."""

    def __init__(self, model, tok, cfg: IdentifyConfig, proto: Protocol):
        self.model, self.tok, self.cfg, self.proto = model, tok, cfg, proto
        self.batch_size = cfg.batch_size
        self.cache_arg = cache_kwarg(model)
        self.cache: DynamicCache | None = None  # per layer (B, H, W, D) keys and values
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=model.device)
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
            self._settle(work, t, j, [])
        elif front:
            self.queue.appendleft((work, t, j))
        else:
            self.queue.append((work, t, j))

    def _settle(self, work: Work, t: int, j: int, cont: list[int]) -> None:
        ok = finish_branch(work, t, j, cont, self.proto)
        if not ok and j + 1 < len(work.alternatives[t]):
            self._enqueue(work, t, j + 1, front=True)
            return
        work.open_branches -= 1
        if work.done:
            self._finish(work)

    # -- cache surgery -----------------------------------------------------------------------
    def _width(self) -> int:
        return self.mask.shape[1]

    def _grow_left(self, extra: int) -> None:
        for layer in self.cache.layers:
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, extra, 0))
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, extra, 0))
        self.mask = torch.nn.functional.pad(self.mask, (extra, 0))

    def _place(self, i: int, work: Work, t: int, j: int) -> None:
        """Put branch (t, j) of ``work`` into row i: its prefix KV right-aligned, the rest masked."""
        p = len(work.prompt_ids) + t
        if p > self._width():
            self._grow_left(p - self._width())
        w = self._width()
        for layer, (pk, pv) in zip(self.cache.layers, self.prefix_kv[work.key]):
            layer.keys[i, :, w - p :] = pk[0, :, :p]
            layer.values[i, :, w - p :] = pv[0, :, :p]
        self.mask[i] = 0
        self.mask[i, w - p :] = 1
        self.rows[i] = Row(work, t, j, work.response_ids[:t] + [work.alternatives[t][j]])

    def _new_batch(self, work: Work) -> None:
        n = self.batch_size or auto_batch_size(self.model, len(work.prompt_ids) + self.cfg.max_new_tokens)
        self.batch_size = n
        self.cache = DynamicCache(ddp_cache_data=[
            (k.new_zeros(n, k.shape[1], 0, k.shape[3]), v.new_zeros(n, v.shape[1], 0, v.shape[3]))
            for k, v in self.prefix_kv[work.key]
        ])
        self.mask = torch.zeros(n, 0, dtype=torch.long, device=self.model.device)
        self.rows = [None] * n

    def _compact(self) -> None:
        """Drop empty rows when nothing can refill them, and left columns no row uses."""
        keep = [i for i, r in enumerate(self.rows) if r is not None]
        if len(keep) < len(self.rows) and not self.queue:
            idx = torch.tensor(keep, dtype=torch.long, device=self.model.device)
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
            self.mask = self.mask.index_select(0, idx)
            self.rows = [self.rows[i] for i in keep]
        if self.rows:
            cut = self._width() - int(self.mask.sum(1).max())
            if cut > 0:
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]
                self.mask = self.mask[:, cut:]

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
    def run(self, works, on_done, progress) -> None:
        self.on_done = on_done
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
            n = len(self.rows)
            input_ids = torch.tensor([[r.response[-1]] for r in self.rows], device=self.model.device)
            positions = self.mask.sum(1, keepdim=True)
            self.mask = torch.cat([self.mask, self.mask.new_ones(n, 1)], dim=1)
            logits = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions,
                                use_cache=True, **{self.cache_arg: self.cache}).logits[:, -1]
            nxt = logits.argmax(-1).tolist()
            progress.advance(0, tokens=n)
            for i, row in enumerate(self.rows):
                row.response.append(nxt[i])
                row.n_new += 1
                if self.proto.stopped(row.response, row.n_new, row.t):
                    self.rows[i] = None
                    self._settle(row.work, row.t, row.j, row.response[row.t + 1 :])
