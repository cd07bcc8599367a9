"""Seeded arithmetic in natural language at a small real model's level: the built-in ``arith`` task.

Sized for SmolLM2-135M-Instruct, whose greedy accuracy on ``arith:test`` is aimed at 30-60% (measured 0.33 and
0.29 on 100 problems of two problem seeds; the calibration runs are in docs/RESULTS.md; word-problem
benchmarks are out of a 135M model's reach). A problem is a start value and one or two operations (+, -, *)
applied left to right, stated as a bare expression, a "Compute ..." instruction, in words, or a one-sentence
story.

Splits: ``train``, ``val`` (choosing settings) and ``test`` share one distribution and are disjoint by
construction: a problem belongs to the split its canonical form (the numbers and operations, whatever the
phrasing) hashes to, for every seed. ``test_ood`` has what ``train`` never has: three operations (four
operands), operands above ``train``'s ranges, and story templates of its own.

Problems are drawn independently, as from a distribution. The in-distribution pool of one-operation problems
is small (253 forms: 149 in ``train``'s buckets, 65 in ``test``'s), so a few hundred problems of one split
repeat some arithmetic in other words and now and then a whole question (300 ``test`` problems of seed 0: 127
distinct canonical forms, 239 distinct questions); a repeat is a second draw, so an accuracy is still an
unbiased estimate for the split's distribution, with fewer independent problems behind it than its n.

Answers are exact non-negative integers: a subtraction never takes away more than the running value, so no
intermediate or final value is negative (a sign is one more thing a small model can get wrong, and the
stories - giving away what one has - would not make sense with it).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

NAMES = ["Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Max", "Zoe", "Leo", "Emma", "Jack", "Nora"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "coins", "books", "cards", "shells"]
OOD_NAMES = ["Omar", "Priya", "Hugo", "Ines", "Kofi", "Yuki"]
OOD_ITEMS = ["bottles", "tickets", "stamps", "bricks", "candles", "ribbons"]

SYMBOL = {"+": "+", "-": "-", "*": "*"}
WORD = {"+": "plus", "-": "minus", "*": "times"}
# Instructions in words: the start value, then each operation in order.
STEP_WORDS = {"+": "add {b}", "-": "subtract {b}", "*": "multiply by {b}"}
COMPUTE = ["Compute {e}.", "What is {e}?", "Calculate {e}."]

# Story templates: the opening (the start value), each operation as a clause, and the question.
# ``*`` as the first operation opens with groups ("{a} bags with {b} ... in each"); later it scales the amount.
STORIES = {
    "train": {
        "open": ["{name} has {a} {item}", "{name} starts with {a} {item}"],
        "open*": ["{name} has {a} bags with {b} {item} in each", "{name} buys {a} packs of {b} {item}"],
        "+": ["buys {b} more", "finds {b} more", "gets {b} more from {other}"],
        "-": ["gives {b} to {other}", "loses {b}", "sells {b}"],
        "*": ["then ends up with {b} times as many"],
        "ask": ["How many {item} does {name} have now?", "How many {item} does {name} have in the end?"],
    },
    "test_ood": {
        "open": ["A box in {name}'s room holds {a} {item}", "There are {a} {item} on {name}'s shelf"],
        "open*": ["{name} stacks {a} crates of {b} {item}"],
        "+": ["a friend drops off {b} more", "{b} more arrive by mail"],
        "-": ["{b} of them break", "{name} uses up {b} of them"],
        "*": ["then the pile grows to {b} times its size"],
        "ask": ["How many {item} are there at the end?", "What is the final number of {item}?"],
    },
}

# The in-distribution shape (train, val, test) and the out-of-distribution one: operation counts (drawn
# uniformly from the tuple: in distribution, three quarters of the problems have one operation), the start
# value's range, the ranges of + , - and * operands (a - operand is also at most the running value), and the
# most any value may reach.  test_ood's ranges start where train's end.
SHAPES = {
    "in": {"ops": (1, 1, 1, 2), "start": (2, 12), "add": (1, 12), "sub": (1, 12), "mul": (2, 5), "max": 60},
    "ood": {"ops": (3,), "start": (31, 99), "add": (31, 99), "sub": (31, 99), "mul": (6, 9), "max": 2000},
}
# Split -> (shape, hash buckets of the canonical form, out of BUCKETS); the in-distribution splits partition them.
BUCKETS = 20
SPLITS = {
    "train": ("in", range(0, 12)),
    "val": ("in", range(12, 15)),
    "test": ("in", range(15, 20)),
    "test_ood": ("ood", range(0, BUCKETS)),
}
PHRASINGS = ("expression", "compute", "words", "story")


@dataclass(frozen=True)
class Problem:
    """One arith problem; ``canonical`` is (start, ((op, operand), ...)), what the question states whatever
    its phrasing; two problems with one canonical form are one problem."""

    id: str
    question: str
    answer: str
    canonical: tuple
    phrasing: str


def evaluate(canonical: tuple) -> int:
    value, ops = canonical
    for op, b in ops:
        value = {"+": value + b, "-": value - b, "*": value * b}[op]
    return value


def bucket(canonical: tuple) -> int:
    """The hash bucket that decides the split of an in-distribution problem (stable across processes)."""
    return int(hashlib.sha256(repr(canonical).encode()).hexdigest()[:8], 16) % BUCKETS


def draw_canonical(rng: random.Random, shape: dict) -> tuple:
    """Start value and operations; every value stays in [0, shape['max']]."""
    value = rng.randint(*shape["start"])
    start, ops = value, []
    for _ in range(rng.choice(shape["ops"])):
        choices = [op for op, ok in (("+", value + shape["add"][0] <= shape["max"]), ("-", value >= shape["sub"][0]),
                                     ("*", 2 <= value <= shape["max"] // shape["mul"][0])) if ok]
        op = rng.choice(choices)
        if op == "+":
            b = rng.randint(shape["add"][0], min(shape["add"][1], shape["max"] - value))
        elif op == "-":
            b = rng.randint(shape["sub"][0], min(shape["sub"][1], value))
        else:
            b = rng.randint(shape["mul"][0], min(shape["mul"][1], shape["max"] // value))
        ops.append((op, b))
        value = evaluate((value, [(op, b)]))
    return start, tuple(ops)


def expression(canonical: tuple) -> str:
    """Left-to-right evaluation as an expression: a product after a sum or difference gets parentheses."""
    text, additive = str(canonical[0]), False
    for op, b in canonical[1]:
        if op == "*" and additive:
            text = f"({text})"
        text, additive = f"{text} {SYMBOL[op]} {b}", op != "*"
    return text


def story(rng: random.Random, canonical: tuple, templates: dict, names: list[str], items: list[str]) -> str:
    name, other = rng.sample(names, 2)
    item = rng.choice(items)
    start, ops = canonical
    fill = {"name": name, "other": other, "item": item}
    if ops[0][0] == "*" and start <= 9:  # groups: "3 bags with 4 apples in each"
        opening, rest = rng.choice(templates["open*"]).format(a=start, b=ops[0][1], **fill), ops[1:]
    else:
        opening, rest = rng.choice(templates["open"]).format(a=start, **fill), ops
    clauses = [rng.choice(templates[op]).format(b=b, **fill) for op, b in rest]
    if not clauses:
        body = opening
    elif len(clauses) == 1:
        body = f"{opening} and {clauses[0]}"
    else:
        body = ", ".join([opening, *clauses[:-1]]) + f" and {clauses[-1]}"
    return f"{body}. " + rng.choice(templates["ask"]).format(**fill)


def render(rng: random.Random, canonical: tuple, phrasing: str, ood: bool) -> str:
    if phrasing == "expression":
        return f"{expression(canonical)} = ?"
    if phrasing == "compute":
        return rng.choice(COMPUTE).format(e=expression(canonical))
    if phrasing == "words":
        if len(canonical[1]) == 1:
            op, b = canonical[1][0]
            return f"What is {canonical[0]} {WORD[op]} {b}?"
        steps = [STEP_WORDS[op].format(b=b) for op, b in canonical[1]]
        return f"Start with {canonical[0]}, " + ", then ".join(steps) + ". What number do you get?"
    if ood:
        return story(rng, canonical, STORIES["test_ood"], OOD_NAMES, OOD_ITEMS)
    return story(rng, canonical, STORIES["train"], NAMES, ITEMS)


def generate_split(split: str, n: int, seed: int = 0) -> list[Problem]:
    """The first ``n`` problems of a split for a seed; a prefix of a longer request (stable ids)."""
    if split not in SPLITS:
        raise ValueError(f"unknown arith split {split!r}; choose from {', '.join(SPLITS)}")
    shape_name, buckets = SPLITS[split]
    rng = random.Random(f"arith-{split}-{seed}")
    out: list[Problem] = []
    while len(out) < n:
        canonical = draw_canonical(rng, SHAPES[shape_name])
        if bucket(canonical) not in buckets:
            continue
        phrasing = rng.choice(PHRASINGS)
        question = render(rng, canonical, phrasing, ood=shape_name == "ood")
        out.append(Problem(f"arith-{split}-s{seed}-{len(out)}", question, str(evaluate(canonical)), canonical,
                           phrasing))
    return out
