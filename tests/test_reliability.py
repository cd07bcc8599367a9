"""Reliability: killed stages resume to the same bytes, bad input fails fast and clearly, failures stay local.

The kill tests run the real CLI (``python -m cft``) in a subprocess and SIGKILL it at seeded random
moments once it has written records; the uninterrupted reference run is made in-process with the same
resolved config and the same relative paths, so its artifact must match byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cft.generate as gen
import cft.identify as ident
import cft.models
from cft import verify
from cft.artifacts import InputError, load_records, read_meta, skipping_invalid
from cft.cli import build_parser, main
from cft.data import load_problems
from cft.decoding.api import DecodeConfig, decode
from cft.evaluate import EvalConfig, evaluate
from cft.generate import generate
from cft.identify import identify
from cft.models import load_model
from cft.prompts import render_ids
from cft.verify import equivalence

REPO = Path(__file__).resolve().parent.parent
BAD = Path(__file__).resolve().parent / "bad_inputs"
# the only meta fields a resumed run may change: its timing and what it decoded (the fast engine's step counts)
TIMING = {"seconds", "decoded_tokens", "tokens_per_second", "engine"}


@pytest.fixture(scope="module")
def testbed():
    return load_model("testbed", device="cpu")


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: this source tree, one thread, every record flushed at once."""
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "CFT_FLUSH_EVERY": "1"}


def complete_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:  # not yet written, or removed by a run that finished between two polls
        return 0


def tear_last_line(path: Path) -> None:
    """Cut the last record in half, as a kill in the middle of a write would."""
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: start + (len(data) - start) // 2])


def kill_and_resume(argv: list[str], cwd: Path, partial: Path, seed: int, pace: float, kills: int = 3,
                    env: dict[str, str] | None = None) -> list[int]:
    """SIGKILL the command ``kills`` times, each a seeded random delay after it wrote a new record; then finish it.

    The delay is under half of ``pace`` (the seconds between two writes, measured on the reference run),
    so every kill lands mid-run on a fast machine as on a slow one. After the second kill the last record
    is torn, so recovery from a half-written line is exercised too. Returns the complete records of the
    partial file after each kill. ``env``: the subprocesses' environment (default ``cli_env()``).
    """
    env = cli_env() if env is None else env
    rng = random.Random(seed)
    counts = []
    for n in range(kills):
        before = complete_lines(partial)
        err_path = cwd / f"stderr-{n}.txt"
        with open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-m", "cft", *argv], cwd=cwd, env=env,
                                    stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 300
        while complete_lines(partial) <= before:
            assert proc.poll() is None, f"run {n} ended before writing a record:\n{err_path.read_text()}"
            assert time.time() < deadline, f"run {n} wrote nothing in 300 s"
            time.sleep(0.02)
        time.sleep(rng.uniform(0, pace / 2))
        proc.kill()
        assert proc.wait() == -signal.SIGKILL, f"run {n} finished before it could be killed; give it more work"
        counts.append(complete_lines(partial))
        if n == 1:
            tear_last_line(partial)
    done = subprocess.run([sys.executable, "-m", "cft", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert not partial.exists()
    return counts


def without_timing(meta: dict) -> dict:
    """The metadata but for what only says how long the runs took and where (``sittings``: each run's seconds;
    ``environment.machine``: the threads of the killed subprocesses differ from this process's)."""
    env = {k: v for k, v in meta.get("environment", {}).items() if k != "machine"}
    return {**{k: v for k, v in meta.items() if k != "sittings"}, "environment": env,
            "summary": {k: v for k, v in meta["summary"].items() if k not in TIMING}}


def assert_same_artifact(resumed: Path, reference: Path, kind: str) -> None:
    """Byte-equal records, unique keys, and metadata equal but for timing."""
    records = load_records(resumed, kind)
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)), "duplicate records"
    assert keys == [r["key"] for r in load_records(reference, kind)], "missing or reordered records"
    assert resumed.read_bytes() == reference.read_bytes()  # labels too: margins are the same in any batching
    assert without_timing(read_meta(resumed)) == without_timing(read_meta(reference))
    assert len(read_meta(reference)["sittings"]) == 1 and 1 <= len(read_meta(resumed)["sittings"]) <= 4


