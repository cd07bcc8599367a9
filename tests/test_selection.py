"""Token selection: exact masks of every method on hand-made examples, the example layout, the statistics."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from cft.artifacts import InputError
from cft.selection import (
    LabeledResponse,
    budget_mask,
    build_example,
    read_labels,
    select,
    select_masks,
    token_kind,
    token_statistics,
)

# prompt [1, 2]; response [3, 4, 5, 6] where 6 is the EOS (not eligible); tokens 3 and 5 are critical.
REC = LabeledResponse("q1", [1, 2], [3, 4, 5, 6], critical=[1, 0, 1, 0], eligible=[1, 1, 1, 0])
VOCAB = 8


class FakeTok:
    """Decodes single ids to fixed texts: a digit, an operator, a digit without space, the EOS (special)."""

    texts = {3: " 1", 4: " +", 5: "5", 6: "", 7: " apples"}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.texts.get(i, "x") for i in ids)


class TableLM(torch.nn.Module):
    """A 'model' whose next-token logits at sequence index i are row i of a fixed table, whatever the input."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)
        self.config = SimpleNamespace(pad_token_id=0)

    def forward(self, input_ids, attention_mask=None):
        b, n = input_ids.shape
        return SimpleNamespace(logits=self.table[:n].expand(b, n, -1))


def _peaked(token: int, strength: float) -> torch.Tensor:
    row = torch.zeros(VOCAB)
    row[token] = strength
    return row


def test_sft_dft_cft_masks():
    tok = FakeTok()
    assert select_masks("sft", [REC], tok) == [[1, 1, 1, 1]]  # the EOS is trained by SFT
    assert select_masks("dft", [REC], tok) == [[1, 1, 1, 1]]
    assert select_masks("cft", [REC], tok) == [[1, 0, 1, 0]]


def test_numeric_mask_and_token_kinds():
    assert select_masks("numeric", [REC], FakeTok()) == [[1, 0, 1, 0]]
    assert [token_kind(t) for t in (" 12", " +", "=", " apples", "", "(x")] == [
        "digit", "operator", "operator", "other", "other", "other"]


def test_budget_mask_hand_scores_and_ties():
    # eligible positions 0..3 (4 is not); k = 2; position 4 has the top score but is not a candidate
    scores, eligible = [0.1, 0.9, 0.5, 0.5, 5.0], [1, 1, 1, 1, 0]
    assert budget_mask(scores, eligible, 2, rank=[0, 1, 2, 3, 4]) == [0, 1, 1, 0, 0]
    assert budget_mask(scores, eligible, 2, rank=[0, 1, 9, 3, 4]) == [0, 1, 0, 1, 0]  # the tie goes by rank
    assert budget_mask(scores, eligible, 0, rank=[0, 1, 2, 3, 4]) == [0, 0, 0, 0, 0]


def test_entropy_mask_exact():
    # Response token t is predicted from sequence index 1 + t (prompt length 2).
    table = torch.zeros(6, VOCAB)
    table[1] = _peaked(3, 10.0)  # t=0: confident, low entropy
    table[2] = torch.zeros(VOCAB)  # t=1: uniform, maximal entropy
    table[3] = _peaked(5, 1.0)  # t=2: in between
    table[4] = torch.zeros(VOCAB)  # t=3: maximal too, but the EOS is not eligible
    assert select_masks("entropy", [REC], FakeTok(), model=TableLM(table)) == [[0, 1, 1, 0]]


def test_rho1_mask_exact_with_reference():
    start = TableLM(torch.zeros(6, VOCAB))  # uniform: loss log 8 everywhere
    ref = torch.zeros(6, VOCAB)
    ref[1] = _peaked(3, 4.0)  # the reference finds y_0 easy: high excess loss
    ref[2] = _peaked(4, 2.0)  # y_1 fairly easy
    ref[3] = _peaked(0, 3.0)  # y_2 harder than uniform: negative excess
    ref[4] = _peaked(6, 9.0)  # the EOS: easiest, but not eligible
    assert select_masks("rho1", [REC], FakeTok(), model=start, reference=TableLM(ref)) == [[1, 1, 0, 0]]


def _records(n: int) -> list[LabeledResponse]:
    return [LabeledResponse(f"r{i}", [1, 2], [3, 4, 5, 7, 4, 3, 6], [1, 0, 1, 0, 0, 1, 0], [1] * 6 + [0])
            for i in range(n)]


