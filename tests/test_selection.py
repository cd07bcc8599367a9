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
    format_statistics,
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


# --- cft_mix: CFT plus a lambda-weighted SFT loss on the other tokens ---------------------------------------

MIX_RECS = [REC, LabeledResponse("q2", [1], [7, 4, 6], critical=[0, 0, 0], eligible=[1, 1, 0]),
            LabeledResponse("q3", [2, 1], [5, 7, 3, 6], critical=[0, 1, 1, 0], eligible=[1, 1, 1, 0])]


@pytest.mark.parametrize("norm", ["step", "sequence"])
@pytest.mark.parametrize(("lam", "same_as"), [(0.0, "cft"), (0, "cft"), (1.0, "sft"), (1, "sft")])
def test_cft_mix_ends_are_cft_and_sft_exactly(norm, lam, same_as):
    mix = select("cft_mix", MIX_RECS, FakeTok(), loss_norm=norm, mix_lambda=lam)
    ref = select(same_as, MIX_RECS, FakeTok(), loss_norm=norm)
    assert mix.examples == ref.examples and mix.masks == ref.masks
    for key in ("trained_tokens", "responses_excluded", "trained_by_kind", "trained_weight"):
        assert mix.stats[key] == ref.stats[key], key


def test_cft_mix_weights_and_sequence_normalisation():
    ex = build_example(REC, [1, 1, 1, 1], "step", mix_lambda=0.3)
    assert ex["labels"] == [-100, -100, 3, 4, 5, 6]
    assert ex["weights"] == [0, 0, 1, 0.3, 1, 0.3]
    seq = build_example(REC, [1, 1, 1, 1], "sequence", mix_lambda=0.3)["weights"][2:]
    assert seq == pytest.approx([1 / 2.6, 0.3 / 2.6, 1 / 2.6, 0.3 / 2.6]) and math.isclose(sum(seq), 1.0)
    sel = select("cft_mix", MIX_RECS, FakeTok(), mix_lambda=0.3)
    assert sel.masks == [[1, 1, 1, 1], [1, 1, 1], [1, 1, 1, 1]]
    assert [e["weights"] for e in sel.examples] == [[0, 0, 1, 0.3, 1, 0.3], [0, 0.3, 0.3, 0.3],
                                                   [0, 0, 0.3, 1, 1, 0.3]]
    assert [w for e in sel.examples for w in e["weights"]].count(1) == 4  # the critical tokens alone weigh 1


def test_cft_mix_statistics():
    stats = select("cft_mix", MIX_RECS, FakeTok(), mix_lambda=0.25).stats
    assert stats["mix_lambda"] == 0.25 and stats["trained_tokens"] == stats["response_tokens"] == 11
    assert stats["critical_tokens"] == 4 and stats["responses_excluded"] == 0
    assert math.isclose(stats["trained_weight"], 4 + 0.25 * 7)  # N_crit + lambda * N_other: the step normaliser
    assert math.isclose(stats["critical_weight_share"], 4 / 5.75)
    assert "0.25 on the others; summed weight 5.8, 69.6% of it on critical tokens" in format_statistics(stats)
    cft = select("cft", MIX_RECS, FakeTok()).stats
    assert cft["mix_lambda"] is None and cft["critical_weight_share"] == 1.0
    assert "weights:" not in format_statistics(cft)


@pytest.mark.parametrize(("lam", "message"), [(None, "needs mix_lambda"), (-0.1, r"in \[0, 1\]"),
                                               (1.5, r"in \[0, 1\]"), (float("nan"), r"in \[0, 1\]"),
                                               (True, r"in \[0, 1\]")])
def test_cft_mix_lambda_is_checked(lam, message):
    with pytest.raises(ValueError, match=message):
        select("cft_mix", [REC], FakeTok(), mix_lambda=lam)


def test_mix_lambda_is_ignored_by_other_methods():
    assert select("cft", MIX_RECS, FakeTok(), mix_lambda=0.5).examples == select("cft", MIX_RECS, FakeTok()).examples


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


# --- attn: attention received from the final-answer statement ------------------------------------------------


class AnswerTok(FakeTok):
    texts = {**FakeTok.texts, 8: " answer", 9: " is", 10: ".", 11: " \\boxed{", 12: "}", 13: "####"}


