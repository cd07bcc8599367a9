"""Command-line options: the parser class, argument validators by option name, and ``--config`` files.

``Parser`` is ``transformers.HfArgumentParser`` (options derived from config dataclass fields, see
``cft.config``) that reports a usage error as one line. ``harden`` gives every option the validator its
name calls for (``VALIDATORS``: models, input files and folders, output paths, counts, the device,
benchmark lists, templates, configs), so a bad value fails while parsing, before any model loads.
``apply_config_file`` sets a command's defaults from a YAML file with the same checks. Used by ``cft.cli``
and by the experiment config (which checks its stage sections the way the stage commands would).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from transformers.hf_argparser import HfArgumentParser

from cft import benchmarks
from cft.config import POSITIONAL, is_internal, is_positional
from cft.data import is_generated, unknown_split
from cft.errors import UserError
from cft.prompts import template_text

KNOWN_MODELS = ("testbed", "smollm2")
# Commands whose --out names a file; every other --out (and ``dir``, ``--cache``) is a folder.
FILE_OUTPUTS = ("generate", "identify", "transfer", "view")


class CommandLineError(UserError):
    """A bad command line; ``main`` prints the message (one line) and returns 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default unless it is None or the help text already explains it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


class Parser(HfArgumentParser):
    """``HfArgumentParser`` (options from dataclass fields, defaults shown in ``--help``) that reports a
    usage error as one line (no usage block) and lets ``main`` return 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise CommandLineError(f"{self.prog}: error: {message} (see {self.prog} --help)")

    def add_configs(self, *types: type) -> None:
        """Add the option fields of these config dataclasses (a field the code fills in is skipped)."""
        for dtype in types:
            self.dataclass_types.append(dtype)
            self._add_dataclass_arguments(dtype)
        names = {f.name for dtype in types for f in dataclasses.fields(dtype)}
        for action in (a for a in self._actions if a.dest in names):  # --max-new-tokens first in usage lines
            action.option_strings.sort(key=lambda o: ("_" in o, not o.startswith("--")))

    def add_field(self, field: dataclasses.Field) -> None:
        """One option from one dataclass field (its type already resolved)."""
        self._parse_dataclass_field(self, field)

    @staticmethod
    def _parse_dataclass_field(parser, field: dataclasses.Field):
        if is_internal(field):
            return
        if is_positional(field):
            _add_positional(parser, field)
            return
        HfArgumentParser._parse_dataclass_field(parser, field)
        if field.default is None and field.type == bool | None:
            # An optional switch (None: decided later, e.g. inherited from Stage A): --x / --no-x.
            action = next(a for a in parser._actions if a.dest == field.name)
            action.nargs, action.const = "?", True
            parser.add_argument(f"--no-{field.name.replace('_', '-')}", f"--no_{field.name}", action="store_false",
                                dest=field.name, help=f"the opposite of --{field.name.replace('_', '-')}")


def _add_positional(parser: argparse.ArgumentParser, field: dataclasses.Field) -> None:
    """A positional argument from a field: the type, choices, default and help ``HfArgumentParser`` derives
    for ``--name``, without the option string (optional, ``nargs='?'``, when the field has a default)."""
    plain = dataclasses.field(default=field.default, default_factory=field.default_factory,
                              metadata={k: v for k, v in field.metadata.items() if k != POSITIONAL})
    plain.name, plain.type = field.name, field.type
    scratch = argparse.ArgumentParser(add_help=False)
    HfArgumentParser._parse_dataclass_field(scratch, plain)
    derived = scratch._actions[-1]
    parser.add_argument(field.name, type=derived.type, choices=derived.choices, help=derived.help,
                        **({} if derived.required else {"nargs": "?", "default": derived.default}))


# ---------------------------------------------------------------- argument validators (argparse ``type=``)


def _fail(message: str):
    raise argparse.ArgumentTypeError(message)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def number(kind: type, low: float, low_inclusive: bool = True, high: float = math.inf,
           high_inclusive: bool = True) -> Callable[[str], Any]:
    """A ``type=`` that parses ``kind`` and requires it inside the given range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            _fail(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value):
            _fail(f"expected a finite number, got {text!r}")
        above = value >= low if low_inclusive else value > low
        below = value <= high if high_inclusive else value < high
        if not (above and below):
            lo = f"{'>=' if low_inclusive else '>'} {_fmt(low)}"
            hi = "" if high == math.inf else f" and {'<=' if high_inclusive else '<'} {_fmt(high)}"
            _fail(f"must be {lo}{hi}, got {text}")
        return value
    parse.bounds = (low, low_inclusive, high, high_inclusive)  # type: ignore[attr-defined] - for the tests
    return parse


