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
    else if (r.pp && r.pp[String(t)] !== undefined) v = [r.c[t] ? "crit" : "none",
      r.c[t] ? "Predicted critical" : "Predicted replaceable", "not decoded: the probe's probability is " +
      r.pp[String(t)].toFixed(3) + ", outside the band that cft identify --predict decodes"];
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
