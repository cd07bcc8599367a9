"""The ``cft`` command: a thin layer over the library; each stage module owns its sub-command.

A module listed in COMMANDS defines ``run(args) -> int`` and its options: ``CONFIGS``, a tuple of config
dataclasses whose fields become the options (``cft.config``: each option declared once, with its help
text; ``HfArgumentParser`` derives the parser), and optionally ``configure_parser(parser)`` for the few
options that are not config fields (actions such as ``--merge`` or ``--dry-run``). Every stage command
takes ``--config FILE.yaml``: its keys are option names, checked like the command line (an unknown key or
a bad value is reported with the file and line); options on the command line override the file.

Every mistake a person can fix ends the same way: one line on stderr, ``cft COMMAND: error: ...``, and
exit code 2, before any model loads and without writing anything:

- arguments are checked while parsing, by their name across all commands (``VALIDATORS``: models,
  input files and folders, output paths, counts, the device, benchmark lists, templates, configs);
- an artifact read by a stage is checked against ``--model`` (``cft.provenance``; ``--allow-model-mismatch``
  overrides where a command has that check);
- bad input lines raise ``InputError`` naming file, line and field; the commands that read user files
  (``READS_INPUT``) also take ``--skip-invalid``: bad lines are then reported one by one, skipped and counted;
- the other errors a person can fix (``_fixable()``: a file that cannot be read or written, a YAML that
  does not parse, a model the hub does not know) are printed as their first line. ``CFT_TRACEBACK=1``
  shows the traceback instead.

After a successful run the output's metadata gets the model's fingerprints (``provenance.stamp``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers.hf_argparser import HfArgumentParser

import cft
from cft.artifacts import InputError, skipping_invalid
from cft.config import is_internal

COMMANDS = {
    "generate": ("cft.generate", "stage A: decode solutions and grade them"),
    "identify": ("cft.identify", "stage B: label critical tokens by counterfactual decoding"),
    "train": ("cft.train", "stage C: fine-tune with a token-selection method (sft, cft, ...)"),
    "grpo": ("cft.grpo", "RL (GRPO) from a fine-tuned checkpoint, the verifier as reward"),
    "eval": ("cft.evaluate", "stage D: accuracy, pass@k and entropy on benchmarks"),
    "demo": ("cft.demo", "every stage on the built-in testbed, base vs SFT vs CFT"),
    "transfer": ("cft.transfer", "carry critical-token labels onto another model's tokenizer"),
    "testbed": ("cft.testbed.cli", "pretrain or export the built-in testbed model"),
    "fetch-model": ("cft.fetch", "download a pretrained model once and cache it (smollm2)"),
    "view": ("cft.view", "an HTML page of critical tokens, their alternatives and continuations"),
    "experiment": ("cft.experiment", "a grid of methods x seeds (x models x benchmarks), resumable, aggregated"),
    "report": ("cft.report", "report.md and a self-contained report.html with plots"),
}

READS_INPUT = ("generate", "identify", "train", "eval")
KNOWN_MODELS = ("testbed", "smollm2")
# Commands whose --out names a file; every other --out (and ``dir``, ``--cache``) is a folder.
FILE_OUTPUTS = ("generate", "identify", "transfer", "view")
# Commands whose YAML config is their positional argument (the experiment file), not ``--config``.
POSITIONAL_CONFIG = ("experiment",)
LOG_LEVELS = ("debug", "info", "warning", "error")


class CommandLineError(Exception):
    """A bad command line; ``main`` prints the message (one line) and returns 2."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default unless it is None or the help text already explains it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


class _Parser(HfArgumentParser):
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

    @staticmethod
    def _parse_dataclass_field(parser, field: dataclasses.Field):
        if is_internal(field):
            return
        HfArgumentParser._parse_dataclass_field(parser, field)
        if field.default is None and field.type == bool | None:
            # An optional switch (None: decided later, e.g. inherited from Stage A): --x / --no-x.
            action = next(a for a in parser._actions if a.dest == field.name)
            action.nargs, action.const = "?", True
            parser.add_argument(f"--no-{field.name.replace('_', '-')}", f"--no_{field.name}", action="store_false",
                                dest=field.name, help=f"the opposite of --{field.name.replace('_', '-')}")


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
    import yaml

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
    """testbed:<split>, a benchmark spec (gsm8k:test) or an existing JSONL file."""
    from cft import benchmarks

    if text.startswith("testbed:") and not Path(text).exists():
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
    from cft.prompts import template_text

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
    "n_samples": number(int, 0), "shard_index": number(int, 0), "seed": number(int, 0, high=2**32 - 1),
    "k": number(int, 2), "num_generations": number(int, 2),
    **dict.fromkeys(("epochs", "lr", "temperature", "learning_rate", "num_train_epochs"),
                    number(float, 0, low_inclusive=False)),
    **dict.fromkeys(("warmup", "warmup_steps", "weight_decay", "max_grad_norm", "beta"), number(float, 0)),
    "lora_dropout": number(float, 0, high=1, high_inclusive=False),
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