def parse(command: str, argv: list[str]):
    return build_parser(command).parse_args([command, *argv])


# ---------------------------------------------------------------- killed runs resume exactly


@pytest.mark.slow
def test_generate_killed_three_times_resumes_to_the_same_bytes(tmp_path, testbed, monkeypatch):
    argv = ["--model", "testbed", "--device", "cpu", "--data", "testbed:train", "--limit", "48",
            "--batch-size", "4", "--out", "G.jsonl"]
    (tmp_path / "killed").mkdir()
    (tmp_path / "reference").mkdir()
    monkeypatch.chdir(tmp_path / "reference")
    summary = generate(gen.config_from_args(parse("generate", argv)), *testbed)

    counts = kill_and_resume(["generate", *argv], tmp_path / "killed", tmp_path / "killed" / "G.jsonl.partial",
                             seed=1, pace=summary["seconds"] / (48 / 4))
    assert counts[0] > 0 and counts[-1] < 48, counts  # killed mid-run each time, work left for the last run
    assert_same_artifact(tmp_path / "killed" / "G.jsonl", tmp_path / "reference" / "G.jsonl", "generations")


@pytest.fixture(scope="module")
def generations(tmp_path_factory, testbed) -> Path:
    """``cft generate --model testbed --data testbed:train --limit 12`` (in-process): a few correct responses."""
    out = tmp_path_factory.mktemp("generations") / "G.jsonl"
    cfg = gen.config_from_args(parse("generate", ["--model", "testbed", "--device", "cpu", "--data",
                                                  "testbed:train", "--limit", "12", "--out", str(out)]))
    summary = generate(cfg, *testbed)
    assert summary["correct"] >= 6, summary
    return out


@pytest.mark.slow
def test_identify_killed_three_times_resumes_to_the_same_bytes(tmp_path, testbed, generations, monkeypatch):
    argv = ["--model", "testbed", "--device", "cpu", "--input", "G.jsonl", "--out", "L.jsonl", "--batch-size", "16"]
    for run in ("killed", "reference"):
        (tmp_path / run).mkdir()
        for suffix in ("", ".meta.json"):
            (tmp_path / run / f"G.jsonl{suffix}").write_bytes(Path(f"{generations}{suffix}").read_bytes())
    monkeypatch.chdir(tmp_path / "reference")
    summary = identify(ident.config_from_args(parse("identify", argv)), *testbed)

    counts = kill_and_resume(["identify", *argv], tmp_path / "killed", tmp_path / "killed" / "L.jsonl.partial",
                             seed=2, pace=summary["seconds"] / summary["responses"])
    assert counts[0] > 0 and counts[-1] < summary["responses"], counts  # killed mid-run, work left for the last run
    assert_same_artifact(tmp_path / "killed" / "L.jsonl", tmp_path / "reference" / "L.jsonl", "labels")


# ---------------------------------------------------------------- bad input: exit 2, file, line and field

# corpus folder -> (file stem, line, field); every file of the corpus must be listed here
CASES = {
    "data": [
        ("malformed_json", 2, None), ("not_an_object", 1, None), ("missing_answer", 2, "answer"),
        ("question_not_string", 1, "question"), ("empty_answer", 3, "answer"), ("answer_wrong_type", 2, "answer"),
        ("duplicate_id", 3, "id"), ("id_wrong_type", 2, "id"), ("invalid_utf8", 2, None), ("empty", None, None),
    ],
    "generations": [
        ("schema_version", 2, "schema"), ("labels_file", 1, "schema"), ("data_file", 1, "schema"),
        ("malformed_json", 2, None), ("missing_prompt_ids", 1, "prompt_ids"),
        ("response_ids_not_list", 2, "response_ids"), ("token_ids_floats", 1, "prompt_ids"),
        ("correct_not_bool", 3, "correct"), ("empty_correct_response", 2, "response_ids"), ("empty_gold", 1, "gold"),
        ("duplicate_id", 2, "id"), ("token_out_of_vocab", 2, "response_ids"), ("invalid_utf8", 1, None),
    ],
    "labels": [
        ("critical_length_mismatch", 2, "critical"), ("eligible_not_binary", 1, "eligible"),
        ("critical_not_eligible", 3, "critical"), ("generations_file", 1, "schema"), ("schema_version", 1, "schema"),
        ("malformed_json", 2, None), ("missing_response_ids", 2, "response_ids"), ("empty_response", 1, "response_ids"),
        ("invalid_utf8", 2, None),
    ],
}
COMMANDS = {"data": ["generate", "eval"], "generations": ["identify"], "labels": ["train"]}