def _probe_writable(path: Path, what: str, folder: bool = False) -> None:
    """``path`` can be created: the nearest existing folder on its way is one we can write a file into."""
    parent = path.absolute() if folder else path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        _fail(f"cannot create {what} {path}: {parent} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=parent):  # deleted on close: the probe leaves nothing behind
            pass
    except OSError as exc:
        _fail(f"cannot create {what} {path}: cannot write in {parent} ({exc.strerror or exc})")


def output_file(text: str) -> str:
    path = Path(text).expanduser()
    if path.is_dir():
        _fail(f"{text} is a folder; expected a file path")
    if path.exists() and not os.access(path, os.W_OK):
        _fail(f"{text} is not writable")
    _probe_writable(path, "file")
    return text


def output_dir(text: str) -> str:
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        _fail(f"{text} is a file; expected a folder")
    _probe_writable(path, "folder", folder=True)
    return text


def input_file(text: str) -> str:
    path = Path(text).expanduser()
    if path.is_dir():
        _fail(f"{text} is a folder; expected a file")
    if not path.is_file():
        _fail(f"{text}: no such file")
    return text


def input_dir(text: str) -> str:
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        _fail(f"{text} is a file; expected a folder")
    if not path.is_dir():
        _fail(f"{text}: no such folder")
    return text


def yaml_config(text: str) -> str:
    """An existing YAML file that parses to a mapping (unknown keys are reported by the command)."""
    input_file(text)
    try:
        raw = yaml.safe_load(Path(text).read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        _fail(f"{text}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})")
    except UnicodeDecodeError:
        _fail(f"{text}: not a text file")
    if not isinstance(raw, dict):
        _fail(f"{text}: expected a mapping of config keys at the top level, got {type(raw).__name__}")
    return text


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (or anything that exists here) is a path."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith(".gguf")
            or Path(name).expanduser().exists())


def model_name(name: str) -> str:
    """A known name, a model folder, a .gguf file, or a hub id that is cached or exists on the hub."""
    if name in KNOWN_MODELS:
        if name == "testbed":
            from cft.models import resolve

            try:
                resolve(name)
            except FileNotFoundError as exc:
                _fail(str(exc))
        return name
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            _fail(f"{name}: no such model folder or .gguf file (known names: {', '.join(KNOWN_MODELS)})")
        if path.is_file() and path.suffix != ".gguf":
            _fail(f"{name} is a file; expected a model folder (with config.json) or a .gguf file")
        if path.is_dir() and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            _fail(f"{name} is a folder without config.json or adapter_config.json; not a Hugging Face model "
                  "folder nor a PEFT adapter")
        return name
    return _hub_model(name)


def _hub_model(name: str) -> str:
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    unknown = f"{name}: not a known name ({', '.join(KNOWN_MODELS)}), a local folder or a cached hub model"
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except HFValidationError:
        _fail(f"{name!r} is neither a known name ({', '.join(KNOWN_MODELS)}), a model folder, a .gguf file "
              "nor a valid hub id")
    if isinstance(cached, str):
        return name
    if constants.HF_HUB_OFFLINE:
        _fail(f"{unknown}, and HF_HUB_OFFLINE is set")
    try:
        HfApi().model_info(name, timeout=5)
    except GatedRepoError:
        return name  # it exists; loading it asks for access (reported by the stage in one line)
    except RepositoryNotFoundError:
        _fail(f"{unknown}, and the hub has no such model (or it is private)")
    except Exception as exc:  # noqa: BLE001 - any network failure means the same to the user
        _fail(f"{unknown}, and the hub cannot be reached ({type(exc).__name__})")
    return name


def device_name(text: str) -> str:
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        _fail(f"{text!r} is not a device (cpu, cuda, cuda:N, mps)")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            _fail(f"{text}: this machine has no CUDA device")
        if dev.index is not None and dev.index >= count:
            _fail(f"{text}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        _fail(f"{text}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        _fail(f"{text}: unsupported device type {dev.type!r} (cpu, cuda, cuda:N, mps)")
    return text


def data_spec(text: str) -> str:
    """testbed:<split> or arith:<split>, a benchmark spec (gsm8k:test) or an existing JSONL file."""
    if is_generated(text) and not Path(text).exists():
        if unknown_split(text):
            _fail(f"{text}: {unknown_split(text)}")
        return text
    if benchmarks.parse_spec(text) is not None and not Path(text).exists():
        return text
    path = Path(text).expanduser()
    if path.is_dir():
        _fail(f"{text} is a folder; expected a JSONL file or a spec such as testbed:train or gsm8k:test")
    if not path.is_file():
        _fail(f"{text}: no such file, and not a spec such as testbed:train or gsm8k:test")
    return text


def benchmark_list(text: str) -> str:
    items = [b.strip() for b in text.split(",") if b.strip()]
    if not items:
        _fail("empty benchmark list; name at least one (gsm8k, math500, testbed:test, a JSONL file, ...)")
    for item in items:
        if Path(item).expanduser().is_dir():
            _fail(f"{item} is a folder; expected a benchmark name, spec or JSONL file")
    return text


def template_name(text: str) -> str:
    try:
        template_text(text)
    except (OSError, ValueError) as exc:
        _fail(str(exc))
    return text


POSITIVE_INT = number(int, 1)
VALIDATORS: dict[str, Callable[[str], Any]] = {
    # models
    "model": model_name, "reference": model_name, "init": model_name,
    # inputs
    "input": input_file, "labels": input_file, "config": yaml_config,
    "rescore": input_dir, "run_dir": input_dir, "data_dir": input_dir,
    "data": data_spec, "benchmarks": benchmark_list, "template": template_name, "device": device_name,
    # counts: at least 1 (an explicit --max-steps too; its default -1 means "use --epochs")
    **dict.fromkeys(("limit", "max_steps", "batch_size", "max_new_tokens", "num_shards", "save_steps",
                     "save_total_limit", "logging_steps", "score_batch_size", "lora_r", "lora_alpha",
                     "train_problems", "eval_problems", "prompts_per_step", "max_completion_length",
                     "continuation_cap", "test_size", "per_device_train_batch_size", "gradient_accumulation_steps"),
                    POSITIVE_INT),
    **dict.fromkeys(("n_samples", "shard_index", "rows", "draft"), number(int, 0)),
    "seed": number(int, 0, high=2**32 - 1),
    "k": number(int, 2), "num_generations": number(int, 2),
    **dict.fromkeys(("epochs", "lr", "temperature", "learning_rate", "num_train_epochs"),
                    number(float, 0, low_inclusive=False)),
    **dict.fromkeys(("warmup", "warmup_steps", "weight_decay", "max_grad_norm", "beta"), number(float, 0)),
    "lora_dropout": number(float, 0, high=1, high_inclusive=False),
    "mix_lambda": number(float, 0, high=1),
    "skip_confident": number(float, 0, low_inclusive=False, high=1),
}


# Arguments checked together after parsing: (dests, condition, message).
RELATIONS: list[tuple[tuple[str, ...], Callable[[argparse.Namespace], bool], str]] = [
    (("shard_index", "num_shards"), lambda a: a.shard_index < a.num_shards,
     "argument --shard-index: must be < --num-shards"),
]


def _validator(command: str, dest: str) -> Callable[[str], Any] | None:
    if dest in ("out", "dir", "cache"):
        return output_file if command in FILE_OUTPUTS and dest == "out" else output_dir
    return VALIDATORS.get(dest)


def harden(parser: argparse.ArgumentParser, command: str) -> None:
    """Give every argument of ``parser`` (and its sub-parsers) the validator its name calls for."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                harden(sub, command)
        elif action.nargs in (None, "?", "+", "*") and action.const is None:  # values (one each), not a flag
            check = _validator(command, action.dest)
            if check is not None:
                action.type = check


def leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` itself, or the parsers of its sub-commands (``cft testbed pretrain``)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [leaf for s in subs for p in s.choices.values() for leaf in leaves(p)] if subs else [parser]


def config_path(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (``--config F`` or ``--config=F``), or None."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def option_actions(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    """A command's option actions by dest (positional arguments too: ``run_dir: runs/x`` in a file works)."""
    found: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction) and action.dest not in ("help", "config"):
            found.setdefault(action.dest, []).append(action)
    return found


def yaml_value(action: argparse.Action, value: Any) -> Any:
    """``value`` from a YAML file checked and converted as the command line would (raises ValueError)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or action.const is True:
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value  # for a --no-x action too: the key names the field (store_continuations: false)
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [yaml_value(_Single(action), item) for item in items]
    if value is None or action.type is None:
        converted = value
    else:
        try:
            converted = action.type(str(value))
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc)) from None
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"invalid choice {value!r} (choose from {', '.join(map(str, action.choices))})")
    return converted


class _Single:
    """One element of a list option: the list action's type and choices, one value."""

    def __init__(self, action: argparse.Action):
        self.type, self.choices, self.nargs, self.const = action.type, action.choices, None, None


def chosen(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    """The (sub-)command parser that ``argv`` selects: ``cft testbed pretrain`` -> the pretrain parser."""
    words = iter(a for a in argv if not a.startswith("-"))
    while subs := [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]:
        word = next(words, None)
        if word not in subs[0].choices:
            break
        parser = subs[0].choices[word]
    return parser


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str], path: str) -> set[str]:
    """Set the chosen command's option defaults from the YAML file ``path``; return the keys it set.

    A key is an option's field name (``max_new_tokens``; ``max-new-tokens`` also works). An unknown key or
    a value the option refuses raises ``CommandLineError`` naming the file, line and key.
    """
    leaf = chosen(parser, argv)
    prefix = f"{leaf.prog}: error:"
    try:
        yaml_config(path)
    except argparse.ArgumentTypeError as exc:
        raise CommandLineError(f"{prefix} argument --config: {exc}") from None
    text = Path(path).read_text()
    values = yaml.safe_load(text)
    lines = {key.value: key.start_mark.line + 1 for key, _ in yaml.compose(text).value}
    actions = option_actions(leaf)
    for key, value in values.items():
        where = f"{path}, line {lines.get(key, '?')}, key {key!r}"
        if key == "env":
            if not isinstance(value, dict):
                raise CommandLineError(f"{prefix} {where}: expected a mapping of environment variables")
            os.environ.update({str(k): str(v) for k, v in value.items()})
            continue
        dest = str(key).replace("-", "_")
        if dest not in actions:
            raise CommandLineError(f"{prefix} {where}: not an option of {leaf.prog} (options: "
                                   f"{', '.join(sorted(actions))})")
        for action in actions[dest]:
            try:
                action.default = yaml_value(action, value)
            except ValueError as exc:
                raise CommandLineError(f"{prefix} {where}: {exc}") from None
            action.required = False
            if not action.option_strings and action.nargs is None:  # a positional the file gave: now optional
                action.nargs = "?"
    return {str(k).replace("-", "_") for k in values if k != "env"}


