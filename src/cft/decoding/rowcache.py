"""The row cache under both fast decoders (``cft.decoding.engine``): a window of columns over preallocated buffers.

Each row of a batch holds one sequence (a branch, a prompt's output) right-aligned in a shared key/value cache:
columns ``[s, w)`` of the buffers are live (``Window``), a step writes its columns at ``w`` in place
(``WindowLayer``: no per-step concatenation; the layers share one stacked buffer, so a row is placed in one copy),
a row's unused left columns are masked out, and its positions are given explicitly. ``RowCache`` owns what both
decoders do to it: allocate the buffers, put a row, open columns on the left, keep some rows (shrinking the
batch), squeeze out the holes that rejected drafts leave (``rebase``) and halve the batch when a step runs out of
memory; the decoders add what goes into the rows.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields

import psutil
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Counts of one run: decoded tokens per forward is what drafting buys."""

    forwards: int = 0
    row_steps: int = 0  # sum over forwards of the rows holding a branch
    batch_rows: int = 0  # sum over forwards of the rows computed (empty ones included, until dropped)
    tokens: int = 0  # decoded (appended) tokens
    query_columns: int = 0  # sum over forwards of the query width q
    rebases: int = 0  # window copies (each squeezes out the holes of rejected drafts)
    redecided: int = 0  # branches decoded again alone (``engine.alone_branch``: a gap within ``EXACT_BELOW``)
    rescores: int = 0  # margins computed again by ``engine.exact_margin`` (near a rounding boundary)
    width_sum: int = 0  # sum over forwards of the cache window's width before the step
    batch_size: int = 0  # rows the engine chose or was given (a prompt run allocates at most one per request)
    widths: dict[int, int] = field(default_factory=dict)  # forwards per query width
    draft: int | None = None  # the draft width the run chose (``DraftTuner``) or was given

    @property
    def tokens_per_forward(self) -> float:
        """Decoded tokens per row and forward: 1.0 for one-token decoding, more as drafts are accepted."""
        return self.tokens / max(self.row_steps, 1)

    @classmethod
    def total(cls, runs: list[EngineStats | None]) -> dict | None:
        """The metadata of several runs on one set of responses: counts summed, ``draft`` kept when they agree."""
        runs = [r for r in runs if r is not None]
        if not runs:
            return None
        out = cls(draft=runs[0].draft if len({r.draft for r in runs}) == 1 else None)
        for r in runs:
            for f in fields(cls):
                if f.name == "widths":
                    for q, n in r.widths.items():
                        out.widths[q] = out.widths.get(q, 0) + n
                elif f.name not in ("draft", "batch_size"):
                    setattr(out, f.name, getattr(out, f.name) + getattr(r, f.name))
            out.batch_size = max(out.batch_size, r.batch_size)
        return out.as_dict()

    @classmethod
    def from_dict(cls, d: dict) -> EngineStats:
        """The counts of ``as_dict``'s form (a run's metadata)."""
        names = {f.name for f in fields(cls)}
        out = cls(**{k: v for k, v in d.items() if k in names and k != "widths"})
        out.widths = {int(q): n for q, n in d.get("widths", {}).items()}
        return out

    def as_dict(self) -> dict:
        """For the metadata: every count, and tokens per forward."""
        return {**asdict(self), "widths": {str(k): v for k, v in sorted(self.widths.items())},
                "tokens_per_forward": self.tokens_per_forward}


def kv_bytes_per_token(model) -> int:
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * heads * head_dim * next(model.parameters()).element_size()


# The most rows ``auto_batch_size`` gives, by device type. On this project's 2-core CPU (testbed model, both
# sides alternating in one process, 2 threads, 2026-12-03): cft eval's study work (2 x (200 greedy + 40 x 16
# sampled)) took 15.4 / 14.7 / 13.4 s at 128 / 256 / 512 rows and 15.1 / 15.6 s at 512 / 1024; stage B on 40
# responses at draft width 0 took 15.0 / 13.7 s at 256 / 512 rows and 13.3 / 13.4 s at 512 / 1024 (tuned
# width: 9.8 / 9.8 s at 256 / 512). A forward's fixed cost is spread over more rows, until memory traffic rules.
MAX_ROWS = {"cpu": 512, "cuda": 1024}