def command_argv(command: str, path: Path, tmp: Path) -> list[str]:
    model = ["--model", "testbed"]
    return {
        "generate": ["generate", *model, "--device", "cpu", "--data", str(path), "--out", str(tmp / "G.jsonl")],
        "eval": ["eval", *model, "--device", "cpu", "--benchmarks", str(path), "--out", str(tmp / "E"),
                 "--n-samples", "0"],
        "identify": ["identify", *model, "--device", "cpu", "--input", str(path), "--out", str(tmp / "L.jsonl")],
        "train": ["train", *model, "--input", str(path), "--out", str(tmp / "T"), "--method", "cft"],
    }[command]


def test_the_corpus_lists_every_bad_file():
    on_disk = {(p.parent.name, p.stem) for p in BAD.glob("*/*.jsonl")}
    assert on_disk == {(folder, stem) for folder, cases in CASES.items() for stem, _, _ in cases}


def assert_names_the_problem(message: str, path: Path, line: int | None, field: str | None) -> None:
    assert str(path) in message
    if line is not None:
        assert f"line {line}:" in message or f"line {line}," in message, message
    if field is not None:
        assert f"field '{field}'" in message, message
    assert "Traceback" not in message


@pytest.mark.parametrize(("folder", "stem", "line", "field", "command"), [
    (folder, stem, line, field, command)
    for folder, cases in CASES.items() for stem, line, field in cases for command in COMMANDS[folder]
])
def test_bad_input_exits_2_naming_file_line_and_field(folder, stem, line, field, command, tmp_path, capsys,
                                                      monkeypatch):
    if command != "eval":  # validation must come before the model loads (eval renders prompts with its tokenizer)
        def no_model(*args, **kwargs):
            raise AssertionError("the model was loaded before the input was validated")

        for module in (cft.models, gen, ident):
            monkeypatch.setattr(module, "load_model", no_model)
    path = BAD / folder / f"{stem}.jsonl"
    assert main(command_argv(command, path, tmp_path)) == 2
    err = capsys.readouterr().err
    errors = [row for row in err.splitlines() if "error" in row]
    assert len(errors) == 1 and errors[0].startswith(f"cft {command}: error: "), err
    assert_names_the_problem(err, path, line, field)


