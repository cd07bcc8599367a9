"""Every ``cft`` command with every kind of bad argument: exit 2, one line naming the argument, nothing else.

The cases are derived from the parsers themselves: every argument of every command (sub-commands too)
that has a validator in ``cft.options`` gets the bad values of that validator's kind, so a new argument
with a known name is swept without touching this file. Each case asserts exit code 2, exactly one line
on stderr naming the argument, no traceback, no model loaded and no file created.

``python tests/test_cli_errors.py`` prints the table of cases and messages kept in docs/FORMATS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cft import cli, options

REPO = Path(__file__).resolve().parent.parent

# A valid command line per command (``<dest>`` marks a positional); each case replaces one argument.
BASE = {
    "generate": ["generate", "--model", "testbed", "--data", "testbed:train", "--out", "{tmp}/g.jsonl"],
    "identify": ["identify", "--input", "{file}", "--out", "{tmp}/l.jsonl"],
    "train": ["train", "--model", "testbed", "--input", "{file}", "--out", "{tmp}/t"],
    "grpo": ["grpo", "--init", "testbed", "--out", "{tmp}/r"],
    "eval": ["eval", "--model", "testbed", "--benchmarks", "testbed:test", "--out", "{tmp}/e"],
    "demo": ["demo", "--out", "{tmp}/d"],
    "transfer": ["transfer", "--input", "{file}", "--model", "testbed", "--out", "{tmp}/x.jsonl"],
    "testbed pretrain": ["testbed", "pretrain", "--out", "{tmp}/p"],
    "testbed export": ["testbed", "export", "<dir>"],
    "fetch-model": ["fetch-model", "smollm2", "--cache", "{tmp}/c"],
    "view": ["view", "<labels>", "--out", "{tmp}/v.html"],
    "experiment": ["experiment", "<config>"],
    "report": ["report", "<run_dir>"],
}
GOOD_POSITIONAL = {"dir": "{tmp}/x", "labels": "{file}", "config": "{config}", "run_dir": "{dir}"}

BAD_PATHS = {
    options.model_name: ["/nonexistent/model", "{file}", "{dir}", "org/not a hub id", "nosuchorg/nosuchmodel",
                         "testbd"],
    options.input_file: ["{tmp}/missing.jsonl", "{dir}"],
    options.input_dir: ["{tmp}/missing", "{file}"],
    options.output_file: ["/proc/forbidden/x", "{dir}", "{file}/x"],
    options.output_dir: ["/proc/forbidden/x", "{file}"],
    options.yaml_config: ["{bad_yaml}", "{list_yaml}", "{dir}", "{tmp}/missing.yaml"],
    options.device_name: ["cuda:3", "tpu9"],
    options.benchmark_list: ["", " , ", "{dir}"],
    options.data_spec: ["{dir}", "{tmp}/missing.jsonl"],
    options.template_name: ["nosuchtemplate"],
}


def bad_numbers(check) -> list[str]:
    """Values just outside a ``options.number`` validator's range, and a non-number."""
    low, low_inclusive, high, high_inclusive = check.bounds
    values = [options._fmt(low - 1) if low_inclusive else options._fmt(low)]
    if high != float("inf"):
        values.append(options._fmt(high) if not high_inclusive else options._fmt(high + 1))
    return [*values, "abc"]


def bad_values(check) -> list[str]:
    return bad_numbers(check) if hasattr(check, "bounds") else BAD_PATHS[check]