def test_random_budget_seeding_and_uniformity():
    recs = _records(400)
    masks = select_masks("random", recs, FakeTok(), seed=0)
    assert all(sum(m) == 3 and m[-1] == 0 for m in masks)  # CFT's budget, eligible positions only
    assert masks == select_masks("random", recs, FakeTok(), seed=0)
    assert masks[::-1] == select_masks("random", recs[::-1], FakeTok(), seed=0)  # independent of record order
    assert masks != select_masks("random", recs, FakeTok(), seed=1)
    counts = [sum(m[p] for m in masks) for p in range(6)]  # each eligible position: 3/6 of 400 on average
    assert all(150 <= c <= 250 for c in counts), counts


def test_rho1_without_reference_reduces_to_random():
    recs = _records(20)
    assert select_masks("rho1", recs, FakeTok(), seed=3) == select_masks("random", recs, FakeTok(), seed=3)


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        select_masks("attention", [REC], FakeTok())


def test_example_layout_label_alignment_and_weights():
    """labels[i] = input_ids[i] exactly where the response token at i is selected; -100 elsewhere."""
    ex = build_example(REC, [0, 1, 1, 0], "step")
    assert ex["input_ids"] == [1, 2, 3, 4, 5, 6]
    assert ex["labels"] == [-100, -100, -100, 4, 5, -100]
    assert ex["weights"] == [0, 0, 0, 1, 1, 0]
    assert build_example(REC, [0, 1, 1, 0], "sequence")["weights"] == [0, 0, 0, 0.5, 0.5, 0]
    for i, (t, lab) in enumerate(zip(ex["input_ids"], ex["labels"], strict=True)):
        assert lab in (-100, t), i


def test_unselected_response_is_excluded_and_counted():
    none = LabeledResponse("q2", [1], [7, 6], critical=[0, 0], eligible=[1, 0])
    sel = select("cft", [REC, none], FakeTok())
    assert len(sel.examples) == 1 and sel.examples[0]["input_ids"][:2] == [1, 2]
    assert sel.stats["responses_excluded"] == 1 and sel.stats["excluded_ids"] == ["q2"]
    assert select("random", [REC, none], FakeTok()).stats["responses_excluded"] == 1  # budget 0 as well
    with pytest.raises(ValueError, match="no selected token"):
        build_example(none, [0, 0])


def test_token_statistics_exact():
    stats = token_statistics("cft", [REC], [[1, 0, 1, 0]], FakeTok())
    assert stats["response_tokens"] == 4 and stats["trained_tokens"] == 2
    assert math.isclose(stats["trained_fraction"], 0.5)
    assert stats["trained_by_kind"] == {"digit": 2, "operator": 0, "other": 0}
    assert stats["response_by_kind"] == {"digit": 2, "operator": 1, "other": 1}
    assert stats["critical_tokens"] == 2 and stats["responses_excluded"] == 0


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = {"schema": "cft.labels/1", "key": "k", "id": "a", "prompt_ids": [1, 2], "response_ids": [3, 4],
        "critical": [1, 0], "eligible": [1, 0]}


@pytest.mark.parametrize(("change", "field", "message"), [
    ({"critical": [1]}, "critical", "1 entries for 2"),
    ({"critical": [0, 1]}, "critical", "critical but not eligible"),
    ({"eligible": [1, 2]}, "eligible", "0 or 1"),
    ({"response_ids": [3, 99]}, "response_ids", "outside the model's vocabulary"),
    ({"prompt_ids": []}, "prompt_ids", "empty prompt"),
    ({"response_ids": "34"}, "response_ids", "not a list"),
    ({"schema": "cft.generations/1"}, "schema", "expected schema"),
])
def test_read_labels_names_line_and_field(tmp_path, change, field, message):
    path = _write(tmp_path / "l.jsonl", [GOOD, {**GOOD, **change}])
    with pytest.raises(InputError, match=message) as err:
        read_labels(str(path), vocab_size=10)
    assert err.value.line == 2 and err.value.field == field


def test_read_labels_good(tmp_path):
    recs = read_labels(str(_write(tmp_path / "l.jsonl", [GOOD])), vocab_size=10)
    assert recs == [LabeledResponse("a", [1, 2], [3, 4], [1, 0], [1, 0])]