def test_the_real_cli_exits_2_without_a_traceback(tmp_path):
    path = BAD / "generations" / "correct_not_bool.jsonl"
    done = subprocess.run([sys.executable, "-m", "cft", *command_argv("identify", path, tmp_path)],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert_names_the_problem(done.stderr, path, 3, "correct")


# ---------------------------------------------------------------- --skip-invalid


def mixed_data(tmp_path: Path) -> Path:
    """Five problems, two of them bad (malformed JSON, an empty answer)."""
    good = [{"id": f"p{i}", "question": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(3)]
    lines = [json.dumps(good[0]), '{"id": "x", "question": ', json.dumps(good[1]),
             json.dumps({"id": "y", "question": "What is 1 + 1?", "answer": ""}), json.dumps(good[2])]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(("command", "output", "kind"), [("generate", "G.jsonl", "generations"),
                                                      ("eval", "E/samples.jsonl", "samples")])
def test_skip_invalid_continues_and_counts(command, output, kind, tmp_path, capsys):
    data = mixed_data(tmp_path)
    argv = command_argv(command, data, tmp_path)
    assert main(argv) == 2  # without the flag the first bad line stops the run
    capsys.readouterr()
    assert main([*argv, "--skip-invalid", "--max-new-tokens", "32"]) == 0
    err = capsys.readouterr().err
    assert f"{data}, line 2: malformed JSON" in err and f"{data}, line 4, field 'answer'" in err
    assert f"cft {command}: skipped 2 invalid input lines ({data})" in err
    assert [r["id"] for r in load_records(tmp_path / output, kind)] == ["p0", "p1", "p2"]
    if command == "generate":
        assert read_meta(tmp_path / output)["summary"]["invalid_skipped"] == 2


def test_skip_invalid_on_generations(tmp_path, generations, capsys):
    lines = Path(generations).read_text().splitlines()
    correct = [i for i, line in enumerate(lines) if json.loads(line)["correct"]]
    bad = json.loads(lines[correct[1]])
    bad["response_ids"] = "not a list"
    lines[correct[1]] = json.dumps(bad)
    inp = tmp_path / "G.jsonl"
    inp.write_text("\n".join(lines[: correct[2] + 1]) + "\n")  # three correct responses, one of them broken
    assert main([*command_argv("identify", inp, tmp_path), "--skip-invalid"]) == 0
    assert f"line {correct[1] + 1}, field 'response_ids'" in capsys.readouterr().err
    labels = load_records(tmp_path / "L.jsonl", "labels")
    assert [r["id"] for r in labels] == [json.loads(lines[i])["id"] for i in (correct[0], correct[2])]
    assert read_meta(tmp_path / "L.jsonl")["summary"]["invalid_skipped"] == 1


def test_a_file_of_only_bad_lines_is_still_an_error():
    path = BAD / "data" / "question_not_string.jsonl"
    with skipping_invalid() as invalid, pytest.raises(InputError, match=r"no valid records \(1 invalid lines"):
        load_problems(str(path))
    assert invalid.count(path) == 1


# ---------------------------------------------------------------- prompts longer than the context


def test_prompts_too_long_for_the_context_are_skipped_and_counted(tmp_path, testbed, capsys, monkeypatch):
    model, tok = testbed
    budget = 256
    limit = model.config.max_position_embeddings - budget
    long_q = "What is " + " + ".join(["1"] * 200) + "?"
    assert len(render_ids(tok, long_q)) > limit
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "short", "question": "What is 2 + 3?", "answer": "5"},
        {"id": "long", "question": long_q, "answer": "200"},
        {"id": "same-text", "question": "What is 2 + 3?", "answer": "5"},  # the same problem twice stays twice
    ]))
    monkeypatch.setattr(gen, "load_model", lambda *a, **k: testbed)
    assert main([*command_argv("generate", data, tmp_path), "--max-new-tokens", str(budget)]) == 0
    out = capsys.readouterr().out
    assert f"skipped 1 problems whose prompt is longer than {limit} tokens" in out
    assert [r["id"] for r in load_records(tmp_path / "G.jsonl", "generations")] == ["short", "same-text"]
    meta = read_meta(tmp_path / "G.jsonl")
    assert meta["summary"]["skipped_too_long"] == 1 and meta["skipped_too_long_ids"] == ["long"]


# ---------------------------------------------------------------- out of memory in batched decoding


def oom_above(model, monkeypatch, limit: int, error: Exception) -> list[int]:
    """Make ``model.generate`` raise ``error`` for batches larger than ``limit``; returns the sizes it saw."""
    sizes, real = [], model.generate

    def generate(*args, input_ids, **kwargs):
        sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > limit:
            raise error
        return real(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    return sizes


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 2147483648 bytes."),
                                   RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)")])
def test_decode_retries_smaller_batches_after_out_of_memory(testbed, monkeypatch, error):
    model, tok = testbed
    prompts = [render_ids(tok, f"What is {i} + {i % 4}?") for i in range(10)]
    cfg = DecodeConfig(max_new_tokens=48, batch_size=8, backend="hf")  # the engine's retry: tests/test_generate.py
    expected = decode(model, tok, prompts, DecodeConfig(max_new_tokens=48, batch_size=2, backend="hf"))
    sizes = oom_above(model, monkeypatch, 3, error)
    assert decode(model, tok, prompts, cfg) == expected
    assert sizes[:3] == [8, 4, 2] and set(sizes[3:]) == {2}  # halved until it fits, then kept


