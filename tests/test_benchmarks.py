"""Benchmark loaders: every split loads, each format is parsed the toolkit's way, errors name the fix."""

from __future__ import annotations

import json

import pytest

from cft import benchmarks
from cft.artifacts import InputError
from cft.data import load_problems
from cft.verify import grade

SPLITS = [(name, split) for name, bench in benchmarks.BENCHMARKS.items() for split in bench.splits]


@pytest.fixture(scope="module")
def root():
    try:
        return benchmarks.data_root()
    except InputError as exc:
        pytest.skip(f"no benchmark data: {exc}")


@pytest.fixture(scope="module")
def loaded(root):
    return {(name, split): benchmarks.load_benchmark(name, split) for name, split in SPLITS}


def test_registry_covers_the_evaluation_suite():
    assert set(benchmarks.QWEN_SUITE) | {"math500", "aime24", "amc23"} <= set(benchmarks.BENCHMARKS)
    assert len(benchmarks.QWEN_SUITE) == 11
    assert {"train", "test"} <= set(benchmarks.BENCHMARKS["gsm8k"].splits)
    assert {"train", "test"} <= set(benchmarks.BENCHMARKS["math"].splits)


@pytest.mark.parametrize(("name", "split"), SPLITS, ids=[f"{n}:{s}" for n, s in SPLITS])
def test_every_split_loads(loaded, name, split):
    problems = loaded[name, split]
    assert problems
    assert all(p.question.strip() and p.answer.strip() for p in problems)
    assert len({p.id for p in problems}) == len(problems)
    assert all(p.id.startswith(f"{name}/") for p in problems)


@pytest.mark.parametrize(("name", "split", "count"), [
    ("gsm8k", "train", 7473), ("gsm8k", "test", 1319), ("math", "test", 5000), ("math500", "test", 500),
    ("svamp", "test", 1000), ("asdiv", "test", 2215), ("mawps", "test", 2065), ("carp_en", "test", 976),
    ("tabmwp", "test", 1000), ("minerva_math", "test", 272), ("olympiadbench", "test", 675),
    ("college_math", "test", 2818), ("aime24", "test", 30), ("amc23", "test", 40),
])
def test_row_counts_match_the_sources(loaded, name, split, count):
    assert len(loaded[name, split]) == count


def test_records_without_a_gold_answer_are_skipped_not_fatal(loaded):
    assert len(loaded["math", "train"]) == 7498  # two solutions box nothing: \boxed{}
    assert len(loaded["gaokao2023en", "test"]) == 383  # two records have an empty answer


def test_gold_parsing_per_format(loaded):
    first = {key: problems[0] for key, problems in loaded.items()}
    assert first["gsm8k", "test"].answer == "18"
    assert first["gsm8k", "test"].question.startswith("Janet")
    assert first["svamp", "test"].answer == "145"  # 145.0
    assert first["svamp", "test"].question == ("There are 87 oranges and 290 bananas in Philip's collection. If the "
                                               "bananas are organized into 2 groups and oranges are organized into 93 "
                                               "groups. How big is each group of bananas?")
    assert first["asdiv", "test"].answer == "9"  # "9 (apples)"
    assert first["asdiv", "test"].question == ("Seven red apples and two green apples are in the basket. "
                                               "How many apples are in the basket?")
    assert first["mawps", "test"].answer == "43"
    assert first["amc23", "test"].answer == "27"
    assert first["math", "test"].answer == "2"  # last \boxed{} of the solution
    assert first["math500", "test"].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first["math500", "test"].id == "math500/test/precalculus/807.json"
    assert first["college_math", "test"].answer == "10-4 n"  # "$10-4 n$"
    assert first["gaokao2023en", "test"].answer == "\\{x|-2\\leq x < 1\\}"
    assert first["olympiadbench", "test"].answer == "2"
    assert first["minerva_math", "test"].answer == "1.6"
    assert first["carp_en", "test"].answer == "b ^ { 2 } - 9 a ^ { 2 }"
    assert first["mmlu_stem", "test"].answer == "C"
    assert first["mmlu_stem", "test"].question.endswith("(D) increase the mortality rate")
    aqua_choices = first["aqua", "test"].question.split("\nAnswer Choices: ")[1]
    assert aqua_choices.startswith("(A) 5 (√3 + 1)  (B) 6")  # the toolkit's spacing, quirks included
    assert "Answer Choices: (A) $f(-6)=0$ (B) $f(6)=-6$" in first["sat_math", "test"].question


