"""Values a stub or a plausible-looking bug would get wrong, each computed by hand on a model built by hand.

The bigram model (tests/test_identify.py) gives every state the same three successor logits (10, 9, 8) and
0 elsewhere, so its next-token distributions are known in closed form (up to RMSNorm's epsilon, a factor
1/sqrt(1 + eps * hidden) on every logit, included below).
"""

from __future__ import annotations

import math

import pytest
import torch

from cft.artifacts import load_records
from cft.decoding.api import DecodeConfig, decode
from cft.identify import IdentifyConfig, identify
from cft.prompts import render_ids
from tests.conftest import generation, write_jsonl
from tests.test_identify import EXPECTED_TOKENS, _tok, bigram_model


def closed_form(model, scores: tuple[float, ...], temperature: float = 1.0) -> tuple[float, float]:
    """(top-1 probability, entropy) of the bigram model's softmax: ``scores``, and 0 for the rest of the vocabulary."""
    cfg = model.config
    norm = 1 / math.sqrt(1 + cfg.rms_norm_eps * cfg.hidden_size)
    logits = [s * norm / temperature for s in scores] + [0.0] * (cfg.vocab_size - len(scores))
    z = math.fsum(math.exp(x) for x in logits)
    probs = [math.exp(x) / z for x in logits]
    return probs[0], -math.fsum(p * math.log(p) for p in probs)


@pytest.fixture(scope="module")
def bigram(testbed_tokenizer):
    return bigram_model(testbed_tokenizer), testbed_tokenizer


def test_sampling_entropy_equals_the_closed_form(bigram):
    """Every step samples from the same distribution (scores 10, 9, 8 at temperature 0.5), so the mean per-token
    entropy of each response is that distribution's entropy, whatever tokens were drawn."""
    model, tok = bigram
    _, want = closed_form(model, (10.0, 9.0, 8.0), temperature=0.5)
    outs = decode(model, tok, [render_ids(tok, "q")], DecodeConfig(max_new_tokens=12, temperature=0.5, n=4,
                                                                   stop_at_answer=False))[0]
    assert len(outs) == 4
    for out in outs:
        assert out.entropy == pytest.approx(want, rel=1e-5), [tok.decode([i]) for i in out.ids]


def test_skip_confident_threshold_splits_positions(tmp_path, testbed_tokenizer):
    """State " The" is made unsure (its successor logits scaled by 0.4, same ranks); with a threshold between the
    two top-1 probabilities only the position it predicts (" answer") is tested, and it stays critical."""
    tok = testbed_tokenizer
    model = bigram_model(tok)
    the = tok.convert_tokens_to_ids(_tok(tok, " The"))
    with torch.no_grad():
        model.lm_head.weight[:, the] *= 0.4
    sure, _ = closed_form(model, (10.0, 9.0, 8.0))
    unsure, _ = closed_form(model, (4.0, 3.6, 3.2))
    threshold = (sure + unsure) / 2
    assert unsure < threshold < sure
    response = [tok.convert_tokens_to_ids(_tok(tok, t)) for t in EXPECTED_TOKENS]
    gen = write_jsonl(tmp_path / "gen.jsonl", [generation(tok, "q", response, "7")])
    for engine in ("reference", "fast"):
        out = tmp_path / f"{engine}.jsonl"
        identify(IdentifyConfig(model="hand-built", input=str(gen), out=str(out), engine=engine, max_new_tokens=32,
                                skip_confident=threshold), model=model, tok=tok)
        (rec,) = load_records(out, "labels")
        assert rec["eligible"] == [0, 1, 0, 0, 0, 0, 0], engine
        assert rec["critical"] == [0, 1, 0, 0, 0, 0, 0], engine
