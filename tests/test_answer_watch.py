"""Incremental answer detection gives ``verify.answer_complete``'s verdict on every prefix."""

from __future__ import annotations

import random

import pytest

from cft.answer_watch import AnswerText, AnswerWatch, incremental_decoding
from cft.verify import answer_complete

# Pieces that exercise every rule and its edge cases: escaped and unbalanced braces, a backslash
# before a brace, blanks between \boxed and its brace, bare \boxed, "answer is" in any case, periods
# before whitespace or not, newlines, "####" chains, answers that parse and ones that do not.
PIECES = ["\\boxed", "\\fbox", "\\boxed{", "{", "}", "\\{", "\\}", "\\", " ", "\t", "\n", "answer is", "Answer IS",
          "the answer is ", ".", ". ", ".\n", "5", "12", "x", "x=3", "####", "#### ", "$", ":", "not obvious",
          "\\frac{1}{2}", "abc", "=", "ſ", "e"]

CASES = [
    "So \\boxed{5}", "\\boxed{5", "\\boxed {5}", "\\boxed\t{x}", "\\boxed 5", "\\boxed{\\{1,2\\}}", "\\boxed{a\\}",
    "\\boxed{5} and \\boxed{not obvious}", "\\boxed{not obvious} then \\boxed{7}", "\\boxed{\\boxed{3}}",
    "\\boxed{1}\\boxed{", "\\boxed{1} \\boxed x \\boxed{2", "\\fbox{4}", "\\boxed{}", "\\boxed{\\\\}",
    "The answer is 5. ", "The answer is not obvious. Then", "the answer is 5.\nMore", "The answer is 5.",
    "answer is x answer is 7. ", "The answer is: $12$. ", "answer is 3\nanswer is 4. ", "ANSWER IS 9.\t",
    "#### 5\n", "#### \n#### 6\n", "#### x y z\n#### 7\n", "####5", "text #### 8\nafter", "##### 3\n",
]


def _check_prefixes(text: str, rng: random.Random) -> None:
    """Extend by random chunks; after each, the verdict equals the whole-text rule on the prefix."""
    watch, i = AnswerText(), 0
    while i < len(text):
        j = min(len(text), i + rng.choice([1, 1, 1, 2, 3, 7]))
        watch.extend(text[i:j])
        i = j
        assert watch.complete() == answer_complete(text[:j]), repr(text[:j])


@pytest.mark.parametrize("text", CASES)
def test_cases_agree_on_every_prefix(text):
    for seed in range(3):
        _check_prefixes(text, random.Random(seed))
        _check_prefixes("Work: 1 + 1 = 2. " + text + " tail. \\boxed{9} ", random.Random(seed))


def test_random_texts_agree_on_every_prefix():
    rng = random.Random(0)
    verdicts = set()
    for _ in range(1500):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 30)))
        _check_prefixes(text, rng)
        verdicts.add(answer_complete(text))
    assert verdicts == {True, False}


def _check_ids(tok, ids: list[int], rng: random.Random, every: bool) -> int:
    """Feed a growing list; check at every position (or at random ones) against decoding the whole."""
    watch, grown, checks = AnswerWatch(tok), [], 0
    for token in ids:
        grown.append(token)
        if every or rng.random() < 0.3:
            expected = answer_complete(tok.decode(grown, skip_special_tokens=True))
            assert watch.complete(grown) == expected, (grown, tok.decode(grown))
            checks += expected
    return checks


def test_token_ids_agree_with_decoding_the_whole_response(testbed_tokenizer):
    tok = testbed_tokenizer
    assert incremental_decoding(tok)
    rng = random.Random(1)
    text_ids = [tok.encode(t, add_special_tokens=False) for t in CASES]
    found = 0
    for _ in range(300):  # random ids: cut characters (lone UTF-8 bytes), special tokens, answer phrases
        ids = []
        for _ in range(rng.randint(1, 40)):
            ids += rng.choice(text_ids) if rng.random() < 0.2 else [rng.randrange(len(tok))]
        found += _check_ids(tok, ids, rng, every=rng.random() < 0.5)
    # multi-byte characters split over tokens, completed later
    euro = tok.encode("€ 5 \\boxed{7€}. ünïcode ", add_special_tokens=False)
    byte_ids = [tok.convert_tokens_to_ids(c) for piece in tok.convert_ids_to_tokens(euro) for c in piece]  # 1 byte each
    assert _check_ids(tok, byte_ids, rng, every=True) > 0
    assert found > 0


def test_other_tokenizers_get_no_watch(testbed_tokenizer):
    from tokenizers import decoders

    tok = testbed_tokenizer
    saved = tok.backend_tokenizer.decoder
    try:
        tok.backend_tokenizer.decoder = decoders.Metaspace()
        assert not incremental_decoding(tok)
    finally:
        tok.backend_tokenizer.decoder = saved
    assert incremental_decoding(tok)
