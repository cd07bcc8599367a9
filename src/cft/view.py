"""``cft view``: one self-contained HTML page of the critical tokens of a labels file.

Every response is shown token by token. A token is shaded by how many of its alternatives failed
(all failed = critical, strong; some failed = light; untested positions greyed). Hovering or clicking
a token opens a panel with the alternatives tried (text, rank), each one's continuation, extracted
answer and verdict. Filters: a search box on problem id / question, and token kind
(``cft.kinds.token_kind``: digit / operator / other). The header carries the critical fraction, its
split by kind, and the labelling config from the ``.meta.json`` sidecar.

The page has no external reference: CSS and JS (package data: ``cft/assets/view.css`` and ``view.js``,
filled into ``view.html``) are inline and the data is one JSON blob in a ``<script type="application/json">``
(``<``, ``>`` and ``&`` escaped as ``\\u003c`` etc., so a response containing ``</script>`` cannot end it).
Text is inserted with ``textContent`` only.

A URL hash selects a token and sets filters, e.g. ``view.html#p=0&t=12`` (response index 0, token 12),
``#kind=digit&crit=1&q=apples``.
"""

from __future__ import annotations

import html
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from cft.artifacts import InputError, load_records, read_meta
from cft.config import from_args, model_option, option
from cft.kinds import token_kind

KIND_CODE = {"digit": "d", "operator": "o", "other": "x"}
WINDOW = 8  # tokens of left context used to decode one token's text (checked against the full decode)
MIN_TAIL = 12  # a continuation's suffix shared with the original response is stored as a reference if longer


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def token_pieces(tok, ids: list[int]) -> list[str]:
    """Each token's text in context; ``"".join(pieces) == decode(ids)``.

    Decoded with a short left window (fast); if that does not reproduce the full text (a tokenizer whose
    decode depends on more context), falls back to exact prefix decoding, holding back a token whose
    bytes do not yet form a character (its text goes to the token that completes it).
    """
    full = _decode(tok, ids)
    pieces = []
    for t in range(len(ids)):
        s = max(0, t - WINDOW)
        before, upto = _decode(tok, ids[s:t]), _decode(tok, ids[s : t + 1])
        pieces.append(upto[len(before):] if upto.startswith(before) else upto)
    if "".join(pieces) == full:
        return pieces
    pieces, emitted = [], 0
    for t in range(len(ids)):
        cur = _decode(tok, ids[: t + 1])
        if cur.endswith("\ufffd") and t + 1 < len(ids):
            pieces.append("")
            continue
        pieces.append(cur[emitted:])
        emitted = len(cur)
    return pieces


def _common_suffix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(reversed(a), reversed(b)):
        if x != y:
            break
        n += 1
    return n


def _label(tok, token_id: int, text: str) -> tuple[str, bool]:
    """Display text of a token and whether it is a special token that decodes to nothing."""
    if text:
        return text, False
    name = tok.convert_ids_to_tokens(int(token_id))
    return (name if isinstance(name, str) else f"<{token_id}>"), True


def response_view(rec: dict, tok, index: int) -> dict[str, Any]:
    """The page data of one labels record (see the module docstring for the meaning of each field)."""

    ids = rec["response_ids"]
    n = len(ids)
    pieces = token_pieces(tok, ids)
    full = "".join(pieces)
    critical = list(rec.get("critical") or [0] * n)
    eligible = list(rec.get("eligible") or [int(bool(b)) for b in rec.get("branches") or [[]] * n])
    branches = rec.get("branches") or [[] for _ in range(n)]
    special, kinds = {}, []
    for t, (y, piece) in enumerate(zip(ids, pieces)):
        label, is_special = _label(tok, y, piece)
        if is_special:
            special[str(t)] = label
        kinds.append(KIND_CODE[token_kind(tok.decode([y]))])
    offsets = [0]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))

    alts = []
    for t, brs in enumerate(branches):
        row = []
        if brs:
            s = max(0, t - WINDOW)
            left = _decode(tok, ids[s:t])
            rest = full[offsets[t + 1]:]
        for b in brs:
            a = b["token"]
            with_alt = _decode(tok, ids[s:t] + [a])
            alt_text = with_alt[len(left):] if with_alt.startswith(left) else _decode(tok, [a])
            alt_text, alt_special = _label(tok, a, alt_text)
            cont, tail = None, None
            if b.get("ids") is not None:
                whole = _decode(tok, ids[s:t] + [a] + list(b["ids"]))
                cont = whole[len(with_alt):] if whole.startswith(with_alt) else _decode(tok, b["ids"])
                shared = _common_suffix(cont, rest)
                if shared >= MIN_TAIL:  # the branch rejoins the original text: store a reference to it
                    cont, tail = cont[: len(cont) - shared], len(full) - shared
            row.append({
                "r": b.get("rank"), "a": alt_text, "sp": int(alt_special), "k": KIND_CODE[token_kind(tok.decode([a]))],
                "ok": None if b.get("ok") is None else int(bool(b["ok"])), "ans": b.get("answer"),
                "c": cont, "tail": tail, "n": None if b.get("ids") is None else len(b["ids"]),
            })
        alts.append(row)

    by_kind = {k: [0, 0] for k in KIND_CODE.values()}
    for k, c, e in zip(kinds, critical, eligible):
        if e:
            by_kind[k][0] += int(c)
            by_kind[k][1] += 1
    return {
        "i": index, "id": str(rec.get("id")), "q": rec.get("question") or "", "gold": str(rec.get("gold")),
        "p": pieces, "k": "".join(kinds), "c": [int(c) for c in critical], "e": [int(e) for e in eligible],
        "b": alts, "sp": special, "mm": list(rec.get("greedy_mismatches") or []), "greedy": rec.get("greedy", True),
        "ck": by_kind,  # per kind code: [critical, tested]
        # --predict: the probe's probability at each predicted (not decoded) position
        "pp": {str(t): p for t, (src, p) in enumerate(zip(rec.get("label_source") or [], rec.get("probe_prob") or []))
               if src == "predicted"},
        "find": f"{rec.get('id')}\n{rec.get('question') or ''}".lower(),
    }