def _argument_actions(parser: argparse.ArgumentParser, words: list[str]):
    """(sub-command words, action) of every validated argument, sub-parsers included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _argument_actions(sub, [*words, name])
        elif hasattr(action.type, "__module__") and action.type.__module__ == "cft.options":
            yield words, action


def cases() -> list[tuple[str, list[str], str, str]]:
    """(label, argv template, option shown in the message, bad value) for every command and argument."""
    out = []
    for command in cli.COMMANDS:
        sub = next(a for a in cli.build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
        for words, action in _argument_actions(sub.choices[command], [command]):
            label = " ".join(words)
            base = BASE[label]
            shown = "/".join(action.option_strings) or action.dest
            for value in bad_values(action.type):
                if action.option_strings:
                    argv = list(base)
                    for opt in action.option_strings:
                        if opt in argv:
                            del argv[argv.index(opt):argv.index(opt) + 2]
                    argv += [action.option_strings[-1], value]
                else:
                    argv = [value if w == f"<{action.dest}>" else w for w in base]
                argv = [GOOD_POSITIONAL[w[1:-1]] if w.startswith("<") else w for w in argv]
                out.append((label, argv, shown, value))
    return out


CASES = cases()


def workspace(tmp: Path) -> dict[str, str]:
    """The files the placeholders name; returns the substitutions."""
    (tmp / "adir").mkdir()
    (tmp / "afile.jsonl").write_text('{"a": 1}\n')
    (tmp / "bad.yaml").write_text("models: [testbed\nseeds: 1\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "good.yaml").write_text(f"out: {tmp}/exp\n")
    return {"{tmp}": str(tmp), "{file}": str(tmp / "afile.jsonl"), "{dir}": str(tmp / "adir"),
            "{bad_yaml}": str(tmp / "bad.yaml"), "{list_yaml}": str(tmp / "list.yaml"),
            "{config}": str(tmp / "good.yaml")}


def fill(argv: list[str], subs: dict[str, str]) -> list[str]:
    out = []
    for word in argv:
        for key, value in subs.items():
            word = word.replace(key, value)
        out.append(word)
    return out


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if any model is loaded (through cft.models or transformers directly)."""
    import transformers

    import cft.models

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cft.models, "load_model", forbidden)
    for name in ("cft.generate", "cft.identify", "cft.evaluate", "cft.demo"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "load_model"):
            monkeypatch.setattr(module, "load_model", forbidden)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)


def run_case(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_sweep_covers_every_command_and_kind():
    labels = {c[0] for c in CASES}
    assert labels == set(BASE), "every command (and testbed sub-command) has at least one swept argument"
    kinds = {type(v) for c in CASES for v in [c[3]]}
    assert kinds == {str}
    assert len(CASES) > 100


@pytest.mark.parametrize(("label", "argv", "shown", "value"), CASES,
                         ids=[f"{c[0]}:{c[2]}={c[3]}" for c in CASES])
def test_bad_argument_one_line_exit_2(label, argv, shown, value, tmp_path, capsys, monkeypatch, no_model_loading):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # a hub id fails without a network attempt
    subs = workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = files_under(tmp_path)
    code, out, err = run_case(fill(argv, subs), capsys)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"cft {label}: error: argument {shown}:"), lines[0]
    assert "Traceback" not in out + err
    assert files_under(tmp_path) == before, "nothing is created"


