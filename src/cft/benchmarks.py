"""The math benchmarks, read from a local data folder, with the Qwen2.5-Math toolkit's formatting.

``load_benchmark(name, split="test", data_dir=None)`` returns ``cft.problem.Problem``s. Each benchmark keeps
its own question layout and gold parsing, following the toolkit's ``parse_question`` and
``parse_ground_truth`` (QwenLM/Qwen2.5-Math ``evaluation/parser.py``), because reported numbers only
compare when prompts and golds match. Golds are kept as written (``2,125``, ``\\frac{1}{2}``); the
verifier does the normalising, so no information is lost here. Integral floats are written as
integers (``145.0`` -> ``145``).

The data folder (see ``shared/data/SOURCES.md``) is found from ``data_dir``, else the ``CFT_DATA_DIR``
environment variable, else ``../shared/data`` from the current directory or from the repository.
Nothing is downloaded and nothing is copied into the repository.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cft.artifacts import InputError, read_jsonl
from cft.problem import Problem
from cft.verify import last_boxed

log = logging.getLogger(__name__)

ENV_VAR = "CFT_DATA_DIR"

# The eleven English sets of the Qwen2.5-Math evaluation, the paper's evaluation suite.
QWEN_SUITE = ("gsm8k", "math", "svamp", "asdiv", "mawps", "carp_en", "tabmwp", "minerva_math", "gaokao2023en",
              "olympiadbench", "college_math")


def _num(value) -> str:
    """Gold numbers as text: ``145.0`` -> ``145``, other floats unchanged."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _first(*keys: str) -> Callable[[dict], str]:
    def get(rec: dict) -> str:
        for key in keys:
            if rec.get(key) is not None:
                return str(rec[key])
        raise KeyError(keys[0])

    return get


def _gold(key: str) -> Callable[[dict], str]:
    return lambda rec: _num(rec[key])


def _dollar_free(key: str) -> Callable[[dict], str]:
    return lambda rec: str(rec[key]).replace("$", "").strip()


def _boxed_solution(rec: dict) -> str:
    answer = last_boxed(rec["solution"])
    if answer is None:
        raise KeyError("solution has no \\boxed{} answer")
    return answer.strip()


def _gsm8k_answer(rec: dict) -> str:
    if "####" not in rec["answer"]:
        raise KeyError("answer has no '#### N' line")
    return rec["answer"].split("####")[-1].strip()


def _svamp_question(rec: dict) -> str:
    body = rec["Body"].strip()
    return f"{body if body.endswith('.') else body + '.'} {rec['Question'].strip()}"


def _asdiv_question(rec: dict) -> str:
    return f"{rec['body'].strip()} {rec['question'].strip()}"


def _asdiv_answer(rec: dict) -> str:
    return re.sub(r"\(.*?\)", "", rec["answer"]).strip()  # "9 (apples)" -> "9"


def _tabmwp_question(rec: dict) -> str:
    title = f'regarding "{rec["table_title"]}" ' if rec.get("table_title") else ""
    question = f"Read the following table {title}and answer a question:\n{rec['table']}\n{rec['question']}"
    if rec.get("choices"):
        question += f" Please select from the following options: {rec['choices']}"
    return question


def _olympiad_question(rec: dict) -> str:
    context = (rec.get("context") or "").strip()
    return f"{context}\n{rec['question']}" if context else rec["question"]


def _olympiad_answer(rec: dict) -> str:
    return ", ".join(str(a).strip().strip("$").strip() for a in rec["final_answer"])


def _mmlu_question(rec: dict) -> str:
    options = " ".join(f"({label}) {str(option).strip()}" for label, option in zip("ABCD", rec["choices"], strict=True))
    return f"{rec['question'].strip()}\nAnswer Choices: {options}"


def _sat_question(rec: dict) -> str:
    options = "(" + rec["options"].strip()
    for letter in "BCD":
        options = options.replace(f" {letter}) ", f" ({letter}) ")
    return f"{rec['question'].strip()}\nAnswer Choices: {options}"


def _aqua_question(rec: dict) -> str:
    choices = ("(" + "(".join(rec["options"])).replace("(", " (").replace(")", ") ").strip()
    return f"{rec['question'].strip()}\nAnswer Choices: {choices}"


@dataclass(frozen=True)
class Benchmark:
    """Where a benchmark's splits live (relative to the data folder) and how to read one record."""

    name: str
    splits: dict[str, str]
    question: Callable[[dict], str]
    answer: Callable[[dict], str]
    note: str = ""
    id_keys: tuple[str, ...] = field(default=("unique_id", "idx", "id", "pid"))


def _test(name: str, question: Callable[[dict], str], answer: Callable[[dict], str], note: str = "") -> Benchmark:
    return Benchmark(name, {"test": f"benchmarks/{name}/test.jsonl"}, question, answer, note)


