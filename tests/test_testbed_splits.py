"""The testbed's ``val`` split: disjoint from train, test, test_ood (and valid) by construction, stable
ids, and the same distribution as ``test``, so that choosing on ``val`` never touches ``test``."""

from __future__ import annotations

import random

import pytest

from cft.testbed.problems import SPLITS, VAL_GUARD, generate_split, make_problem, val_exclusions


def numbers(p) -> tuple[int, ...]:
    """Every number the question states (amounts and operands), in order."""
    return tuple(int(w.strip(".,")) for w in p.question.split() if w.strip(".,").isdigit())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_val_shares_no_question_or_problem_with_the_sizes_studies_use(seed):
    """Questions, identities and ids of 500 val problems against 4500 train and 500 of every other split."""
    val = generate_split("val", 500, seed)
    sizes = {"train": 4500, "valid": 500, "test": 500, "test_ood": 500}
    for split, n in sizes.items():
        other = generate_split(split, n, seed)
        assert not {p.question for p in val} & {p.question for p in other}, split
        assert not {p.identity for p in val} & {p.identity for p in other}, split
        assert not {p.id for p in val} & {p.id for p in other}, split


def test_val_is_disjoint_from_the_whole_guard():
    """The guarantee as stated: 2000 val problems against every guarded prefix (seed 0)."""
    val = generate_split("val", 2000, 0)
    for split, n in VAL_GUARD.items():
        other = generate_split(split, n, 0)
        assert not {p.identity for p in val} & {p.identity for p in other}, split
        assert not {p.question for p in val} & {p.question for p in other}, split


def test_the_skips_are_needed_and_taken():
    """val's raw stream does repeat guarded problems; generate_split leaves exactly those out."""
    offset, lo, hi, max_value = SPLITS["val"]
    rng = random.Random(2 * 7_919 + offset)
    raw = [make_problem(rng, "raw", lo, hi, max_value) for _ in range(1000)]
    repeats = [p for p in raw if p.identity in val_exclusions(2)]
    assert repeats, "no repeat in the raw stream: the test no longer exercises the exclusion"
    kept = [p.identity for p in raw if p.identity not in val_exclusions(2)]
    assert [p.identity for p in generate_split("val", len(kept), 2)] == kept


def test_val_ids_are_stable_prefixes():
    short, long = generate_split("val", 50, 1), generate_split("val", 300, 1)
    assert long[:50] == short
    assert [p.id for p in long] == [f"testbed-val-s1-{i}" for i in range(300)]
    assert [p.question for p in generate_split("val", 50, 0)] != [p.question for p in short]


def z_score(a: list[float], b: list[float]) -> float:
    """The difference of two sample means in standard errors."""
    def mean_var(x):
        m = sum(x) / len(x)
        return m, sum((v - m) ** 2 for v in x) / (len(x) - 1)
    (ma, va), (mb, vb) = mean_var(a), mean_var(b)
    return (ma - mb) / ((va / len(a) + vb / len(b)) ** 0.5)


def test_val_has_tests_distribution():
    """Same parameters as test, and step counts, answers and numbers equal to test's within sampling noise
    (seeded, so deterministic; 4 standard errors, where a shifted split such as test_ood lies far outside)."""
    assert SPLITS["val"][1:] == SPLITS["test"][1:]
    val, test, ood = (generate_split(s, 2000, 0) for s in ("val", "test", "test_ood"))
    stats = {"two steps": lambda p: float(p.steps == 2), "answer": lambda p: float(p.answer),
             "largest number": lambda p: float(max(numbers(p)))}
    for name, stat in stats.items():
        assert abs(z_score([stat(p) for p in val], [stat(p) for p in test])) < 4, name
    assert max(abs(z_score([stat(p) for p in ood], [stat(p) for p in test])) for stat in stats.values()) > 4
    assert max(max(numbers(p)) for p in val) <= SPLITS["val"][3]


def test_val_loads_wherever_test_does():
    from cft.data import load_problems
    from cft.options import data_spec

    assert data_spec("testbed:val") == "testbed:val"
    problems = load_problems("testbed:val", seed=1, limit=20)
    assert [p.question for p in problems] == [p.question for p in generate_split("val", 20, 1)]
    with pytest.raises(ValueError, match="val"):
        generate_split("vall", 1)
