"""The ``cft`` command: a thin layer over the library; each stage module owns its sub-command.

A module listed in COMMANDS defines ``configure_parser(parser)`` and ``run(args) -> int``.
Input errors (``InputError``) print one line naming the file, line and field and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cft.artifacts import InputError

COMMANDS = {
    "generate": ("cft.generate", "stage A: decode solutions and grade them"),
    "identify": ("cft.identify", "stage B: label critical tokens by counterfactual decoding"),
    "train": ("cft.train", "stage C: fine-tune with a token-selection method (sft, cft, ...)"),
    "grpo": ("cft.grpo", "RL (GRPO) from a fine-tuned checkpoint, the verifier as reward"),
    "eval": ("cft.evaluate", "stage D: accuracy, pass@k and entropy on benchmarks"),
    "demo": ("cft.demo", "every stage on the built-in testbed, base vs SFT vs CFT"),
    "testbed": ("cft.testbed.cli", "pretrain or export the built-in testbed model"),
    "fetch-model": ("cft.fetch", "download a pretrained model once and cache it (smollm2)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen command's module is imported (a fast ``--help``, no heavy imports)."""
    parser = argparse.ArgumentParser(prog="cft", description="Critical Token Fine-tuning (arXiv 2510.10974)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == command:
            importlib.import_module(module).configure_parser(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args) or 0
    except InputError as exc:
        print(f"cft {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
