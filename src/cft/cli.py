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
- every error of ``cft.errors`` (``UserError``: a bad option combination, input, config or experiment file,
  a provenance mismatch, a missing extra) and the other errors a person can fix (``_fixable()``: a file that
  cannot be read or written, a YAML that does not parse, a model the hub does not know) are printed here,
  and only here, as their first line. ``CFT_TRACEBACK=1`` shows the traceback instead.

A ``CftError`` that is not a ``UserError`` (a failed download, a training run that diverged) is printed
the same way with exit code 1.

After a successful run the output's metadata gets the model's fingerprints (``provenance.stamp``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time

import cft
from cft import provenance
from cft.artifacts import InputError, skipping_invalid
from cft.errors import CftError, UserError
from cft.options import RELATIONS, CommandLineError, Parser, apply_config_file, config_path, harden, leaves

COMMANDS = {
    "generate": ("cft.generate", "stage A: decode solutions and grade them"),
    "identify": ("cft.identify", "stage B: label critical tokens by counterfactual decoding"),
    "train": ("cft.train", "stage C: fine-tune with a token-selection method (sft, cft, ...)"),
    "grpo": ("cft.grpo", "RL (GRPO) from a fine-tuned checkpoint, the verifier as reward. The defaults (512 problems, "
                         "8 prompts x 8 completions per step, lr 1e-4, 192 steps) were chosen on the built-in testbed "
                         "(0.9M parameters), where they raise the reward and held-out greedy accuracy; larger models "
                         "usually take a smaller --lr"),
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
# Commands whose YAML config is their positional argument (the experiment file), not ``--config``.
POSITIONAL_CONFIG = ("experiment",)
LOG_LEVELS = ("debug", "info", "warning", "error")


# ---------------------------------------------------------------- parser and main


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen command's module is imported (a fast ``--help``, no heavy imports)."""
    parser = Parser(prog="cft", description="Critical Token Fine-tuning (arXiv 2510.10974)")
    parser.add_argument("--version", action="version", version=f"cft {cft.__version__}")
    parser.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                        help="log messages of this level and above (-v: info)")
    parser.add_argument("-v", "--verbose", dest="log_level", action="store_const", const="info",
                        help="show info-level log messages (same as --log-level info)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            stage = importlib.import_module(module)
            p.add_configs(*getattr(stage, "CONFIGS", ()))
            if hasattr(stage, "configure_parser"):
                stage.configure_parser(p)
            if name not in POSITIONAL_CONFIG:
                for leaf in leaves(p):
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

    return UserError, OSError, yaml.YAMLError, HFValidationError


def parse(argv: list[str]) -> tuple[argparse.Namespace, set[str]]:
    """The parsed command line (``--config`` file applied) and the options it set explicitly.

    Raises ``CommandLineError`` (one line) on any bad option or config key, ``SystemExit`` on --help.
    """
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    from_file = set()
    if command in COMMANDS and command not in POSITIONAL_CONFIG and (path := config_path(argv)) is not None:
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
    except (CftError, *_fixable()) as exc:
        if os.environ.get("CFT_TRACEBACK"):
            raise
        say(f"error: {_one_line(exc)}")
        return exc.exit_code if isinstance(exc, CftError) else 2
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
