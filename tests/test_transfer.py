"""Cross-tokenizer labels: critical spans carried onto another tokenizer cover the same characters."""

from __future__ import annotations

import pytest

from cft.identify import critical_spans
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
