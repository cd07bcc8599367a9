"""``cft view``: the HTML page of critical tokens (no browser needed: the embedded data is checked)."""

from __future__ import annotations

import json
import re

import pytest

from cft.artifacts import InputError, write_meta
from cft.cli import main
from cft.identify import summarize
from cft.view import render_view, token_pieces, view_data
from tests.conftest import generation, write_jsonl

NASTY = 'Careful: </script><b>bold</b> & "quotes" \'x\' <!-- 2 < 3 --> so 4 + 3 = 7. The answer is 7.'
PLAIN = "She has 4 + 3 = 7 books. The answer is 7."
DATA_RE = re.compile(r'<script type="application/json" id="cft-data">(.*?)</script>', re.S)


def labels_record(tok, question: str, text: str, rid: str, gold: str = "7") -> dict:
    """A ``cft.labels/1`` record built by hand: digits critical (both alternatives fail), operators partly
    (rank 2 fails, rank 3 succeeds), other tokens replaceable (rank 2 succeeds, rank 3 skipped), EOS untested."""
    from cft.identify import token_kind

    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    wrong = tok.encode(" = 8. The answer is 8.", add_special_tokens=False) + [tok.eos_token_id]
    alt_a, alt_b = tok.convert_tokens_to_ids("9"), tok.convert_tokens_to_ids("=")
    rec = generation(tok, question, ids, gold, rid=rid)
    critical, eligible, branches = [], [], []
    for t, y in enumerate(ids):
        if t == len(ids) - 1:
            critical.append(0), eligible.append(0), branches.append([])
            continue
        rest = ids[t + 1:]  # the alternative rejoins the response: its continuation is the response's rest
        kind = token_kind(tok.decode([y]))
        fail = {"ok": False, "answer": "8", "ids": wrong}
        good = {"ok": True, "answer": gold, "ids": rest}
        first, second = {"digit": (fail, fail), "operator": (fail, good)}.get(
            kind, (good, {"ok": None, "answer": None, "ids": None}))
        branches.append([{"token": alt_a, "rank": 2, **first}, {"token": alt_b, "rank": 3, **second}])
        critical.append(int(kind == "digit"))
        eligible.append(1)
    rec.update(schema="cft.labels/1", critical=critical, eligible=eligible, greedy=True, greedy_mismatches=[],
               branches=branches, critical_spans=[])
    return rec


@pytest.fixture()
def labels_file(tmp_path, testbed_tokenizer):
    recs = [labels_record(testbed_tokenizer, "Anna has 4 books & gets 3. How many?", PLAIN, "p0"),
            labels_record(testbed_tokenizer, "What is 4 + 3? <i>quick</i>", NASTY, "p1"),
            labels_record(testbed_tokenizer, "Zoe has 7 pens.", "Zoe has 7 pens. The answer is 7.", "p2")]
    path = write_jsonl(tmp_path / "labels.jsonl", recs)
    write_meta(path, {"stage": "identify", "config": {"model": "testbed", "k": 3, "engine": "fast",
                                                      "approximations": []}, "summary": {}})
    return path, recs


def embedded(html_text: str) -> dict:
    m = DATA_RE.search(html_text)
    assert m, "no embedded data"
    return json.loads(m.group(1))


def test_page_is_self_contained_with_all_responses(labels_file, testbed_tokenizer, tmp_path):
    path, recs = labels_file
    out = render_view(path, tmp_path / "view.html", tokenizer=testbed_tokenizer)
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?://", text)
    assert not re.search(r"<script[^>]*\bsrc=|<link\b|@import|url\(", text, re.I)
    assert text.count("<script") == 2  # the data blob and the inline code
    data = embedded(text)
    assert len(data["responses"]) == len(recs) == data["total"]
    assert data["config"]["model"] == "testbed" and data["config"]["k"] == 3 and data["config"]["engine"] == "fast"
    assert data["summary"] == summarize(recs, testbed_tokenizer)
    assert [r["id"] for r in data["responses"]] == ["p0", "p1", "p2"]


