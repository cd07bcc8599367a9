"""Every artifact loads with ``datasets.load_dataset("json", ...)`` even when its first verifier failure comes late.

``datasets`` reads a JSON Lines file in blocks of 10 MB and fixes each column's type from the first block:
a key missing there, or null throughout it, cannot take a value later ("Couldn't cast array of type
string to null"). Each test builds a real artifact (the stage's own record function, through
``ResumableWriter``) of more than 10 MB whose only grading failures are its last records, and loads it
with the plain call a user types. No model decodes: the responses and the grader's verdicts are synthetic.
"""

from __future__ import annotations

import json

import pytest

from cft import verify
from cft.artifacts import ResumableWriter
from cft.data import Problem
from cft.decoding import Output
from cft.evaluate import Item, _record
from cft.generate import generation_record
from cft.identify import IdentifyConfig, Work, branch_record, label_record

RESPONSE_TOKENS = 1200  # ids per response: about 6 KB a generations record, so ROWS of them pass the 10 MB block
ROWS = 2200
FAILURES = {"timed out": verify.GradeResult(None, False, "none", timed_out=True),
            "crashed": verify.GradeResult(None, False, "none", error="RecursionError: maximum recursion depth")}


@pytest.fixture
def late_failures(monkeypatch):
    """The grader: right for every response but the two named in FAILURES (the file's last records)."""
    def grade_detailed(text: str, gold: str) -> verify.GradeResult:
        return FAILURES.get(text) or verify.GradeResult(gold, True, "numeric")

    monkeypatch.setattr(verify, "grade_detailed", grade_detailed)


def response_text(i: int) -> str:
    return list(FAILURES)[i - ROWS + len(FAILURES)] if i >= ROWS - len(FAILURES) else f"The answer is {i}."


def write(path, kind: str, records: list[dict]):
    writer = ResumableWriter(path, kind)
    writer.write(records)
    writer.finalize([r["key"] for r in records], {"stage": "test"})
    assert path.stat().st_size > 10 << 20, "the failures must come after datasets' first block"
    return path


def load_and_check(path, tmp_path) -> list[dict]:
    """The file loads with the plain call; every line has the same keys as the first."""
    import datasets

    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(list(rec) == list(lines[0]) for rec in lines), "one key set, in one order, on every record"
    data = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(data) == len(lines) and data.column_names == list(lines[0])
    return data


def test_generations_load_with_datasets(tmp_path, late_failures):
    ids = list(range(RESPONSE_TOKENS))
    records = [generation_record(f"k{i}", Problem(f"p{i}", f"What is {i}?", str(i)), [1, 2, 3],
                                 Output(ids, response_text(i), "eos")) for i in range(ROWS)]
    data = load_and_check(write(tmp_path / "g.jsonl", "generations", records), tmp_path)
    assert data[0]["verify_error"] == "" and data[0]["correct"]
    assert data[ROWS - 2]["verify_error"] == "timeout" and data[ROWS - 1]["verify_error"].startswith("RecursionError")
    assert data[ROWS - 1]["prediction"] is None and not data[ROWS - 1]["correct"]


def test_eval_samples_load_with_datasets(tmp_path, late_failures):
    ids = list(range(RESPONSE_TOKENS))
    records = []
    for i in range(ROWS):
        item = Item("testbed:test", Problem(f"p{i // 2}", "q", str(i)), [1, 2, 3])
        kind, entropy = ("greedy", None) if i % 2 == 0 else ("sample", 0.5)  # entropy: null for greedy ones
        records.append(_record(f"k{i}", item, kind, 0, Output(ids, response_text(i), "eos", entropy)))
    data = load_and_check(write(tmp_path / "samples.jsonl", "samples", records), tmp_path)
    assert data[0]["verify_error"] == "" and data[0]["entropy"] is None and data[1]["entropy"] == 0.5
    assert data[ROWS - 2]["verify_error"] == "timeout" and data[ROWS - 1]["verify_error"].startswith("RecursionError")


def test_labels_load_with_datasets(tmp_path, testbed_tokenizer):
    """A branch whose grading timed out (``ok`` null, ``verify_error`` set) first appears in the last record."""
    tok = testbed_tokenizer
    response = [i % (len(tok) - 1) for i in range(200)]
    cfg = IdentifyConfig(model="testbed", input="g.jsonl", out="l.jsonl")

    def record(i: int, timeout: bool) -> dict:
        alternatives = [[5, 6] if t % 4 == 0 else [] for t in range(len(response))]
        work = Work(f"k{i}", {"id": f"p{i}", "question": "q", "gold": "3", "response": "r"}, [1, 2, 3], response,
                    "3", alternatives, [], [[None] * len(a) for a in alternatives],
                    ranks=[[2, 3] if a else [] for a in alternatives],
                    alt_margin=[0.25 if a else None for a in alternatives])
        for t in range(0, len(response), 4):
            # rank 2 fails (position 0: also rank 3, so it is critical); rank 3 of the others is never run
            work.results[t][0] = branch_record(work, t, 0, ok=False, answer="4", ids=[7, 8], margin=0.5)
        work.results[0][1] = branch_record(work, 0, 1, ok=False, answer="5", ids=[9], margin=0.75)
        if timeout:
            work.results[4][1] = branch_record(work, 4, 1, ok=None, ids=[9], margin=0.5, verify_error="timeout")
        return label_record(work, tok, cfg)

    rows = (11 << 20) // len(json.dumps(record(0, False), separators=(",", ":"))) + 1
    records = [record(i, timeout=i == rows - 1) for i in range(rows)]
    data = load_and_check(write(tmp_path / "l.jsonl", "labels", records), tmp_path)
    first, last = data[0]["branches"], data[rows - 1]["branches"]
    assert first[0][0]["verify_error"] == "" and first[4][1]["ok"] is None  # a skipped branch: every key present
    assert last[4][1]["verify_error"] == "timeout" and last[4][1]["ok"] is None
    assert data[0]["critical"][0] == 1 and sum(data[0]["critical"]) == 1