_QUESTION = _first("question", "problem", "Question", "input")

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("gsm8k", {"train": "gsm8k/train.jsonl", "test": "benchmarks/gsm8k/test.jsonl"},
              _QUESTION, _gsm8k_answer, "gold after '#### '"),
    Benchmark("math", {"train": "math/train.jsonl", "test": "benchmarks/math/test.jsonl"},
              _QUESTION, _boxed_solution, "full 5,000-problem test; gold = last \\boxed{} of the solution"),
    _test("math500", _QUESTION, _gold("answer"), "PRM800K's 500-problem MATH subset; gold = its answer field"),
    _test("svamp", _svamp_question, _gold("Answer"), "question = Body + Question"),
    _test("asdiv", _asdiv_question, _asdiv_answer, "question = body + question; '9 (apples)' -> 9"),
    Benchmark("mawps", {"test": "benchmarks/mawps/test.jsonl",
                        **{s: f"benchmarks/mawps/{s}.jsonl" for s in ("addsub", "multiarith", "singleeq", "singleop")}},
              _QUESTION, _gold("target"), "test = the four subsets together; each subset is also a split"),
    _test("carp_en", _first("content"), _gold("answer"), "gold is space-tokenised LaTeX"),
    Benchmark("tabmwp", {"test": "benchmarks/tabmwp/problems_test1k.json"}, _tabmwp_question, _gold("answer"),
              "the official 1,000-problem test1k subset, not the full 7,686-problem test set"),
    _test("minerva_math", _QUESTION, _boxed_solution, "gold = \\boxed{} of the solution"),
    _test("gaokao2023en", _QUESTION, _dollar_free("answer")),
    _test("olympiadbench", _olympiad_question, _olympiad_answer, "gold = final_answer list joined by ', '"),
    _test("college_math", _QUESTION, _dollar_free("answer")),
    _test("aime24", _first("problem", "question"), _gold("answer")),
    _test("amc23", _first("problem", "question"), _gold("answer")),
    _test("gsm_hard", _first("input"), _gold("target")),
    _test("sat_math", _sat_question, _gold("Answer"), "multiple choice, gold is a letter"),
    _test("aqua", _aqua_question, _gold("correct"), "multiple choice, gold is a letter"),
    _test("mmlu_stem", _mmlu_question, lambda rec: "ABCD"[int(rec["answer"])], "multiple choice, gold is a letter"),
]}


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data folder: ``data_dir``, else ``$CFT_DATA_DIR``, else ``../shared/data`` (cwd or repo)."""
    if data_dir is not None:
        candidates, origin = [Path(data_dir)], "data_dir argument"
    elif os.environ.get(ENV_VAR):
        candidates, origin = [Path(os.environ[ENV_VAR])], f"${ENV_VAR}"
    else:
        repo = Path(__file__).resolve().parents[2]
        candidates, origin = [Path.cwd() / ".." / "shared" / "data", repo.parent / "shared" / "data"], "defaults"
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    tried = ", ".join(str(p) for p in candidates)
    raise InputError(candidates[0], None, None,
                     f"benchmark data folder not found (tried {tried}, from {origin}); pass --data-dir or set "
                     f"{ENV_VAR} to the folder that holds benchmarks/ (see shared/data/SOURCES.md)")


def _records(path: Path) -> Iterator[tuple[str, dict]]:
    """``(natural id or line number, record)`` from a JSONL file or a JSON object of records (TabMWP)."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(path, None, None, f"cannot read JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InputError(path, None, None, "expected a JSON object of id -> record")
        for key, rec in data.items():
            yield key, {"pid": key, **rec}
        return
    for lineno, rec in read_jsonl(path):
        yield str(lineno), rec


def load_benchmark(name: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> list[Problem]:
    """All problems of one benchmark split, in file order, with formatted question and parsed gold."""
    bench = BENCHMARKS.get(name)
    if bench is None:
        raise InputError(name, None, None, f"unknown benchmark; known: {', '.join(sorted(BENCHMARKS))}")
    if split not in bench.splits:
        raise InputError(f"{name}:{split}", None, None, f"unknown split; {name} has {', '.join(bench.splits)}")
    root = data_root(data_dir)
    path = root / bench.splits[split]
    if not path.exists():
        raise InputError(path, None, None, f"missing file of {name}:{split} in data folder {root} "
                                           f"(set {ENV_VAR} or pass --data-dir to use another folder)")
    problems, skipped = [], []
    for where, rec in _records(path):
        try:
            question, answer = bench.question(rec).strip(), bench.answer(rec).strip()
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise InputError(path, int(where) if where.isdigit() and path.suffix != ".json" else None,
                             None, f"{name}: cannot read record {where}: {exc!r}") from None
        if not question or not answer:  # e.g. one MATH train solution boxes nothing: "\\boxed{}"
            skipped.append(where)
            continue
        if answer.lower() in ("true", "false"):  # as the toolkit does, so the model answers in kind
            question += " (True or False)"
        elif answer.lower() in ("yes", "no"):
            question += " (Yes or No)"
        natural = next((str(rec[k]) for k in bench.id_keys if rec.get(k) is not None), where)
        problems.append(Problem(f"{name}/{natural}", question, answer))
    if skipped:
        log.warning("%s:%s: skipped %d record(s) with an empty question or gold answer: %s",
                    name, split, len(skipped), ", ".join(skipped[:10]))
    return problems


def parse_spec(spec: str) -> tuple[str, str] | None:
    """``"gsm8k:test"`` -> ``("gsm8k", "test")`` when the name is a known benchmark, else None."""
    m = re.fullmatch(r"([a-z0-9_]+):([a-z0-9_]+)", spec)
    return (m.group(1), m.group(2)) if m and m.group(1) in BENCHMARKS else None
