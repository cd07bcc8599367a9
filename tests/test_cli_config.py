"""``--config FILE.yaml`` on every stage command: file values, command-line overrides, checked keys.

Each row of ``CASES`` runs one command's parser with a YAML file and one override, and checks the
resolved values: the file sets options (required ones too), the command line wins over the file.
"""

from __future__ import annotations

import argparse
import os

import pytest
import yaml

from cft import cli, options

# command words, YAML mapping, command-line override, expected values of the parsed namespace
# ({tmp}: the test's folder, {file}: a JSONL file in it, {dir}: a folder in it)
CASES = {
    "identify": (["identify"], {"model": "testbed", "input": "{file}", "out": "{tmp}/l.jsonl", "k": 5,
                                "max_new_tokens": 32, "stop_at_answer": False, "store_continuations": False},
                 ["--k", "4"], {"k": 4, "max_new_tokens": 32, "stop_at_answer": False, "store_continuations": False,
                                "model": "testbed"}),
    "generate": (["generate"], {"model": "testbed", "data": "testbed:train", "out": "{tmp}/g.jsonl",
                                "max_new_tokens": 32, "stop_at_answer": False, "batch_size": 8, "dtype": "auto",
                                "attn_implementation": "eager"},
                 ["--batch-size", "4"], {"batch_size": 4, "max_new_tokens": 32, "stop_at_answer": False,
                                         "dtype": "auto", "attn_implementation": "eager", "data": "testbed:train"}),
    "eval": (["eval"], {"model": "testbed", "benchmarks": ["testbed:test", "testbed:test_ood"], "out": "{tmp}/e",
                        "n_samples": 2, "stop_at_answer": True, "template": "chat"},
             ["--n-samples", "3"], {"n_samples": 3, "benchmarks": ["testbed:test", "testbed:test_ood"],
                                    "stop_at_answer": True, "template": "chat", "model": "testbed"}),
    "transfer": (["transfer"], {"input": "{file}", "model": "testbed", "out": "{tmp}/x.jsonl", "template": "chat"},
                 ["--template", "gsm8k"], {"template": "gsm8k", "input": "{file}", "model": "testbed"}),
    "view": (["view"], {"labels": "{file}", "out": "{tmp}/v.html", "limit": 3},
             ["--limit", "2"], {"limit": 2, "labels": "{file}", "out": "{tmp}/v.html", "model": None}),
    "fetch-model": (["fetch-model"], {"name": "smollm2", "cache": "{tmp}/c"},
                    ["--cache", "{tmp}/d"], {"name": "smollm2", "cache": "{tmp}/d"}),
    "report": (["report"], {"run_dir": "{tmp}"}, ["{dir}"], {"run_dir": "{dir}"}),
    "testbed pretrain": (["testbed", "pretrain"], {"out": "{tmp}/p", "max_steps": 3, "test_size": 4},
                         ["--seed", "1"], {"out": "{tmp}/p", "max_steps": 3, "test_size": 4, "seed": 1}),
    "testbed export": (["testbed", "export"], {"dir": "{tmp}/x"}, ["{tmp}/y"], {"dir": "{tmp}/y"}),
    # TRL's own training arguments from the file (gradient_accumulation_steps, report_to), cft's --lr alias wins
    "train": (["train"], {"model": "testbed", "input": "{file}", "out": "{tmp}/t", "method": "sft", "lora": True,
                          "gradient_accumulation_steps": 4, "learning_rate": 1e-4, "report_to": "tensorboard",
                          "lr_scheduler_type": "constant", "activation_checkpointing": True},
              ["--lr", "3e-4"], {"learning_rate": 3e-4, "gradient_accumulation_steps": 4, "report_to": "tensorboard",
                                 "lr_scheduler_type": "constant", "activation_checkpointing": True, "method": "sft",
                                 "lora": True, "model": "testbed", "out": "{tmp}/t"}),
    "grpo": (["grpo"], {"init": "testbed", "out": "{tmp}/r", "num_generations": 2, "beta": 0.04, "max_steps": 3,
                        "learning_rate": 1e-5, "push_to_hub": False, "hub_model_id": "me/policy"},
             ["--learning-rate", "2e-6"], {"learning_rate": 2e-6, "num_generations": 2, "beta": 0.04, "max_steps": 3,
                                           "hub_model_id": "me/policy", "init": "testbed"}),
}


def _leaf_commands():
    """Every command (and sub-command) the ``cft`` parser has, as word lists."""
    out = []
    for command in (c for c in cli.COMMANDS if c not in cli.POSITIONAL_CONFIG):  # experiment: its YAML is positional
        parser = cli.build_parser(command)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
        leaves = options.leaves(sub)
        out += [[command] if leaf is sub else [command, leaf.prog.split()[-1]] for leaf in leaves]
    return out


def _fill(value, tmp_path):
    if isinstance(value, str):
        return value.format(tmp=tmp_path, file=tmp_path / "in.jsonl", dir=tmp_path / "adir")
    return value