def test_text_that_looks_like_markup_is_escaped(labels_file, testbed_tokenizer, tmp_path):
    path, recs = labels_file
    text = render_view(path, tmp_path / "view.html", tokenizer=testbed_tokenizer).read_text()
    assert text.count("</script>") == 2  # only the page's own closing tags
    assert "<b>" not in text and "<i>" not in text and "<!-- 2" not in text
    r = embedded(text)["responses"][1]
    assert "".join(r["p"]) == NASTY  # the tokens round-trip to the response text
    assert r["q"] == "What is 4 + 3? <i>quick</i>"


def test_tokens_kinds_and_alternatives(labels_file, testbed_tokenizer):
    path, recs = labels_file
    data = view_data(recs, testbed_tokenizer, {"config": {"model": "testbed"}})
    r = data["responses"][0]
    assert len(r["p"]) == len(r["k"]) == len(r["c"]) == len(r["b"]) == len(recs[0]["response_ids"])
    by_text = dict(zip(r["p"], r["k"]))
    assert by_text["4"] == "d" and by_text[" +"] == "o" and by_text[" books"] == "x"
    assert r["sp"] == {str(len(r["p"]) - 1): "<|im_end|>"}  # the final EOS shows as a labelled special token
    assert r["e"][-1] == 0 and r["b"][-1] == []
    # per-kind counts drive the kind filter; they match the library summary
    s = summarize(recs[:1], testbed_tokenizer)["critical_by_kind"]
    names = {"d": "digit", "o": "operator", "x": "other"}
    assert {names[k]: v for k, v in r["ck"].items() if v[1]} == {k: [v["critical"], v["tokens"]] for k, v in s.items()}
    t_digit, t_op, t_other = r["p"].index("4"), r["p"].index(" +"), r["p"].index(" books")
    full = "".join(r["p"])
    digit = r["b"][t_digit]
    assert [(a["r"], a["a"], a["ok"], a["ans"]) for a in digit] == [(2, "9", 0, "8"), (3, "=", 0, "8")]
    assert digit[0]["c"] == " = 8. The answer is 8." and digit[0]["tail"] is None
    assert [a["ok"] for a in r["b"][t_op]] == [0, 1]
    other = r["b"][t_other]
    assert other[1]["ok"] is None and other[1]["c"] is None  # skipped: nothing was decoded
    # a continuation that rejoins the response stores a reference to the shared tail
    assert other[0]["c"] + full[other[0]["tail"]:] == full[len("".join(r["p"][: t_other + 1])):]


def test_search_text_and_limit(labels_file, testbed_tokenizer, tmp_path):
    path, recs = labels_file
    data = embedded(render_view(path, tmp_path / "v.html", tokenizer=testbed_tokenizer, limit=2).read_text())
    assert len(data["responses"]) == 2 and data["total"] == 3
    finds = [r["find"] for r in data["responses"]]
    assert [("anna" in f, "p1" in f) for f in finds] == [(True, False), (False, True)]


def test_multibyte_characters_split_across_tokens(testbed_tokenizer):
    ids = testbed_tokenizer.encode("café ≥ 5 → 6", add_special_tokens=False)
    pieces = token_pieces(testbed_tokenizer, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == "café ≥ 5 → 6"
    assert not any("\ufffd" in p for p in pieces)


def test_cli_reads_model_from_sidecar(labels_file, tmp_path, capsys):
    path, _ = labels_file
    out = tmp_path / "cli.html"
    assert main(["view", str(path), "--out", str(out), "--limit", "1"]) == 0
    assert len(embedded(out.read_text())["responses"]) == 1
    assert "wrote" in capsys.readouterr().out


def test_no_model_is_an_input_error(tmp_path, testbed_tokenizer):
    rec = labels_record(testbed_tokenizer, "Q", PLAIN, "p0")
    path = write_jsonl(tmp_path / "bare.jsonl", [rec])
    with pytest.raises(InputError, match="--model"):
        render_view(path, tmp_path / "x.html")