def test_decode_gives_up_when_one_prompt_does_not_fit_and_passes_other_errors_on(testbed, monkeypatch):
    model, tok = testbed
    prompts = [render_ids(tok, "What is 1 + 1?")] * 3
    oom_above(model, monkeypatch, 0, torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(torch.OutOfMemoryError):
        decode(model, tok, prompts, DecodeConfig(max_new_tokens=8, batch_size=4, backend="hf"))
    sizes = oom_above(model, monkeypatch, 0, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        decode(model, tok, prompts, DecodeConfig(max_new_tokens=8, batch_size=4, backend="hf"))
    assert sizes == [3]  # not an out-of-memory error: no retry


# ---------------------------------------------------------------- a verifier failure stays with its item


def test_a_verifier_crash_or_timeout_marks_only_that_item(tmp_path, testbed, monkeypatch):
    argv = ["--model", "testbed", "--device", "cpu", "--data", "testbed:train", "--limit", "12"]
    reference = generate(gen.config_from_args(parse("generate", [*argv, "--out", str(tmp_path / "a.jsonl")])),
                         *testbed)
    records = load_records(tmp_path / "a.jsonl", "generations")
    crash, stall = records[0]["gold"], next(r["gold"] for r in records if r["gold"] != records[0]["gold"])
    real = equivalence.decide

    def flaky(prediction: str, gold: str, symbolic: equivalence.Symbolic) -> verify.GradeResult:
        if gold == crash:
            raise RecursionError("maximum recursion depth exceeded in sympy")
        if gold == stall:
            return verify.GradeResult(prediction, False, "symbolic", timed_out=True)
        return real(prediction, gold, symbolic)

    verify.clear_cache()
    monkeypatch.setattr(equivalence, "decide", flaky)
    summary = generate(gen.config_from_args(parse("generate", [*argv, "--out", str(tmp_path / "b.jsonl")])),
                       *testbed)
    for before, after in zip(records, load_records(tmp_path / "b.jsonl", "generations")):
        if before["gold"] == crash:
            assert after["verify_error"].startswith("RecursionError") and not after["correct"]
        elif before["gold"] == stall:
            assert after["verify_error"] == "timeout" and not after["correct"]
        else:
            assert after == before  # graded exactly as without the failures
    failed = sum(r["gold"] in (crash, stall) for r in records)
    assert summary["verify_errors"] == failed and reference["verify_errors"] == 0
    assert summary["n"] == reference["n"] == len(records)


# ---------------------------------------------------------------- provenance


def test_every_artifact_records_its_provenance(tmp_path, generations, testbed):
    labels = tmp_path / "L.jsonl"
    cfg = ident.config_from_args(parse("identify", ["--model", "testbed", "--device", "cpu", "--input",
                                                    str(generations), "--out", str(labels)]))
    identify(cfg, *testbed)
    evaluate(EvalConfig(model="testbed", benchmarks=["testbed:test"], out=str(tmp_path / "E"), limit=2,
                        n_samples=0, max_new_tokens=32, device="cpu"), *testbed)
    samples = tmp_path / "E" / "samples.jsonl"
    for path, stage in ((generations, "generate"), (labels, "identify"), (samples, "eval")):
        meta = read_meta(path)
        assert meta["stage"] == stage
        versions = meta["environment"]["versions"]
        for pkg in ("cft", "torch", "transformers", "trl", "math-verify"):
            assert versions[pkg], (path, pkg)
        assert meta["environment"]["device"] == "cpu" and meta["environment"]["dtype"] == "float32"
        assert meta["config"]["model"] == "testbed" and meta["config"]["out"] in (str(path), str(path.parent))
        assert meta.get("seed", meta["config"].get("seed")) is not None or stage == "identify"
    assert read_meta(generations)["seed"] == read_meta(generations)["config"]["seed"] == 0
    assert "seed" in read_meta(labels)  # None: identification is greedy throughout
    assert read_meta(labels)["generation_meta"] == read_meta(generations)