def _write(tmp_path, mapping) -> str:
    (tmp_path / "in.jsonl").write_text('{"a": 1}\n')
    (tmp_path / "adir").mkdir(exist_ok=True)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({k: _fill(v, tmp_path) for k, v in mapping.items()}, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("words", _leaf_commands(), ids=" ".join)
def test_every_stage_command_takes_a_config_file(words):
    parser = cli.build_parser(words[0])
    leaf = options.chosen(parser, words)
    assert "--config" in leaf._option_string_actions, f"cft {' '.join(words)} has no --config"


@pytest.mark.parametrize("words", _leaf_commands(), ids=" ".join)
def test_no_command_option_shadows_a_global_one(words):
    """A command's option with the dest of a global one (TRL's log_level vs ``cft --log-level``) would overwrite
    it in the parsed namespace."""
    parser = cli.build_parser(words[0])
    top = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
    assert not top & {a.dest for a in options.chosen(parser, words)._actions}


@pytest.mark.parametrize("command", sorted(CASES))
def test_config_file_and_override(command, tmp_path):
    words, mapping, override, expected = CASES[command]
    path = _write(tmp_path, mapping)
    args, explicit = cli.parse([*words, "--config", path, *(_fill(word, tmp_path) for word in override)])
    for key, value in expected.items():
        assert getattr(args, key) == _fill(value, tmp_path), key
    assert set(mapping) <= explicit  # a value from the file counts as given (provenance checks use this)


def test_unknown_key_names_file_line_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("k: 3\nmax_new_tokns: 32\n")
    with pytest.raises(options.CommandLineError, match=r"c\.yaml, line 2, key 'max_new_tokns': not an option"):
        cli.parse(["identify", "--config", str(path)])


def test_bad_value_is_checked_like_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("k: 0\n")
    with pytest.raises(options.CommandLineError, match=r"line 1, key 'k': must be >= 2, got 0"):
        cli.parse(["identify", "--config", str(path)])
    path.write_text("engine: turbo\n")
    with pytest.raises(options.CommandLineError, match=r"key 'engine': .*invalid choice"):
        cli.parse(["identify", "--config", str(path)])
    path.write_text("include_eos: maybe\n")
    with pytest.raises(options.CommandLineError, match=r"key 'include_eos': expected true or false"):
        cli.parse(["identify", "--config", str(path)])


def test_env_mapping_sets_environment_variables(tmp_path, monkeypatch):
    monkeypatch.delenv("CFT_TEST_FROM_CONFIG", raising=False)
    (tmp_path / "in.jsonl").write_text('{"a": 1}\n')
    path = tmp_path / "c.yaml"
    path.write_text(f"env:\n  CFT_TEST_FROM_CONFIG: yes-it-is\nmodel: testbed\ninput: {tmp_path / 'in.jsonl'}\n"
                    f"out: {tmp_path / 'o.jsonl'}\n")
    args, _ = cli.parse(["identify", "--config", str(path)])
    assert os.environ["CFT_TEST_FROM_CONFIG"] == "yes-it-is"
    assert args.model == "testbed"


def test_required_options_still_required_without_a_file():
    with pytest.raises(options.CommandLineError, match="required"):
        cli.parse(["identify", "--model", "testbed"])


def test_generate_nests_its_decoding_options(tmp_path):
    from cft.decoding.api import DecodeConfig
    from cft.generate import config_from_args

    args, _ = cli.parse(["generate", "--model", "testbed", "--data", "testbed:train", "--out",
                         str(tmp_path / "g.jsonl"), "--seed", "3", "--stop-at-answer", "--max-new-tokens", "16"])
    cfg = config_from_args(args)
    assert cfg.seed == 3 and cfg.decode == DecodeConfig(max_new_tokens=16, stop_at_answer=True, seed=3)


def test_a_model_must_be_named(tmp_path, capsys):
    """No silent default model: generate refuses at parse time, eval unless it only rescores."""
    with pytest.raises(cli.CommandLineError, match="required: --model"):
        cli.parse(["generate", "--data", "testbed:train", "--out", str(tmp_path / "g.jsonl")])
    assert cli.main(["eval", "--benchmarks", "testbed:test", "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.strip() == "cft eval: error: --model required (or --rescore DIR)"
    assert not any(tmp_path.iterdir())


def test_eval_benchmarks_space_or_comma_separated(tmp_path):
    from cft.evaluate import config_from_args

    args, _ = cli.parse(["eval", "--model", "testbed", "--out", str(tmp_path / "e"), "--benchmarks",
                         "testbed:test,testbed:test_ood", "testbed:test"])
    assert config_from_args(args).benchmarks == ["testbed:test", "testbed:test_ood"]


@pytest.mark.parametrize("argv", [["generate", "--data", "testbed:train", "--out", "{tmp}/g.jsonl"],
                                  ["eval", "--benchmarks", "testbed:test", "--out", "{tmp}/e"]], ids=lambda a: a[0])
def test_dtype_auto_and_attention_reach_load_model(argv, tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module(cli.COMMANDS[argv[0]][0])
    seen = []

    class Loaded(Exception):
        pass

    def load_model(*args):
        seen.append(args)
        raise Loaded

    monkeypatch.setattr(module, "load_model", load_model)
    args, _ = cli.parse([*(_fill(w, tmp_path) for w in argv), "--model", "testbed", "--dtype", "auto",
                         "--attn-implementation", "eager", "--device", "cpu"])
    with pytest.raises(Loaded):
        module.run(args)
    assert seen == [("testbed", "auto", "cpu", "eager")]
