"""Problems with gold answers: the built-in generated splits and user JSONL files.

A data spec is ``testbed:<split>`` (``train``, ``val``, ``test``, ``test_ood``) or ``arith:<split>`` (the
same split names; ``cft.arith``), whose ``--seed``/``--limit`` choose which problems are generated,
``<benchmark>:<split>`` for a benchmark in ``cft.benchmarks`` (e.g.
``gsm8k:train``, ``math500:test``), or the path of a JSONL file with question and answer fields.
"""

from __future__ import annotations

from pathlib import Path

from cft import arith, benchmarks
from cft.artifacts import InputError, read_valid
from cft.problem import Problem
from cft.testbed import problems as testbed

__all__ = ["GENERATED", "TESTBED_DEFAULT_SIZE", "Problem", "is_generated", "load_jsonl_problems", "load_problems",
           "unknown_split"]

TESTBED_DEFAULT_SIZE = 1000  # problems of a generated split when no --limit is given
# Built-in tasks whose splits are generated from a seed: the prefix of a spec -> its module (generate_split, SPLITS).
GENERATED = {"testbed": testbed, "arith": arith}


def is_generated(spec: str) -> bool:
    """Whether a spec names a generated split (``testbed:test``, ``arith:train``, ...), whatever the split."""
    return spec.split(":", 1)[0] in GENERATED and ":" in spec


def unknown_split(spec: str) -> str | None:
    """What is wrong with a generated spec's split name, or None."""
    task, split = spec.split(":", 1)
    splits = GENERATED[task].SPLITS
    return None if split in splits else f"unknown {task} split {split!r}; choose from {', '.join(splits)}"


def load_problems(spec: str, seed: int = 0, limit: int | None = None,
                  question_field: str = "question", answer_field: str = "answer",
                  data_dir: str | None = None) -> list[Problem]:
    if is_generated(spec):
        task, split = spec.split(":", 1)
        return [Problem(p.id, p.question, p.answer)
                for p in GENERATED[task].generate_split(split, limit or TESTBED_DEFAULT_SIZE, seed)]
    bench = benchmarks.parse_spec(spec)
    if bench is not None and not Path(spec).exists():
        problems = benchmarks.load_benchmark(*bench, data_dir=data_dir)
        return problems[:limit] if limit else problems
    problems = load_jsonl_problems(spec, question_field, answer_field)
    return problems[:limit] if limit else problems


def load_jsonl_problems(path: str, question_field: str = "question", answer_field: str = "answer") -> list[Problem]:
    """Validated problems from a JSONL file; bad lines raise InputError naming file, line and field."""
    seen: dict[str, int] = {}

    def parse(lineno: int, rec: dict) -> Problem:
        for name in (question_field, answer_field):
            if name not in rec:
                raise InputError(path, lineno, name, "missing field")
        question, answer = rec[question_field], rec[answer_field]
        if not isinstance(question, str) or not question.strip():
            raise InputError(path, lineno, question_field, "must be a non-empty string")
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
            raise InputError(path, lineno, answer_field, "must be a non-empty string or number")
        id_field = "id" if "id" in rec else "idx"
        pid = rec.get(id_field, f"line{lineno}")
        if isinstance(pid, bool) or not isinstance(pid, (str, int)) or not str(pid).strip():
            raise InputError(path, lineno, id_field, "must be a non-empty string or integer")
        pid = str(pid)
        if pid in seen:
            raise InputError(path, lineno, id_field, f"duplicate id {pid!r} (first on line {seen[pid]})")
        seen[pid] = lineno
        return Problem(pid, question, str(answer))

    return read_valid(path, parse)