def view_data(labels: list[dict], tok, meta: dict, source: str = "", total: int | None = None) -> dict[str, Any]:
    """The JSON blob the page renders: config, summary and one entry per response."""
    from cft.identify import summarize

    cfg = meta.get("config") or {}
    gen_cfg = (meta.get("generation_meta") or {}).get("config") or {}
    env = meta.get("environment") or {}
    config = {
        "model": cfg.get("model"), "k": cfg.get("k"), "engine": cfg.get("engine"),
        "max_new_tokens": cfg.get("max_new_tokens"), "stop_at_answer": cfg.get("stop_at_answer"),
        "include_eos": cfg.get("include_eos"), "dtype": cfg.get("dtype"),
        "approximations": cfg.get("approximations") or [],
        "data": gen_cfg.get("data"), "template": gen_cfg.get("template"),
        "device": env.get("device"), "cft": (env.get("versions") or {}).get("cft"),
    }
    return {
        "source": source, "total": len(labels) if total is None else total, "config": config,
        "summary": summarize(labels, tok), "file_summary": meta.get("summary") or {},
        "responses": [response_view(rec, tok, i) for i, rec in enumerate(labels)],
    }


def _json_for_script(data: Any) -> str:
    """JSON that is inert inside a ``<script>`` element: no ``<``, ``>``, ``&`` or line separators."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def asset(name: str) -> str:
    """A file of the page (``view.html``, ``view.css``, ``view.js``) as shipped in the package's ``assets``."""
    return resources.files("cft").joinpath("assets", name).read_text(encoding="utf-8")


_SLOT = re.compile(r"__(TITLE|CSS|JS|DATA)__")


def render_html(data: dict, title: str = "CFT critical tokens") -> str:
    """The page: the template with its slots filled in one pass, so no filled-in text is read as a slot."""
    parts = {"TITLE": html.escape(title), "CSS": asset("view.css"), "JS": asset("view.js"),
             "DATA": _json_for_script(data)}
    return _SLOT.sub(lambda m: parts[m[1]], asset("view.html"))


def render_view(labels_path: str | os.PathLike, out_path: str | os.PathLike, model: str | None = None,
                limit: int | None = None, tokenizer=None) -> Path:
    """Write the HTML page of ``labels_path`` to ``out_path``; the tokenizer is the sidecar's model
    unless ``model`` (or an already loaded ``tokenizer``) is given."""
    labels = load_records(labels_path, "labels")
    total = len(labels)
    if limit is not None:
        labels = labels[:limit]
    meta = read_meta(labels_path)
    if tokenizer is None:
        name = model or (meta.get("config") or {}).get("model")
        if not name:
            raise InputError(str(labels_path) + ".meta.json", None, "config.model",
                             "no model named (sidecar missing); pass --model")
        from cft.models import load_tokenizer

        tokenizer = load_tokenizer(name)
    data = view_data(labels, tokenizer, meta, source=Path(labels_path).name, total=total)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(data, f"CFT critical tokens: {Path(labels_path).name}"), encoding="utf-8")
    return out


@dataclass
class ViewConfig:
    """Options of ``cft view`` (``CONFIGS``)."""

    labels: str = option(help="labels JSONL from `cft identify` (cft.labels/2)", positional=True)
    out: str = option("view.html", "output HTML file")
    model: str | None = model_option(None, "tokenizer to decode with (default: the model in the sidecar)")
    limit: int | None = option(None, "show only the first N responses")


CONFIGS = (ViewConfig,)


def run(args) -> int:
    cfg = from_args(ViewConfig, args)
    out = render_view(cfg.labels, cfg.out, model=cfg.model, limit=cfg.limit)
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.1f} MB); open it in a browser (file://{out.resolve()})")
    if size > 50e6:
        print("the page is large; --limit N keeps it responsive")
    return 0

