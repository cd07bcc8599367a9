"""The ``cft`` command: a thin layer over the library; each stage module owns its sub-command.

A module listed in COMMANDS defines ``configure_parser(parser)`` and ``run(args) -> int``.
Input errors (``InputError``) print one line naming the file, line and field and exit with code 2.
The commands that read user files (``READS_INPUT``) also take ``--skip-invalid``: bad lines are then
reported one by one, skipped, and counted at the end, the same way for every command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cft.artifacts import InputError, skipping_invalid

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


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen command's module is imported (a fast ``--help``, no heavy imports)."""
    parser = argparse.ArgumentParser(prog="cft", description="Critical Token Fine-tuning (arXiv 2510.10974)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).configure_parser(p)
            if name in READS_INPUT:
                p.add_argument("--skip-invalid", action="store_true",
                               help="skip (and count) invalid input lines instead of stopping at the first")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)

    def report(exc: InputError) -> None:
        print(f"cft {args.command}: skipped invalid input: {exc}", file=sys.stderr)

    try:
        with skipping_invalid(getattr(args, "skip_invalid", False), report) as invalid:
            code = importlib.import_module(args._module).run(args) or 0
    except InputError as exc:
        print(f"cft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if invalid is not None and invalid.errors:
        files = sorted({e.path for e in invalid.errors})
        print(f"cft {args.command}: skipped {len(invalid.errors)} invalid input lines ({', '.join(files)})",
              file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