def auto_batch_size(model, max_len: int) -> int:
    """Rows that fit in a quarter of free memory at the longest sequence, at most ``MAX_ROWS``."""
    if model.device.type == "cuda":
        free = torch.cuda.mem_get_info(model.device)[0]
    else:
        free = psutil.virtual_memory().available
    cap = MAX_ROWS.get(model.device.type, MAX_ROWS["cpu"])
    return int(max(1, min(cap, free // 4 // (kv_bytes_per_token(model) * max(max_len, 1) * 2))))


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
        w, q = self.window.w, key_states.shape[2]
        self.kbuf[:, :, w : w + q] = key_states
        self.vbuf[:, :, w : w + q] = value_states
        return self.kbuf[:, :, self.window.s : w + q], self.vbuf[:, :, self.window.s : w + q]

    def get_seq_length(self) -> int:
        return self.window.w - self.window.s


def layer_groups(kv: list) -> list[list[int]]:
    """Layer indices grouped by the shape and dtype of their key/values (one group for most models)."""
    groups: dict[tuple, list[int]] = {}
    for layer, (k, v) in enumerate(kv):
        groups.setdefault((tuple(k.shape[1:]), tuple(v.shape[1:]), k.dtype, v.dtype), []).append(layer)
    return list(groups.values())


class RowCache:
    """Buffers, mask and rows of a batch (``self.rows``: a row object or None); subclasses fill the rows.

    Subclasses set ``model``, ``max_len``, ``stats`` and ``batch_size`` and define ``_requeue(row)`` (put a row's
    work back at the front of the queue) and ``what`` (the log's name of the run).
    """

    what = "decode"

    def _buffers(self, kv: list, n: int, cap: int) -> None:
        """A window at ``max_len`` over ``n`` rows x ``cap`` columns, shaped like the key/values ``kv``.

        The layers whose key/values have one shape share one buffer (``self.bufs``, (2 x layers, B, H, C, D):
        layer l's keys and values at 2l and 2l + 1), so putting a row or moving columns is one copy for all of
        them (``stack`` gives a prefix in that form). Each layer sees a (B, H, C, D) view with the strides of a
        buffer of its own. Uninitialised: a column is written (a step, a rebase) or zeroed (``open_columns``)
        before the window reaches it, so columns the window never reaches are never touched (zero-filling all of
        it took 0.3 s a batch).
        """
        self.window = Window(self.max_len, self.max_len)
        self.groups = layer_groups(kv)
        self.bufs = [kv[g[0]][0].new_empty(2 * len(g), n, kv[g[0]][0].shape[1], cap, kv[g[0]][0].shape[3])
                     for g in self.groups]
        self.cache = DynamicCache()
        self.cache.layers = [WindowLayer(None, None, self.window) for _ in kv]
        self._relink()
        self.mbuf = torch.zeros(n, cap, dtype=torch.long, device=self.model.device)

    def stack(self, kv: list) -> list[torch.Tensor]:
        """One sequence's key/values (per layer (1, H, P, D) pairs) in the buffers' form: per group (2 x layers,
        H, P, D)."""
        return [torch.cat([x for layer in g for x in kv[layer]]) for g in self.groups]

    def put(self, i: int, stacked: list[torch.Tensor], p: int) -> None:
        """Row i holds the first p tokens of a stacked sequence (``stack``): right-aligned at w, the rest masked."""
        w = self.window.w
        if w - p < self.window.s:
            self.open_columns(w - p)
        for buf, x in zip(self.bufs, stacked):
            buf[:, i, :, w - p : w] = x[:, :, :p]
        self.mbuf[i] = 0
        self.mbuf[i, w - p : w] = 1

    def _relink(self) -> None:
        """Point every layer at its views of ``self.bufs`` (when they are made or cut to fewer rows)."""
        for g, buf in zip(self.groups, self.bufs):
            for pos, layer in enumerate(g):
                self.cache.layers[layer].kbuf, self.cache.layers[layer].vbuf = buf[2 * pos], buf[2 * pos + 1]

    def open_columns(self, start: int) -> None:
        """Move a decoder's window start left to ``start``: the new columns, for every row, masked and finite
        (the buffers start uninitialised, and 0 * NaN would poison attention)."""
        s = self.window.s
        self.mbuf[:, start:s] = 0
        for buf in self.bufs:
            buf[:, :, :, start:s] = 0
        self.window.s = start

    def keep_rows(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` (ascending) of a decoder (``BranchDecoder`` or ``PromptDecoder``): cache buffers,
        mask and rows; the caller has requeued or finished the others.

        The first ``len(keep)`` rows stay; only kept rows past them move, into the dropped rows' places (their live
        columns alone), so shrinking copies at most the dropped share of the cache. Row order does not matter.
        """
        n = len(keep)
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]
        if movers:
            dev = self.model.device
            dst, src = torch.tensor(holes, device=dev), torch.tensor(movers, device=dev)
            live = slice(self.window.s, self.window.w)
            for buf in self.bufs:
                buf[:, dst, :, live] = buf[:, src, :, live]
            self.mbuf[dst, live] = self.mbuf[src, live]
            for h, m in zip(holes, movers):
                self.rows[h] = self.rows[m]
        self.bufs = [buf[:, :n] for buf in self.bufs]
        self._relink()
        self.mbuf = self.mbuf[:n]
        self.rows = self.rows[:n]

    def move_window(self, order: torch.Tensor | None, new_s: int) -> None:
        """Copy the live columns ``[s, w)`` to ``[new_s, max_len)``: all of them, or per row the columns ``order``
        (B, max_len - new_s) picks (``rebase``); the mask is the caller's."""
        s, w = self.window.s, self.window.w
        for buf in self.bufs:
            if order is None:
                buf[:, :, :, new_s : self.max_len] = buf[:, :, :, s:w].clone()  # the two may overlap
            else:
                idx = order[None, :, None, :, None].expand(buf.shape[0], -1, buf.shape[2], -1, buf.shape[4])
                buf[:, :, :, new_s : self.max_len] = buf[:, :, :, s:w].gather(3, idx)
        self.window.s, self.window.w = new_s, self.max_len
        self.stats.rebases += 1

    def rebase(self, need: int) -> None:
        """Copy the live window so that it ends at ``max_len``, squeezing out every row's holes.

        Each row's valid columns keep their order and end at ``max_len`` (a stable sort of the mask
        puts them last), so the window shrinks to the most valid columns of any row: room for a
        prefix of ``need`` tokens on the left, and for at least ``max_len`` columns of steps.
        """
        if need > self.max_len:
            raise ValueError(f"a branch prefix of {need} tokens exceeds the engine's row length {self.max_len}")
        s, w = self.window.s, self.window.w
        mask = self.mbuf[:, s:w]
        span = int(mask.sum(1).max()) if mask.numel() else 0
        order = torch.sort(mask, dim=1, stable=True).indices[:, w - s - span :]
        new_s = self.max_len - span
        squeezed = mask.gather(1, order)
        self.move_window(order, new_s)
        self.mbuf.zero_()
        self.mbuf[:, new_s : self.max_len] = squeezed

    def halve(self) -> None:
        """Out of memory: requeue the second half of the rows (decoded again from their start) and shrink.

        A restarted row gives the same output: greedy decoding is deterministic and a sampled request's random
        stream restarts with it.
        """
        keep = len(self.rows) // 2
        for row in reversed(self.rows[keep:]):
            if row is not None:
                self._requeue(row)
        log.warning("%s: out of memory with %d rows; continuing with %d", self.what, len(self.rows), keep)
        self.mbuf[:, self.window.w :] = 0  # a failed step's columns
        self.keep_rows(list(range(keep)))
        self.batch_size = keep
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