# ---------------------------------------------------------------- parser and main


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen command's module is imported (a fast ``--help``, no heavy imports)."""
    from cft import provenance

    parser = _Parser(prog="cft", description="Critical Token Fine-tuning (arXiv 2510.10974)")
    parser.add_argument("--version", action="version", version=f"cft {cft.__version__}")
    parser.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                        help="log messages of this level and above (-v: info)")
    parser.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="info",
                        help="show info-level log messages (same as --log-level info)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            stage = importlib.import_module(module)
            p.add_configs(*getattr(stage, "CONFIGS", ()))
            if hasattr(stage, "configure_parser"):
                stage.configure_parser(p)
            if name not in POSITIONAL_CONFIG:
                for leaf in _leaves(p):
                    leaf.add_argument("--config", metavar="FILE.yaml", default=None,
                                      help="a YAML file of option values (keys are option names, e.g. "
                                           "max_new_tokens: 128; an 'env' mapping sets environment variables); "
                                           "options given on the command line override it")
            if name in READS_INPUT:
                p.add_argument("--skip-invalid", action="store_true",
                               help="skip (and count) invalid input lines instead of stopping at the first")
            if name in provenance.CHECKS:
                p.add_argument(provenance.ALLOW_FLAG, action="store_true",
                               help="read an artifact made with an incompatible model anyway (recorded in the "
                                    "output's metadata)")
            harden(p, name)
    return parser


def _leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` itself, or the parsers of its sub-commands (``cft testbed pretrain``)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [leaf for s in subs for p in s.choices.values() for leaf in _leaves(p)] if subs else [parser]


def _config_path(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv`` (``--config F`` or ``--config=F``), or None."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _actions(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    """A command's option actions by dest."""
    found: dict[str, list[argparse.Action]] = {}
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "config"):
            found.setdefault(action.dest, []).append(action)
    return found


def _yaml_value(action: argparse.Action, value: Any) -> Any:
    """``value`` from a YAML file checked and converted as the command line would (raises ValueError)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or action.const is True:
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value  # for a --no-x action too: the key names the field (store_continuations: false)
    if action.nargs in ("+", "*"):
        items = value if isinstance(value, list) else [value]
        return [_yaml_value(_Single(action), item) for item in items]
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


def _chosen(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
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
    import yaml

    leaf = _chosen(parser, argv)
    prefix = f"{leaf.prog}: error:"
    try:
        yaml_config(path)
    except argparse.ArgumentTypeError as exc:
        raise CommandLineError(f"{prefix} argument --config: {exc}") from None
    text = Path(path).read_text()
    values = yaml.safe_load(text)
    lines = {key.value: key.start_mark.line + 1 for key, _ in yaml.compose(text).value}
    actions = _actions(leaf)
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
                action.default = _yaml_value(action, value)
            except ValueError as exc:
                raise CommandLineError(f"{prefix} {where}: {exc}") from None
            action.required = False
    return {str(k).replace("-", "_") for k in values if k != "env"}


def _explicit(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests whose option strings appear in ``argv`` (e.g. --model given, not defaulted)."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest for p in sub.choices.values() for a in p._actions if given & set(a.option_strings)}


def _one_line(exc: BaseException) -> str:
    """The error in one line: an OS error as 'file: reason', a YAML error with its position, else line 1."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return f"not valid YAML: {getattr(exc, 'problem', None) or exc} ({where})"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _fixable() -> tuple[type[BaseException], ...]:
    """Error types a person fixes by changing the command line or a file, not by fixing cft."""
    import yaml
    from huggingface_hub.errors import HFValidationError

    from cft.provenance import ProvenanceError

    return InputError, ProvenanceError, OSError, yaml.YAMLError, HFValidationError


def parse(argv: list[str]) -> tuple[argparse.Namespace, set[str]]:
    """The parsed command line (``--config`` file applied) and the options it set explicitly.

    Raises ``CommandLineError`` (one line) on any bad option or config key, ``SystemExit`` on --help.
    """
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    from_file = set()
    if command in COMMANDS and command not in POSITIONAL_CONFIG and (path := _config_path(argv)) is not None:
        from_file = apply_config_file(parser, argv, path)
    args = parser.parse_args(argv)
    for dests, holds, message in RELATIONS:
        if all(hasattr(args, d) for d in dests) and not holds(args):
            raise CommandLineError(f"cft {args.command}: error: {message} (see cft {args.command} --help)")
    return args, _explicit(parser, argv) | from_file


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, explicit = parse(argv)
    except CommandLineError as exc:
        print(exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return _run(args, explicit)


def _run(args: argparse.Namespace, explicit: set[str]) -> int:
    from cft import provenance

    name = args.command

    def say(line: str) -> None:
        print(f"cft {name}: {line}", file=sys.stderr)

    def report(exc: InputError) -> None:
        say(f"skipped invalid input: {exc}")

    started = time.time()
    try:
        notes, override = provenance.check(name, args, explicit)
        for line in notes:
            say(line)
        with skipping_invalid(getattr(args, "skip_invalid", False), report) as invalid:
            code = importlib.import_module(args._module).run(args) or 0
    except _fixable() as exc:
        if os.environ.get("CFT_TRACEBACK"):
            raise
        say(f"error: {_one_line(exc)}")
        return 2
    if invalid is not None and invalid.errors:
        files = sorted({e.path for e in invalid.errors})
        say(f"skipped {len(invalid.errors)} invalid input lines ({', '.join(files)})")
    if code == 0 and (target := provenance.output_meta(name, args)) is not None:
        try:
            provenance.stamp(*target, override=override, since=started - 1)
        except (OSError, ValueError) as exc:
            say(f"warning: could not record the model's fingerprints in {target[0]}: {_one_line(exc)}")
    return code


if __name__ == "__main__":
    sys.exit(main())
