"""The built-in ``arith`` task: seeded and stable, exact answers, in-distribution splits disjoint by
construction, and an OOD split with what train never has."""

from __future__ import annotations

import re

import pytest

from cft import arith
from cft.arith import PHRASINGS, SHAPES, STORIES, bucket, evaluate, expression, generate_split
from cft.data import is_generated, load_problems

IN_SPLITS = ("train", "val", "test")


def test_deterministic_stable_prefixes_and_ids():
    short, long = generate_split("test", 40, 3), generate_split("test", 200, 3)
    assert long[:40] == short and generate_split("test", 200, 3) == long
    assert [p.id for p in long] == [f"arith-test-s3-{i}" for i in range(200)]
    assert [p.question for p in generate_split("test", 40, 4)] != [p.question for p in short]
    pinned = generate_split("test", 300, 0)  # the figures cft/arith.py's docstring quotes
    assert len({p.canonical for p in pinned}) == 127 and len({p.question for p in pinned}) == 239


@pytest.mark.parametrize("seed", [0, 1])
def test_in_distribution_splits_are_disjoint(seed):
    """No canonical problem (numbers and operations, whatever the phrasing) is in two splits, nor a question."""
    drawn = {s: generate_split(s, 3000 if s == "train" else 500, seed) for s in IN_SPLITS}
    for a in IN_SPLITS:
        assert {bucket(p.canonical) for p in drawn[a]} <= set(arith.SPLITS[a][1])
        for b in IN_SPLITS:
            if a < b:
                assert not {p.canonical for p in drawn[a]} & {p.canonical for p in drawn[b]}, (a, b)
                assert not {p.question for p in drawn[a]} & {p.question for p in drawn[b]}, (a, b)
    # across seeds too: the partition does not depend on the seed
    other = generate_split("train", 3000, seed + 1)
    assert not {p.canonical for p in other} & {p.canonical for p in drawn["test"]}


def test_the_partition_is_exercised():
    """The draws of the in-distribution shape do land in every split's buckets (the filter is not vacuous)."""
    import random

    rng = random.Random(0)
    hit = {bucket(arith.draw_canonical(rng, SHAPES["in"])) for _ in range(2000)}
    assert hit == set(range(arith.BUCKETS))


def test_answers_are_exact_non_negative_integers_and_match_the_question():
    for split in (*IN_SPLITS, "test_ood"):
        for p in generate_split(split, 400, 0):
            assert p.answer == str(evaluate(p.canonical)) and int(p.answer) >= 0
            value = p.canonical[0]
            for op, b in p.canonical[1]:  # no intermediate value is negative either
                value = evaluate((value, [(op, b)]))
                assert value >= 0
            if p.phrasing in ("expression", "compute"):
                text = re.search(r"[\d(][\d()+\-* ]*\d", p.question).group()
                assert eval(text) == int(p.answer), p.question  # noqa: S307 - digits, operators, parentheses
            numbers = [int(n) for n in re.findall(r"\d+", p.question)]
            operands = [p.canonical[0], *(b for _, b in p.canonical[1])]
            assert sorted(numbers) == sorted(operands), p.question


def test_expression_follows_left_to_right_evaluation():
    assert expression((3, (("+", 4), ("*", 5)))) == "(3 + 4) * 5"
    assert expression((3, (("*", 4), ("+", 5)))) == "3 * 4 + 5"
    assert expression((9, (("-", 4), ("-", 2)))) == "9 - 4 - 2"
    assert expression((2, (("+", 1), ("*", 3), ("*", 2)))) == "(2 + 1) * 3 * 2"


def test_every_phrasing_occurs_in_every_split():
    for split in (*IN_SPLITS, "test_ood"):
        assert {p.phrasing for p in generate_split(split, 200, 0)} == set(PHRASINGS), split


def test_ood_has_what_train_never_has():
    train, ood = generate_split("train", 3000, 0), generate_split("test_ood", 500, 0)
    inside = SHAPES["in"]
    assert {len(p.canonical[1]) for p in train} == {1, 2} and {len(p.canonical[1]) for p in ood} == {3}
    for p in train:  # train's operands stay in its ranges
        assert inside["start"][0] <= p.canonical[0] <= inside["start"][1]
        for op, b in p.canonical[1]:
            lo, hi = inside[{"+": "add", "-": "sub", "*": "mul"}[op]]
            assert lo <= b <= hi
    for p in ood:  # every OOD operand is above train's range for its operation
        assert p.canonical[0] > inside["start"][1]
        for op, b in p.canonical[1]:
            assert b > inside[{"+": "add", "-": "sub", "*": "mul"}[op]][1]
    # story templates: no OOD story sentence piece occurs in a train story, and the reverse
    train_stories = [p.question for p in train if p.phrasing == "story"]
    ood_stories = [p.question for p in ood if p.phrasing == "story"]
    assert train_stories and ood_stories
    fixed = lambda t: max(re.split(r"\{\w+\}", t), key=len).strip()  # noqa: E731 - a template's longest fixed text
    for key in ("open", "open*", "+", "-", "*", "ask"):
        for template in STORIES["test_ood"][key]:
            assert not any(fixed(template) in q for q in train_stories), template
        for template in STORIES["train"][key]:
            assert not any(fixed(template) in q for q in ood_stories), template
    assert not {p.question for p in train} & {p.question for p in ood}


def test_specs_resolve_in_the_data_loader():
    assert is_generated("arith:test") and is_generated("testbed:val") and not is_generated("gsm8k:test")
    problems = load_problems("arith:test_ood", seed=2, limit=5)
    assert [p.id for p in problems] == [f"arith-test_ood-s2-{i}" for i in range(5)]
    assert [(p.question, p.answer) for p in problems] == [(p.question, p.answer)
                                                           for p in generate_split("test_ood", 5, 2)]
    with pytest.raises(ValueError, match="unknown arith split 'dev'"):
        load_problems("arith:dev", limit=1)


def test_an_unknown_split_is_one_line_at_the_command_line(tmp_path, capsys):
    from cft.cli import main

    for spec, message in (("arith:dev", "unknown arith split 'dev'; choose from train, val, test, test_ood"),
                          ("testbed:dev", "unknown testbed split 'dev'")):
        assert main(["generate", "--model", "testbed", "--data", spec, "--out", str(tmp_path / "g.jsonl")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
