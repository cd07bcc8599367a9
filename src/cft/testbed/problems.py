"""Seeded generator of multi-step arithmetic word problems: the built-in testbed data.

Every question and every solution step has several paraphrase templates, so that many response
tokens are genuinely replaceable (another word, the same reasoning) while numbers and operators
are not. Solutions end in the fixed format ``The answer is N.``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

NAMES = ["Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Max", "Zoe", "Leo", "Emma", "Jack", "Nora"]
PRONOUNS = {
    "Tom": "he", "Ben": "he", "Sam": "he", "Max": "he", "Leo": "he", "Jack": "he",
    "Anna": "she", "Mia": "she", "Lily": "she", "Zoe": "she", "Emma": "she", "Nora": "she",
}
ITEMS = ["apples", "pencils", "marbles", "stickers", "coins", "books", "cards", "shells"]

Q_START = [
    "{name} has {a} {item}.",
    "{name} starts with {a} {item}.",
    "At first, {name} has {a} {item}.",
]
Q_OPS = {
    "+": ["{Pron} buys {b} more {item}.", "{Pron} finds {b} more {item}.", "{Pron} gets {b} more {item} from {other}."],
    "-": ["{Pron} gives {b} {item} to {other}.", "{Pron} loses {b} {item}.", "{Pron} sells {b} {item}."],
    "*": ["Then the number of {item} {pron} has becomes {b} times as large."],
}
Q_ASK = [
    "How many {item} does {name} have now?",
    "How many {item} does {name} have in the end?",
    "How many {item} are left with {name}?",
]
S_START = [
    "{name} starts with {a} {item}.",
    "At first, {name} has {a} {item}.",
    "In the beginning {name} has {a} {item}.",
]
S_OPS = {
    "+": [
        "Then {pron} gets {b} more, so {pron} has {x} + {b} = {y} {item}.",
        "After that {pron} has {x} + {b} = {y} {item}.",
        "Adding {b} gives {x} + {b} = {y} {item}.",
        "Now {pron} has {x} + {b} = {y} {item}.",
    ],
    "-": [
        "Then {pron} gives away {b}, so {pron} has {x} - {b} = {y} {item}.",
        "After that {pron} has {x} - {b} = {y} {item}.",
        "Taking away {b} gives {x} - {b} = {y} {item}.",
        "Now {pron} has {x} - {b} = {y} {item}.",
    ],
    "*": [
        "Then the amount becomes {b} times as large, so {pron} has {x} * {b} = {y} {item}.",
        "After that {pron} has {x} * {b} = {y} {item}.",
        "Multiplying by {b} gives {x} * {b} = {y} {item}.",
        "Now {pron} has {x} * {b} = {y} {item}.",
    ],
}
S_FINAL = "The answer is {y}."

# Split name -> (seed offset, min steps, max steps, max value).  `test` shares `train`'s
# distribution; `test_ood` has more steps and larger numbers.  `valid` is the held-out split the
# shipped testbed model's pretraining stop rule was scored on; `val` is the validation split for
# studies (choosing a checkpoint or a hyperparameter), in `test`'s distribution.  Every offset has a
# distinct residue modulo the seed multiplier (7_919), so no (split, seed) draws another's stream.
SPLITS = {
    "train": (0, 2, 3, 60),
    "valid": (1_000_003, 2, 3, 60),
    "test": (2_000_003, 2, 3, 60),
    "test_ood": (3_000_017, 3, 4, 99),
    "val": (4_000_037, 2, 3, 60),
}
# `val` is disjoint from the other splits by construction: its stream skips every draw whose
# identity (what the question states, up to paraphrase) occurs among the first VAL_GUARD[split]
# problems of another split for the same seed.  Exact repeats are rare (about 1% of draws against
# these guards), so the skips leave `test`'s distribution in place; equal arithmetic under another
# name or item is not a repeat: `test` shares about 10% of its number sequences with 4000 `train`
# problems, and `val` keeps that rate so that it stands in for `test`.
VAL_GUARD = {"train": 20_000, "valid": 5_000, "test": 5_000, "test_ood": 5_000}

# The tokenizer's training corpus: (min steps, max steps, max value) per draw; fixed so the vocabulary
# never moves when a split changes.
CORPUS_SHAPES = [(2, 3, 60), (2, 3, 60), (2, 3, 60), (4, 5, 99)]


@dataclass(frozen=True)
class Problem:
    """One testbed problem; ``solution`` is a reference chain of thought ending in the answer.

    ``identity`` is what the question states, whatever its paraphrase templates: name, item, the
    starting amount and each (operation, operand); two problems with one identity are one problem.
    """

    id: str
    question: str
    answer: str
    solution: str
    steps: int
    identity: tuple


def _step(rng: random.Random, x: int, max_value: int) -> tuple[str, int, int]:
    ops = [op for op, ok in (("+", x < max_value), ("-", x > 1), ("*", 2 * x <= max_value)) if ok]
    op = rng.choice(ops)
    if op == "+":
        b = rng.randint(1, min(9, max_value - x))
    elif op == "-":
        b = rng.randint(1, min(9, x - 1))
    else:
        b = rng.choice([k for k in (2, 3) if x * k <= max_value])
    return op, b, {"+": x + b, "-": x - b, "*": x * b}[op]


def make_problem(rng: random.Random, pid: str, min_steps: int, max_steps: int, max_value: int) -> Problem:
    """Draw one problem; every intermediate value stays in [1, max_value]."""
    name = rng.choice(NAMES)
    other = rng.choice([n for n in NAMES if n != name])
    item = rng.choice(ITEMS)
    pron = PRONOUNS[name]
    a = rng.randint(2, min(20, max_value))
    n_steps = rng.randint(min_steps, max_steps)
    fmt = {"name": name, "other": other, "item": item, "pron": pron, "Pron": pron.capitalize(), "a": a}
    question = [rng.choice(Q_START).format(**fmt)]
    solution = [rng.choice(S_START).format(**fmt)]
    x = a
    ops = []
    for _ in range(n_steps):
        op, b, y = _step(rng, x, max_value)
        ops.append((op, b))
        fmt.update(b=b, x=x, y=y)
        question.append(rng.choice(Q_OPS[op]).format(**fmt))
        solution.append(rng.choice(S_OPS[op]).format(**fmt))
        x = y
    question.append(rng.choice(Q_ASK).format(**fmt))
    solution.append(S_FINAL.format(y=x))
    return Problem(id=pid, question=" ".join(question), answer=str(x), solution=" ".join(solution), steps=n_steps,
                   identity=(name, item, a, tuple(ops)))


def generate_split(split: str, n: int, seed: int = 0) -> list[Problem]:
    """The first ``n`` problems of a split for a seed; a prefix of a longer request (stable ids)."""
    if split not in SPLITS:
        raise ValueError(f"unknown testbed split {split!r}; choose from {', '.join(SPLITS)}")
    offset, lo, hi, max_value = SPLITS[split]
    rng = random.Random(seed * 7_919 + offset)
    excluded = val_exclusions(seed) if split == "val" else frozenset()
    out: list[Problem] = []
    while len(out) < n:  # ids count kept problems, so a skipped draw never leaves a gap
        p = make_problem(rng, f"testbed-{split}-s{seed}-{len(out)}", lo, hi, max_value)
        if p.identity not in excluded:
            out.append(p)
    return out


@lru_cache(maxsize=8)
def val_exclusions(seed: int) -> frozenset[tuple]:
    """The identities ``val`` skips for a seed: those of the guarded prefixes of the other splits."""
    return frozenset(p.identity for split, n in VAL_GUARD.items() for p in generate_split(split, n, seed))


def corpus_texts() -> list[str]:
    """Every template word form, so the tokenizer's vocabulary covers all splits."""
    rng = random.Random(12345)
    texts = []
    for lo, hi, max_value in CORPUS_SHAPES:
        texts += [
            p.question + "\n" + p.solution
            for p in (make_problem(rng, "c", lo, hi, max_value) for _ in range(3000))
        ]
    return texts
