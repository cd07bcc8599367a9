"""Cross-tokenizer labels: critical spans carried onto another tokenizer cover the same characters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cft.identify import critical_spans
from cft.prompts import render_ids
from cft.transfer import transfer_record

TEXT = "At first, Mia has 12 apples. Now she has 12 + 7 = 19 apples. The answer is 19."


def source_record(tok) -> dict:
    ids = tok(TEXT, add_special_tokens=False).input_ids + [tok.eos_token_id]
    critical = [int(any(c.isdigit() or c in "+=" for c in tok.decode([i]))) for i in ids]
    critical[-1] = 0
    return {"key": "k", "id": "p", "question": "q", "gold": "19", "response": TEXT, "response_ids": ids,
            "critical": critical, "critical_spans": critical_spans(tok, ids, critical)}


def covered(spans) -> set[int]:
    return {i for s, e in spans for i in range(s, e)}


def test_transfer_onto_the_same_tokenizer_is_the_identity(testbed_tokenizer):
    src = source_record(testbed_tokenizer)
    out = transfer_record(src, testbed_tokenizer, "chat")
    assert out["response_ids"] == src["response_ids"] and out["critical"] == src["critical"]
    assert covered(out["critical_spans"]) == covered(src["critical_spans"])


@pytest.mark.slow
def test_transfer_to_smollm2_covers_the_same_characters(testbed_tokenizer, smollm2_gguf):
    from cft.models import load_tokenizer

    target = load_tokenizer(str(smollm2_gguf))
    src = source_record(testbed_tokenizer)
    out = transfer_record(src, target, "chat")
    assert target.decode(out["response_ids"], skip_special_tokens=True) == TEXT
    source_chars, target_chars = covered(src["critical_spans"]), covered(out["critical_spans"])
    assert source_chars <= target_chars  # nothing critical is lost
    extra = {TEXT[i] for i in target_chars - source_chars}
    assert extra <= {" "}  # at most the spaces a target token glues to a digit or operator


def test_transfer_testbed_to_smollm2_marks_the_hand_checked_target_tokens(testbed_tokenizer, smollm2_gguf):
    """Source tokens chosen where the two tokenizers cut differently; the expected target tokens are written by hand.

    testbed: 'Z' 'or' 'b' 'l' 'ax' ' b' 'o' 'u' 'g' 'h' 't' ... ' the' 'n' ...  '1' '9' '.'
    SmolLM2: 'Z' 'or' 'bl'    'ax' ' bought'             ... ' then'     ...  '1' '9' '.'
    Critical in the source: 'b' (3-4), 'h' (12-13), 'n' (30-31), '9' (62-63). A target token is critical when it
    overlaps one of them: 'bl' (3-5), ' bought' (7-14), ' then' (26-31), '9' (62-63), and no other.
    """
    from cft.models import load_tokenizer

    text = "Zorblax bought 12 pencils, then sold them all. The answer is 19."
    src_tok, target = testbed_tokenizer, load_tokenizer(str(smollm2_gguf))
    enc = src_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    chosen = {(3, 4), (12, 13), (30, 31), (62, 63)}
    critical = [int(tuple(o) in chosen) for o in enc["offset_mapping"]] + [0]
    assert sum(critical) == 4, "the testbed tokenizer no longer cuts the text as this test expects"
    ids = list(enc["input_ids"]) + [src_tok.eos_token_id]
    src = {"key": "k", "id": "p", "question": "q", "gold": "19", "response": text, "response_ids": ids,
           "critical": critical, "critical_spans": critical_spans(src_tok, ids, critical)}
    assert src["critical_spans"] == [[3, 4], [12, 13], [30, 31], [62, 63]]

    out = transfer_record(src, target, "chat")
    marked = [target.decode([i]) for i, c in zip(out["response_ids"], out["critical"]) if c]
    assert marked == ["bl", " bought", " then", "9"]
    assert out["critical_spans"] == [[3, 5], [7, 14], [26, 31], [62, 63]]
    assert out["response_ids"][-1] == target.eos_token_id and out["critical"][-1] == 0
    assert out["prompt_ids"] == render_ids(target, "q", "chat")


_PIECES = ["Mia", " has", " 12", " apples", ".", " 3", " + ", "7", " = ", "19", " The", " answer", " is", " Zorblax",
           " bought", " then", "\n", " x", "^2", " (", ")", " 0.5", " ", "!"]


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    from cft.models import load_tokenizer

    return load_tokenizer(str(smollm2_gguf))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=20).map("".join), st.integers(min_value=0))
def test_transfer_span_coverage_property(testbed_tokenizer, smollm2_tokenizer, text, seed):
    """For any text and any choice of critical source tokens: every critical character stays covered, and every
    target token marked critical overlaps a critical source character (nothing is invented)."""
    import random

    enc = testbed_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    rng = random.Random(seed)
    critical = [rng.randint(0, 1) for _ in enc["input_ids"]] + [0]
    ids = list(enc["input_ids"]) + [testbed_tokenizer.eos_token_id]
    src = {"key": "k", "id": "p", "question": "q", "gold": "1", "response": text, "response_ids": ids,
           "critical": critical, "critical_spans": critical_spans(testbed_tokenizer, ids, critical)}
    out = transfer_record(src, smollm2_tokenizer, "chat")
    source_chars = covered(src["critical_spans"])
    assert source_chars <= covered(out["critical_spans"])
    for s, e in out["critical_spans"]:
        assert source_chars & set(range(s, e)), (text, s, e)
