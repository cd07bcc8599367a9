"""``cft view``: one self-contained HTML page of the critical tokens of a labels file.

Every response is shown token by token. A token is shaded by how many of its alternatives failed
(all failed = critical, strong; some failed = light; untested positions greyed). Hovering or clicking
a token opens a panel with the alternatives tried (text, rank), each one's continuation, extracted
answer and verdict. Filters: a search box on problem id / question, and token kind
(``cft.identify.token_kind``: digit / operator / other). The header carries the critical fraction, its
split by kind, and the labelling config from the ``.meta.json`` sidecar.

The page has no external reference: CSS and JS are inline and the data is one JSON blob in a
``<script type="application/json">`` (``<``, ``>`` and ``&`` escaped as ``\\u003c`` etc., so a response
containing ``</script>`` cannot end it). Text is inserted with ``textContent`` only.

A URL hash selects a token and sets filters, e.g. ``view.html#p=0&t=12`` (response index 0, token 12),
``#kind=digit&crit=1&q=apples``.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cft.artifacts import InputError, load_records, read_meta
from cft.config import from_args, model_option, option

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
    from cft.identify import token_kind

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


def render_html(data: dict, title: str = "CFT critical tokens") -> str:
    return (PAGE.replace("__TITLE__", html.escape(title))
            .replace("__CSS__", CSS).replace("__JS__", JS).replace("__DATA__", _json_for_script(data)))


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

    labels: str = option(help="labels JSONL from `cft identify` (cft.labels/1)", positional=True)
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


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__CSS__</style>
</head>
<body>
<header id="top"></header>
<div id="bar"></div>
<main>
<section id="list"></section>
<aside id="panel"></aside>
</main>
<script type="application/json" id="cft-data">__DATA__</script>
<script>__JS__</script>
</body>
</html>
"""