def _tiny_llama(layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize(("response", "start"), [
    ([3, 8, 9, 3, 10, 6], 1),  # " answer is 1." + EOS: from the token holding "answer"
    ([8, 9, 3, 11, 5, 12, 6], 3),  # the last marker counts: \boxed after "answer is"
    ([3, 4, 13, 5, 6], 2),  # ####
    ([3, 4] * 10, 4),  # no marker: the last ANSWER_TAIL (16) tokens
    ([3, 4, 6], 0),  # no marker, shorter than the tail: all of it
])
def test_answer_start(response, start):
    from cft.selection import answer_start

    rec = LabeledResponse("a", [1], response, [0] * len(response), [1] * len(response))
    assert answer_start(rec, AnswerTok(), {}) == start


def test_attn_scores_and_mask_on_a_fixed_attention_pattern(monkeypatch):
    """Every query attends to one fixed key: the scores are counts over the statement's length, known by hand."""
    from transformers.models.llama import modeling_llama

    from cft.selection import attention_scores

    target = {4: 2, 5: 3, 6: 3, 7: 6, 8: 8, 9: 6}  # sequence index of a query -> the key it attends to
    original = modeling_llama.eager_attention_forward

    def fixed(module, query, key, value, attention_mask, **kwargs):
        out, _ = original(module, query, key, value, attention_mask, **kwargs)
        b, h, n, _ = query.shape
        weights = torch.zeros(b, h, n, n)
        for q in range(n):
            weights[:, :, q, target.get(q, q)] = 1.0
        return out, weights

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", fixed)
    # a: prompt [1, 2], statement " answer is 1." + EOS = response tokens 3..7 (sequence 5..9)
    a = LabeledResponse("a", [1, 2], [3, 4, 5, 8, 9, 3, 10, 6], [1, 1, 0, 0, 0, 0, 0, 0], [1] * 7 + [0])
    # b: no marker, so all four response tokens (sequence 2..5) are the statement; padded to 10 in the batch
    b = LabeledResponse("b", [1, 2], [3, 4, 5, 6], [1, 1, 0, 0], [1, 1, 1, 0])
    model = _tiny_llama(layers=2).train()
    scores = attention_scores(model, [a, b], AnswerTok(), batch_size=2)
    # a: key 3 (t=1) from queries 5, 6; key 6 (t=4) from 7 and 9; query 8 attends to itself (not counted);
    # query 4 (t=0's attention giver) is before the statement
    assert scores[0] == pytest.approx([0, 2 / 5, 0, 0, 2 / 5, 0, 0, 0], abs=1e-6)
    assert scores[1] == pytest.approx([1 / 4, 1 / 4, 0, 0], abs=1e-6)  # queries 4 -> t=0 and 5 -> t=1
    masks = select_masks("attn", [a, b], AnswerTok(), model=model, batch_size=1)
    assert masks == [[0, 1, 0, 0, 1, 0, 0, 0], [1, 1, 0, 0]]
    assert model.training and model.config._attn_implementation == "sdpa"  # restored after the pass


def test_attn_scores_match_transformers_attention_outputs():
    """The hooks' reduction equals the same rule computed from ``output_attentions`` (last 4 of 6 layers)."""
    from cft.selection import ATTN_LAYERS, answer_start, attention_scores

    model = _tiny_llama(layers=6, seed=1)
    recs = [LabeledResponse("a", [1, 2, 5], [3, 4, 5, 8, 9, 3, 10, 6], [0] * 8, [1] * 8),
            LabeledResponse("b", [1], [4, 4, 3, 5, 6], [0] * 5, [1] * 5)]
    got = attention_scores(model, recs, AnswerTok(), batch_size=2)
    model.set_attn_implementation("eager")
    for rec, scores in zip(recs, got, strict=True):
        p, t = len(rec.prompt_ids), len(rec.response_ids)
        with torch.no_grad():
            att = model(input_ids=torch.tensor([rec.prompt_ids + rec.response_ids]), output_attentions=True).attentions
        w = torch.stack(att[-ATTN_LAYERS:])[:, 0].mean(dim=(0, 1))  # (query, key), mean over layers and heads
        queries = range(p + answer_start(rec, AnswerTok(), {}), p + t)
        want = [sum(w[q, p + j].item() for q in queries if q > p + j) / len(queries) for j in range(t)]
        assert scores == pytest.approx(want, abs=1e-6)


def test_batches_are_cut_to_the_memory_budget(monkeypatch):
    from cft import selection

    recs = [LabeledResponse(str(i), [1] * p, [3] * r, [0] * r, [1] * r) for i, (p, r) in
            enumerate([(2, 2), (2, 3), (1, 1), (5, 5), (2, 2), (1, 2)])]  # widths 4, 5, 2, 10, 4, 3
    model = _tiny_llama(layers=1)
    sizes = [len(c) for c, _, _ in selection.padded_batches(model, recs, 3)]
    assert sizes == [3, 3]
    sizes = [len(c) for c, _, _ in selection.padded_batches(model, recs, 3, lambda w: w * w, budget=60)]
    assert sizes == [2, 1, 1, 2]  # 3 x 5^2 > 60; 2 x 10^2 > 60 but one row always goes
    full = selection.attention_scores(model, recs, FakeTok(), batch_size=6)
    monkeypatch.setattr(selection, "ATTN_MEMORY", 1)  # one row per batch: the same scores
    one_by_one = selection.attention_scores(model, recs, FakeTok(), batch_size=6)
    assert all(a == pytest.approx(b, abs=1e-6) for a, b in zip(one_by_one, full, strict=True))


def test_attn_needs_the_model():
    with pytest.raises(ValueError, match="attn selection needs the starting model"):
        select_masks("attn", [REC], FakeTok())


def test_cli_train_attn_on_the_testbed(tmp_path, testbed_tokenizer, capsys):
    from cft.cli import main
    from tests.test_train import write_labels

    labels = write_labels(tmp_path / "labels.jsonl", testbed_tokenizer, 4)
    out = tmp_path / "ckpt"
    assert main(["train", "--model", "testbed", "--input", str(labels), "--method", "attn", "--out", str(out),
                 "--max-steps", "2", "--batch-size", "2", "--save-steps", "100"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["tokens"]["method"] == "attn"
    assert summary["tokens"]["trained_tokens"] == summary["tokens"]["critical_tokens"]  # CFT's budget
    assert "method attn: trains" in capsys.readouterr().out