def test_a_hub_id_fails_in_seconds_without_the_offline_flag(tmp_path, capsys, no_model_loading):
    """No network here: the hub lookup fails fast (5 s timeout at most) as one line."""
    code, _, err = run_case(["generate", "--model", "nosuchorg/nosuchmodel", "--data", "testbed:train",
                             "--out", str(tmp_path / "g.jsonl")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nosuchorg/nosuchmodel" in err
    assert not any(tmp_path.iterdir())


def test_a_cached_hub_id_is_accepted_offline_and_fingerprinted_from_its_snapshot(tmp_path, monkeypatch,
                                                                                 random_model_dir):
    import shutil

    from huggingface_hub import constants

    from cft import provenance

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--someorg--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    shutil.copytree(random_model_dir, repo / "snapshots" / "abc123")
    assert options.model_name("someorg/tiny") == "someorg/tiny"
    assert provenance.fingerprint("someorg/tiny").weights == provenance.fingerprint(str(random_model_dir)).weights
    assert provenance.fingerprint("someorg/other") == provenance.Fingerprint("someorg/other", None, None)


def test_unknown_config_key_is_one_line(tmp_path, capsys, no_model_loading):
    config = tmp_path / "c.yaml"
    config.write_text(f"out: {tmp_path}/exp\nmodles: [testbed]\n")
    code, _, err = run_case(["experiment", str(config)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "modles" in err, err
    assert not (tmp_path / "exp").exists()


def test_errors_found_while_running_are_one_line(tmp_path, capsys, no_model_loading):
    """An experiment output that cannot be created, a YAML override that does not parse."""
    config = tmp_path / "c.yaml"
    config.write_text("out: /proc/forbidden/x\nmethods: [sft]\nseeds: [0]\n")
    for extra, expected in (([], "/proc/forbidden: No such file or directory"),
                            (["seeds=[0,"], "not valid YAML: expected the node content")):
        code, out, err = run_case(["experiment", str(config), *extra], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0], err
        assert "Traceback" not in out + err


def test_device_on_a_machine_with_one_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert options.device_name("cuda:0") == "cuda:0" and options.device_name("cuda") == "cuda"
    with pytest.raises(argparse.ArgumentTypeError, match=r"has 1 CUDA device\(s\), cuda:0..cuda:0"):
        options.device_name("cuda:3")


def test_a_usage_error_is_one_line(tmp_path, capsys):
    shard = ["identify", "--input", __file__, "--out", str(tmp_path / "l.jsonl"), "--num-shards", "2",
             "--shard-index", "2"]
    for argv in (["bogus"], ["identify"], ["train", "--model", "testbed"], [], shard):
        code, _, err = run_case(argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "error:" in err, (argv, err)


def test_help_still_exits_0(capsys):
    assert cli.main(["identify", "--help"]) == 0
    assert "--allow-model-mismatch" in capsys.readouterr().out


# ---------------------------------------------------------------- the four cases of issue 16


@pytest.fixture(scope="session")
def testbed_artifacts(tmp_path_factory):
    """Real stage A and B outputs of the testbed model (tiny), with their metadata."""
    folder = tmp_path_factory.mktemp("testbed_run")
    gen, labels = folder / "gen.jsonl", folder / "labels.jsonl"
    assert cli.main(["generate", "--model", "testbed", "--data", "testbed:train", "--limit", "4",
                     "--max-new-tokens", "48", "--out", str(gen)]) == 0
    assert cli.main(["identify", "--model", "testbed", "--input", str(gen), "--out", str(labels)]) == 0
    return gen, labels


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def test_issue_cases_cross_model(testbed_artifacts, smollm2_gguf, tmp_path, capsys, no_model_loading):
    """identify and train with SmolLM2 on testbed artifacts stop at once, naming both models."""
    gen, labels = testbed_artifacts
    for argv, what in (
        (["identify", "--model", "smollm2", "--input", str(gen), "--out", str(tmp_path / "x.jsonl")], "weights"),
        (["train", "--model", "smollm2", "--input", str(labels), "--method", "cft", "--max-steps", "1",
          "--out", str(tmp_path / "t")], "cft transfer"),
    ):
        code, _, err = run_case(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert "'testbed'" in lines[0] and "'smollm2'" in lines[0] and what in lines[0], lines[0]
    assert not any(tmp_path.iterdir())


def test_issue_cases_through_the_real_cli(tmp_path):
    """A model path that does not exist and an output folder that cannot be created, in a subprocess."""
    for argv, named in (
        (["generate", "--model", "/nonexistent/model", "--data", "testbed:train", "--out", str(tmp_path / "g.jsonl")],
         "--model"),
        (["eval", "--benchmarks", "testbed:test", "--limit", "2", "--out", "/proc/forbidden/x"], "--out"),
    ):
        done = subprocess.run([sys.executable, "-m", "cft", *argv], env=cli_env(), capture_output=True, text=True,
                              timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and named in lines[0], done.stderr
        assert "Traceback" not in done.stdout + done.stderr
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- the table in docs/FORMATS.md


def table(tmp: Path) -> str:
    """Markdown rows: argument, bad value, the commands swept with it, the message (W: a work folder)."""
    import contextlib
    import io
    import re

    rows: dict[tuple[str, str, str], list[str]] = {}
    for i, (label, argv, shown, value) in enumerate(CASES):
        case_dir = tmp / f"case{i}"
        case_dir.mkdir()
        subs = workspace(case_dir)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli.main(fill(argv, subs))
        message = err.getvalue().strip().replace(str(case_dir), "W")
        message = re.sub(r"^cft [a-z -]+: error: argument [^:]+: | \(see cft [a-z -]+ --help\)$", "", message)
        shown_value = fill([value], {k: v.replace(str(case_dir), "W") for k, v in subs.items()})[0]
        rows.setdefault((shown, shown_value or "(empty)", message), []).append(label)
    lines = ["| argument | bad value | commands | message after `cft COMMAND: error: argument ARG:` |",
             "|---|---|---|---|"]
    for (shown, value, message), labels in rows.items():
        lines.append(f"| `{shown}` | `{value}` | {', '.join(labels)} | {message.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)


def test_the_docs_table_is_current(tmp_path, monkeypatch, no_model_loading):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    assert table(tmp_path) in (REPO / "docs" / "FORMATS.md").read_text(), \
        "regenerate the table in docs/FORMATS.md with `python tests/test_cli_errors.py`"


if __name__ == "__main__":
    import tempfile

    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    with tempfile.TemporaryDirectory() as work:
        os.chdir(work)
        print(table(Path(work)))
    print(json.dumps({"cases": len(CASES)}), file=sys.stderr)