CSS = r"""
:root {
  --bg: #f6f7f9; --card: #fff; --ink: #1c2230; --muted: #6b7385; --line: #e3e6ec;
  --crit: 232, 62, 88; --ok: #1f9d55; --bad: #d3344d; --sel: #2f6fed; --mm: #2f6fed;
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "DejaVu Sans", sans-serif; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace; }
header { background: #1d2433; color: #eef1f7; padding: 14px 22px 12px; display: flex; gap: 28px;
  align-items: center; flex-wrap: wrap; }
header h1 { font-size: 17px; margin: 0; font-weight: 600; letter-spacing: .2px; }
header .src { color: #9aa3b7; font-size: 12px; }
.big { font-size: 30px; font-weight: 700; line-height: 1; color: #fff; }
.big small { font-size: 12px; font-weight: 400; color: #9aa3b7; display: block; margin-top: 4px; }
.kinds { display: grid; grid-template-columns: auto 140px auto; gap: 3px 10px; align-items: center;
  font-size: 12px; }
.kinds .track { height: 8px; background: #38425a; border-radius: 4px; overflow: hidden; }
.kinds .fill { height: 100%; background: rgb(var(--crit)); }
.kinds .num { color: #c3cad9; font-variant-numeric: tabular-nums; }
.cfg { display: flex; flex-wrap: wrap; gap: 6px; max-width: 560px; }
.chip { background: #2c3548; color: #dfe4ee; border-radius: 999px; padding: 2px 9px; font-size: 12px;
  white-space: nowrap; }
.chip b { color: #fff; font-weight: 600; }
.chip.chip-warn { background: #8a5a00; }
#bar { position: sticky; top: 0; z-index: 5; background: #fff; border-bottom: 1px solid var(--line);
  padding: 8px 22px; display: flex; gap: 14px; align-items: center; flex-wrap: wrap; }
#bar input[type=search] { width: 210px; padding: 5px 9px; border: 1px solid #cdd2db; border-radius: 6px;
  font: inherit; }
.seg { display: inline-flex; border: 1px solid #cdd2db; border-radius: 6px; overflow: hidden; }
.seg button { border: 0; background: #fff; padding: 4px 11px; font: inherit; cursor: pointer;
  border-right: 1px solid #cdd2db; color: var(--muted); }
.seg button:last-child { border-right: 0; }
.seg button.on { background: #e9effd; color: #1b4fc4; font-weight: 600; }
#bar label { color: var(--muted); cursor: pointer; user-select: none; }
.legend { display: flex; gap: 12px; color: var(--muted); font-size: 12px; margin-left: auto; align-items: center; }
.legend span.t { padding: 0 5px; border-radius: 3px; color: var(--ink); }
.count { color: var(--muted); font-size: 12px; font-variant-numeric: tabular-nums; }
main { display: grid; grid-template-columns: minmax(0, 1fr) 440px; gap: 18px; padding: 16px 22px 40px; }
#list { min-width: 0; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 12px 16px 14px;
  margin-bottom: 14px; box-shadow: 0 1px 2px rgba(20, 30, 50, .04); }
.card.hidden { display: none; }
.head { display: flex; gap: 10px; align-items: baseline; flex-wrap: wrap; margin-bottom: 6px; }
.head .idx { color: var(--muted); font-size: 12px; }
.head .pid { font-weight: 600; }
.head .gold { background: #e7f6ee; color: #17653a; border-radius: 5px; padding: 0 7px; font-size: 12px; }
.head .stat { margin-left: auto; color: var(--muted); font-size: 12px; font-variant-numeric: tabular-nums; }
.head .stat b { color: var(--ink); }
.minibar { display: inline-block; width: 60px; height: 6px; background: #eceff4; border-radius: 3px;
  vertical-align: middle; margin-left: 6px; overflow: hidden; }
.minibar i { display: block; height: 100%; background: rgb(var(--crit)); }
.warn { color: #9a5b00; font-size: 12px; }
.q { color: #414a5c; background: #f3f5f8; border-left: 3px solid #c9d0dc; padding: 5px 10px; margin: 4px 0 9px;
  border-radius: 0 6px 6px 0; white-space: pre-wrap; }
.resp { white-space: pre-wrap; word-wrap: break-word; font-size: 15px; line-height: 1.85; }
.tk { border-radius: 3px; cursor: pointer; padding: 1px 0; }
.bounds .tk { box-shadow: inset -1px 0 0 rgba(120, 130, 150, .22); }
.tk:hover { outline: 1px solid #8aa6e8; }
.tk.part { background: rgba(var(--crit), calc(.10 + .32 * var(--s))); }
.tk.crit { background: rgba(var(--crit), .78); color: #fff; }
.tk.un { color: #9aa1ae; text-decoration: underline dotted #b8bec9; }
.tk.mm { text-decoration: underline wavy var(--mm); }
.tk.off { background: none; color: inherit; }
.tk.off.un { color: #9aa1ae; }
.tk.special { font-size: 11px; color: #7b8396; border: 1px dashed #c3c9d4; padding: 0 3px; margin: 0 2px;
  font-family: ui-monospace, Menlo, Consolas, "DejaVu Sans Mono", monospace; }
.tk.empty::after { content: "\00b7"; color: #b0b6c2; }
.tk.sel { outline: 2px solid var(--sel); outline-offset: 1px; }
#panel { position: sticky; top: calc(var(--bar, 50px) + 12px); align-self: start;
  max-height: calc(100vh - var(--bar, 50px) - 24px); overflow: auto;
  background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px;
  box-shadow: 0 2px 8px rgba(20, 30, 50, .06); }
#panel h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .6px; color: var(--muted); margin: 0 0 8px; }
#panel .help { color: var(--muted); }
#panel .help li { margin: 3px 0; }
.tokchip { font-family: ui-monospace, Menlo, Consolas, "DejaVu Sans Mono", monospace; background: #eef1f6;
  border: 1px solid #d7dce6; border-radius: 4px; padding: 0 5px; white-space: pre; }
.verdict { border-radius: 6px; padding: 6px 10px; margin: 8px 0 10px; font-weight: 600; }
.verdict.crit { background: rgba(var(--crit), .12); color: #a3122c; }
.verdict.part { background: #fff4e0; color: #8a5200; }
.verdict.none { background: #e9f7ef; color: #17653a; }
.verdict.un { background: #f0f1f4; color: #5d6578; }
.verdict small { display: block; font-weight: 400; color: inherit; opacity: .85; }
.ctx { font-size: 13px; color: #4a5367; background: #f7f8fa; border-radius: 6px; padding: 6px 9px;
  white-space: pre-wrap; word-wrap: break-word; }
.ctx .me { background: rgba(var(--crit), .78); color: #fff; border-radius: 3px; }
.ctx .me.plain { background: #dfe6f7; color: var(--ink); }
.alt { border: 1px solid var(--line); border-radius: 8px; padding: 8px 10px; margin-top: 10px; }
.alt .top { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
.alt .rank { font-size: 11px; color: var(--muted); text-transform: uppercase; letter-spacing: .5px; }
.alt .v { margin-left: auto; font-weight: 700; border-radius: 5px; padding: 0 7px; }
.alt .v.ok { color: var(--ok); background: #e7f6ee; }
.alt .v.bad { color: var(--bad); background: #fdecef; }
.alt .v.skip { color: #6b7385; background: #f0f1f4; font-weight: 600; }
.alt .ans { font-size: 12px; color: var(--muted); }
.alt .ans b { color: var(--ink); font-family: ui-monospace, Menlo, Consolas, "DejaVu Sans Mono", monospace; }
.cont { margin-top: 6px; font-size: 13px; white-space: pre-wrap; word-wrap: break-word; color: #2b3345; }
.cont .pre { color: #9aa1ae; }
.cont .a { background: #ffe8a3; border-radius: 3px; }
.cont .same { color: #9aa1ae; }
.cont .mark { font-size: 11px; color: #8a93a6; border: 1px solid #d7dce6; border-radius: 4px; padding: 0 4px;
  margin: 0 3px; white-space: nowrap; }
.dim { color: var(--muted); font-size: 12px; }
.keys { color: var(--muted); font-size: 12px; margin-top: 12px; }
kbd { border: 1px solid #cfd4dd; border-bottom-width: 2px; border-radius: 4px; padding: 0 4px; font-size: 11px;
  background: #fafbfc; }
.empty-list { color: var(--muted); padding: 30px; text-align: center; }
"""

JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("cft-data").textContent);
  var R = D.responses;
  var KIND = {d: "digit", o: "operator", x: "other"};
  var state = {q: "", kinds: {d: true, o: true, x: true}, critOnly: false, bounds: true, sel: null, pinned: false};
  var cards = [], spans = [];

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  function pct(a, b) { return b ? (100 * a / b).toFixed(1) + "%" : "n/a"; }
  function vis(s) { return s.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }
  function tokState(r, t) {
    if (!r.e[t]) return {cls: "un", s: 0, fail: 0, tried: 0, n: 0};
    var b = r.b[t] || [], fail = 0, tried = 0;
    for (var j = 0; j < b.length; j++) { if (b[j].ok !== null) { tried++; if (!b[j].ok) fail++; } }
    var n = b.length, s = n ? fail / n : 0;
    return {cls: r.c[t] ? "crit" : (fail ? "part" : ""), s: s, fail: fail, tried: tried, n: n};
  }

  // ---------- header ----------
  function header() {
    var h = document.getElementById("top"), S = D.summary, C = D.config;
    var t = el("div");
    t.appendChild(el("h1", null, "Critical tokens"));
    var shown = R.length < D.total ? R.length + " of " + D.total + " responses" : R.length + " responses";
    t.appendChild(el("div", "src", D.source + " \u00b7 " + shown));
    h.appendChild(t);
    var big = el("div", "big", (100 * S.critical_fraction).toFixed(1) + "%");
    big.appendChild(el("small", null, "critical of " + S.positions + " tested positions"));
    h.appendChild(big);
    var k = el("div", "kinds");
    Object.keys(S.critical_by_kind).forEach(function (name) {
      var v = S.critical_by_kind[name];
      k.appendChild(el("span", null, name));
      var tr = el("div", "track"), f = el("div", "fill");
      f.style.width = (100 * v.fraction).toFixed(1) + "%";
      tr.appendChild(f); k.appendChild(tr);
      k.appendChild(el("span", "num", pct(v.critical, v.tokens) + "  (" + v.critical + "/" + v.tokens + ")"));
    });
    h.appendChild(k);
    var cfg = el("div", "cfg");
    function chip(label, value, warn) {
      if (value === undefined || value === null || value === "") return;
      var c = el("span", "chip" + (warn ? " chip-warn" : ""), label + " ");
      c.appendChild(el("b", null, String(value)));
      cfg.appendChild(c);
    }
    chip("model", C.model); chip("k", C.k); chip("engine", C.engine); chip("max new tokens", C.max_new_tokens);
    chip("stop at answer", C.stop_at_answer); chip("EOS tested", C.include_eos); chip("data", C.data);
    chip("branches", S.branches); chip("not greedy", S.not_greedy, S.not_greedy > 0);
    chip("no critical token", S.no_critical_token);
    if (C.approximations && C.approximations.length) chip("approximations", C.approximations.join(", "), true);
    h.appendChild(cfg);
  }

  // ---------- filter bar ----------
  var countEl, kindButtons = {};
  function bar() {
    var b = document.getElementById("bar");
    var q = el("input"); q.type = "search"; q.placeholder = "Search id or question\u2026";
    q.id = "q"; q.addEventListener("input", function () { state.q = q.value; apply(); });
    b.appendChild(q);
    var seg = el("div", "seg");
    ["d", "o", "x"].forEach(function (c) {
      var btn = el("button", "on", KIND[c]);
      btn.title = "highlight " + KIND[c] + " tokens";
      btn.addEventListener("click", function () { state.kinds[c] = !state.kinds[c]; apply(); });
      kindButtons[c] = btn; seg.appendChild(btn);
    });
    b.appendChild(seg);
    function check(label, key, id) {
      var l = el("label"), c = el("input"); c.type = "checkbox"; c.id = id; c.checked = state[key];
      c.addEventListener("change", function () { state[key] = c.checked; apply(); });
      l.appendChild(c); l.appendChild(document.createTextNode(" " + label)); b.appendChild(l);
    }
    check("critical only", "critOnly", "critonly");
    check("boundaries", "bounds", "bounds");
    countEl = el("span", "count"); b.appendChild(countEl);
    var lg = el("div", "legend");
    function sw(cls, text, style) {
      var s = el("span", "t tk " + cls, text); if (style) s.setAttribute("style", style); lg.appendChild(s);
    }
    sw("crit", "critical"); sw("part", "some alts fail", "--s:.5"); sw("", "replaceable");
    sw("un", "untested");
    b.appendChild(lg);
  }

  // ---------- responses ----------
  function card(r, p) {
    var c = el("div", "card"); c.id = "r" + p;
    var h = el("div", "head");
    h.appendChild(el("span", "idx", "#" + p));
    h.appendChild(el("span", "pid", r.id));
    h.appendChild(el("span", "gold", "gold " + r.gold));
    var crit = 0, tested = 0;
    for (var t = 0; t < r.c.length; t++) { if (r.e[t]) { tested++; crit += r.c[t] ? 1 : 0; } }
    var st = el("span", "stat"); st.appendChild(el("b", null, String(crit)));
    st.appendChild(document.createTextNode(" critical / " + tested + " tested (" + pct(crit, tested) + ")"));
    var mb = el("span", "minibar"), mi = el("i"); mi.style.width = (tested ? 100 * crit / tested : 0) + "%";
    mb.appendChild(mi); st.appendChild(mb);
    h.appendChild(st);
    c.appendChild(h);
    if (!r.greedy) c.appendChild(el("div", "warn", "not greedy at positions " + r.mm.join(", ") +
      " (wavy underline): alternatives there are top-k minus the response token"));
    if (r.q) c.appendChild(el("div", "q", r.q));
    var body = el("div", "resp"), row = [], mm = {};
    r.mm.forEach(function (t) { mm[t] = 1; });
    for (var t2 = 0; t2 < r.p.length; t2++) {
      var sp = r.sp[String(t2)], s = el("span", "tk", sp || r.p[t2]);
      var ts = tokState(r, t2);
      s.dataset.p = p; s.dataset.t = t2; s.dataset.k = r.k[t2];
      if (ts.cls) s.classList.add(ts.cls);
      if (ts.cls === "part") s.style.setProperty("--s", ts.s.toFixed(2));
      if (sp) s.classList.add("special"); else if (!r.p[t2]) s.classList.add("empty");
      if (mm[t2]) s.classList.add("mm");
      body.appendChild(s); row.push(s);
    }
    body.addEventListener("mouseover", function (ev) {
      var s = ev.target.closest(".tk"); if (s && !state.pinned) show(+s.dataset.p, +s.dataset.t, false);
    });
    body.addEventListener("click", function (ev) {
      var s = ev.target.closest(".tk"); if (s) select(+s.dataset.p, +s.dataset.t);
    });
    c.appendChild(body);
    spans.push(row);
    return c;
  }

  function apply() {
    var q = state.q.trim().toLowerCase(), shown = 0, crit = 0, tested = 0;
    var list = document.getElementById("list");
    list.classList.toggle("bounds", state.bounds);
    ["d", "o", "x"].forEach(function (c) { kindButtons[c].classList.toggle("on", state.kinds[c]); });
    document.getElementById("q").value = state.q;
    document.getElementById("critonly").checked = state.critOnly;
    document.getElementById("bounds").checked = state.bounds;
    R.forEach(function (r, p) {
      var ok = !q || r.find.indexOf(q) >= 0;
      cards[p].classList.toggle("hidden", !ok);
      if (!ok) return;
      shown++;
      ["d", "o", "x"].forEach(function (c) { if (state.kinds[c]) { crit += r.ck[c][0]; tested += r.ck[c][1]; } });
      var row = spans[p];
      for (var t = 0; t < row.length; t++) {
        var s = row[t], kindOff = !state.kinds[r.k[t]];
        s.classList.toggle("off", kindOff || (state.critOnly && !r.c[t]));
      }
    });
    var kinds = ["d", "o", "x"].filter(function (c) { return state.kinds[c]; }).map(function (c) { return KIND[c]; });
    countEl.textContent = shown + "/" + R.length + " shown \u00b7 " + (kinds.length === 3 ? "" :
      (kinds.join(" + ") || "no kind") + ": ") + crit + "/" + tested + " critical (" + pct(crit, tested) + ")";
    document.getElementById("empty").style.display = shown ? "none" : "block";
    writeHash();
  }

  // ---------- panel ----------
  function help() {
    var P = document.getElementById("panel"); P.textContent = "";
    P.appendChild(el("h2", null, "Token details"));
    var u = el("ul", "help");
    ["Hover a token to see the alternatives tried at its position; click to pin the panel.",
     "Shading = share of the alternatives whose continuation missed the gold answer: all failed = critical.",
     "Grey dotted tokens were not tested (e.g. the final EOS).",
     "Each alternative: its rank in the model's top-k, the greedy continuation it leads to, the extracted answer " +
     "and the verdict (\u2713 gold reached, \u2717 wrong, skipped = not run, an earlier one already succeeded)."
    ].forEach(function (x) { u.appendChild(el("li", null, x)); });
    P.appendChild(u);
    keys(P);
  }
  function keys(P) {
    var k = el("div", "keys");
    k.innerHTML = "<kbd>\u2190</kbd> <kbd>\u2192</kbd> previous / next token \u00b7 " +
      "<kbd>Shift</kbd>+<kbd>\u2192</kbd> next critical \u00b7 <kbd>Esc</kbd> unpin";
    P.appendChild(k);
  }
  function show(p, t, pinned) {
    var r = R[p], P = document.getElementById("panel"), ts = tokState(r, t);
    P.textContent = "";
    P.appendChild(el("h2", null, "Response #" + p + " \u00b7 token " + t + " of " + r.p.length +
      (pinned ? " \u00b7 pinned" : "")));
    var line = el("div");
    var label = r.sp[String(t)] || r.p[t];
    line.appendChild(el("span", "tokchip", vis(label)));
    line.appendChild(el("span", "dim", "  " + KIND[r.k[t]] + " \u00b7 " + r.id + " \u00b7 gold " + r.gold));
    P.appendChild(line);
    var v;
    if (!r.e[t]) v = ["un", "Not tested", "this position was not eligible (the final EOS is excluded by default)"];
    else if (ts.n === 0) v = ["un", "No alternatives", "the model had no other top-k token here"];
    else if (r.c[t]) v = ["crit", "Critical: " + (ts.n === 1 ? "the only alternative fails" :
      "all " + ts.n + " alternatives fail"), "every continuation from another token missed the gold answer"];
    else {
      var good = (r.b[t] || []).filter(function (a) { return a.ok; })[0];
      var why = good ? "the rank-" + good.r + " alternative " + JSON.stringify(good.a) +
        " still reaches the gold answer" : "";
      v = ts.fail ? ["part", "Replaceable, but " + ts.fail + " of " + ts.n + " alternatives fail", why] :
        ["none", "Replaceable", why];
    }
    var vd = el("div", "verdict " + v[0], v[1]); vd.appendChild(el("small", null, v[2])); P.appendChild(vd);
    // context around the token
    var ctx = el("div", "ctx"), before = r.p.slice(0, t).join(""), after = r.p.slice(t + 1).join("");
    ctx.appendChild(document.createTextNode((before.length > 160 ? "\u2026" : "") + before.slice(-160)));
    ctx.appendChild(el("span", "me" + (r.c[t] ? "" : " plain"), label));
    ctx.appendChild(document.createTextNode(after.slice(0, 80) + (after.length > 80 ? "\u2026" : "")));
    P.appendChild(ctx);
    var full = r.p.join(""), pre = before.slice(-48);
    if (pre.length < before.length && pre.indexOf(" ") >= 0) pre = pre.slice(pre.indexOf(" "));
    (r.b[t] || []).forEach(function (a) {
      var box = el("div", "alt"), top = el("div", "top");
      top.appendChild(el("span", "rank", "rank " + a.r));
      top.appendChild(el("span", "tokchip", vis(a.a)));
      top.appendChild(el("span", "dim", KIND[a.k]));
      var verdict = a.ok === null ? ["skip", "skipped"] : a.ok ? ["ok", "\u2713 gold"] : ["bad", "\u2717 wrong"];
      top.appendChild(el("span", "v " + verdict[0], verdict[1]));
      box.appendChild(top);
      if (a.ok === null) {
        box.appendChild(el("div", "ans", "not run: an earlier alternative already reached the gold answer"));
      } else {
        var ans = el("div", "ans", "answer ");
        ans.appendChild(el("b", null, a.ans === null ? "(none extracted)" : a.ans));
        if (a.n !== null) ans.appendChild(document.createTextNode("  \u00b7 " + a.n + " tokens after the alternative"));
        box.appendChild(ans);
        var c = el("div", "cont");
        c.appendChild(el("span", "pre", (pre.length < before.length ? "\u2026" : "") + pre));
        c.appendChild(el("span", "a", a.a));
        if (a.c === null) c.appendChild(el("span", "dim", "  (continuation not stored)"));
        else {
          c.appendChild(document.createTextNode(a.c));
          if (a.tail !== null) {
            c.appendChild(el("span", "mark", "same as the response from here"));
            c.appendChild(el("span", "same", full.slice(a.tail)));
          }
        }
        box.appendChild(c);
      }
      P.appendChild(box);
    });
    if (pinned) keys(P);
  }
  function select(p, t, noScroll) {
    if (state.sel) { var o = spans[state.sel[0]][state.sel[1]]; if (o) o.classList.remove("sel"); }
    if (p === null || !R[p] || t < 0 || t >= R[p].p.length) {
      state.sel = null; state.pinned = false; help(); writeHash(); return;
    }
    state.sel = [p, t]; state.pinned = true;
    var s = spans[p][t]; s.classList.add("sel");
    if (!noScroll) s.scrollIntoView({block: "nearest"});
    show(p, t, true);
    writeHash();
  }

  // ---------- URL hash: p, t, q, kind, crit, bounds ----------
  function writeHash() {
    var parts = [];
    if (state.sel) parts.push("p=" + state.sel[0], "t=" + state.sel[1]);
    if (state.q) parts.push("q=" + encodeURIComponent(state.q));
    var ks = ["d", "o", "x"].filter(function (c) { return state.kinds[c]; });
    if (ks.length < 3) parts.push("kind=" + ks.map(function (c) { return KIND[c]; }).join(","));
    if (state.critOnly) parts.push("crit=1");
    if (!state.bounds) parts.push("bounds=0");
    var h = parts.length ? "#" + parts.join("&") : "";
    if (location.hash !== h && history.replaceState) {
      history.replaceState(null, "", h || location.pathname + location.search);
    }
  }
  function readHash() {
    var a = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      var i = kv.indexOf("="); if (i > 0) a[kv.slice(0, i)] = decodeURIComponent(kv.slice(i + 1));
    });
    if (a.q !== undefined) state.q = a.q;
    if (a.kind !== undefined) {
      var want = a.kind.split(",");
      ["d", "o", "x"].forEach(function (c) { state.kinds[c] = want.indexOf(KIND[c]) >= 0; });
    }
    if (a.crit !== undefined) state.critOnly = a.crit === "1";
    if (a.bounds !== undefined) state.bounds = a.bounds !== "0";
    var p = a.p !== undefined ? parseInt(a.p, 10) : null;
    if (a.id !== undefined) R.forEach(function (r, i) { if (r.id === a.id) p = i; });
    return p === null || isNaN(p) ? null : [p, parseInt(a.t || "0", 10) || 0];
  }

  document.addEventListener("keydown", function (ev) {
    if (ev.target.tagName === "INPUT") return;
    if (ev.key === "Escape") { select(null); return; }
    if (!state.sel || (ev.key !== "ArrowRight" && ev.key !== "ArrowLeft")) return;
    var p = state.sel[0], t = state.sel[1], r = R[p], d = ev.key === "ArrowRight" ? 1 : -1;
    t += d;
    if (ev.shiftKey) while (t >= 0 && t < r.p.length && !r.c[t]) t += d;
    if (t >= 0 && t < r.p.length) { select(p, t); ev.preventDefault(); }
  });

  header();
  bar();
  function barHeight() {
    document.documentElement.style.setProperty("--bar", document.getElementById("bar").offsetHeight + "px");
  }
  barHeight();
  window.addEventListener("resize", barHeight);
  var list = document.getElementById("list");
  R.forEach(function (r, p) { var c = card(r, p); cards.push(c); list.appendChild(c); });
  var none = el("div", "empty-list", "No problem matches the filter."); none.id = "empty"; list.appendChild(none);
  var want = readHash();
  apply();
  if (want) {
    select(want[0], want[1], true);
    var s = state.sel && spans[want[0]][want[1]];
    if (s && s.getBoundingClientRect().bottom > window.innerHeight - 40) {  // not in view: show its card
      var c = cards[want[0]], barH = document.getElementById("bar").offsetHeight;
      var y = c.getBoundingClientRect().top + window.scrollY - barH - 12;
      var sy = s.getBoundingClientRect().top + window.scrollY;
      window.scrollTo(0, sy - y > window.innerHeight - 200 ? sy - window.innerHeight / 2 : y);
    }
  } else help();
})();
"""