def test_tabmwp_question_has_table_and_choices(loaded):
    problems = {p.id: p for p in loaded["tabmwp", "test"]}
    plain = problems["tabmwp/16"]
    assert plain.question.startswith('Read the following table regarding "Coin collections" and answer a question:\n')
    assert "Braden | 76" in plain.question and plain.answer == "84"
    choice = next(p for p in problems.values() if "Please select from the following options" in p.question)
    assert choice.answer in choice.question.split("Please select from the following options:")[1]


def test_olympiadbench_joins_answer_lists_and_prepends_context(tmp_path):
    (tmp_path / "benchmarks/olympiadbench").mkdir(parents=True)
    rec = {"id": 7, "context": "A game is played.", "question": "Who wins?", "final_answer": ["$3$", "$4$"]}
    (tmp_path / "benchmarks/olympiadbench/test.jsonl").write_text(json.dumps(rec) + "\n")
    (problem,) = benchmarks.load_benchmark("olympiadbench", data_dir=tmp_path)
    assert (problem.id, problem.question, problem.answer) == ("olympiadbench/7", "A game is played.\nWho wins?", "3, 4")


def test_yes_no_questions_get_the_toolkit_hint(tmp_path):
    (tmp_path / "benchmarks/asdiv").mkdir(parents=True)
    rec = {"body": "Tom has 3 apples.", "question": "Does Tom have apples?", "answer": "Yes", "formula": ""}
    (tmp_path / "benchmarks/asdiv/test.jsonl").write_text(json.dumps(rec) + "\n")
    (problem,) = benchmarks.load_benchmark("asdiv", data_dir=tmp_path)
    assert problem.question.endswith("Does Tom have apples? (Yes or No)")


def test_every_gold_grades_against_itself(loaded):
    """A model that boxes exactly the gold must be graded correct, whatever the format."""
    wrong = [(name, p.id, p.answer) for (name, split), problems in loaded.items() if split == "test"
             for p in problems[:300] if not grade(f"The final answer is $\\boxed{{{p.answer}}}$.", p.answer)[1]]
    assert wrong == []


def test_missing_data_folder_names_the_path_and_the_variable(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(InputError, match="CFT_DATA_DIR") as info:
        benchmarks.load_benchmark("gsm8k", data_dir=missing)
    assert str(missing) in str(info.value)
    monkeypatch.setenv("CFT_DATA_DIR", str(missing))
    with pytest.raises(InputError, match=str(missing)):
        benchmarks.load_benchmark("svamp")


def test_missing_file_in_an_existing_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CFT_DATA_DIR", str(tmp_path))
    with pytest.raises(InputError, match="svamp:test") as info:
        benchmarks.load_benchmark("svamp")
    assert "benchmarks/svamp/test.jsonl" in str(info.value)


def test_unknown_benchmark_or_split():
    with pytest.raises(InputError, match="unknown benchmark"):
        benchmarks.load_benchmark("nope")
    with pytest.raises(InputError, match="unknown split"):
        benchmarks.load_benchmark("math500", "train")


def test_load_problems_dispatches_benchmark_specs(root):
    problems = load_problems("gsm8k:test", limit=3)
    assert [p.answer for p in problems] == ["18", "3", "70000"]
    assert load_problems("math:train", limit=2, data_dir=str(root))[0].id == "math/train/algebra/0.json"


def test_load_problems_keeps_jsonl_paths(tmp_path, monkeypatch):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    assert [(p.question, p.answer) for p in load_problems(str(path))] == [("1+1?", "2")]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gsm8k:test").write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    assert [p.answer for p in load_problems("gsm8k:test")] == ["4"]  # an existing file wins over the spec
    assert benchmarks.parse_spec("testbed:train") is None
    assert benchmarks.parse_spec("gsm8k:train") == ("gsm8k", "train")
    assert benchmarks.parse_spec("my/file.jsonl") is None
