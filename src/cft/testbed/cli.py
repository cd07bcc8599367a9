"""``cft testbed pretrain|export``: reproduce the shipped testbed model, or write it as a HF folder.

Each sub-command's options are config fields (``SUBCOMMANDS``): ``pretrain`` exposes the three
``PretrainConfig`` fields a reproduction may change (the rest stay the shipped model's recipe).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from cft.config import from_args, option
from cft.models import TESTBED_DIR
from cft.testbed.pretrain import PretrainConfig, pretrain


@dataclass
class PretrainOptions:
    """``cft testbed pretrain``: where to write the model and the recipe fields a run may change."""

    out: str = option(help="output folder (a standard HF model folder)")
    seed: int = option(PretrainConfig.seed, "the seed of the initialisation and of the training problems")
    max_steps: int = option(PretrainConfig.max_steps, "stop after this many steps if the target band is not reached")
    test_size: int = option(PretrainConfig.test_size, "testbed:test problems scored at the end (the "
                                                          "shipped model's number by default)")


@dataclass
class ExportOptions:
    """``cft testbed export DIR``."""

    dir: str = option(help="output folder (a standard HF model folder)", positional=True)


SUBCOMMANDS = {
    "pretrain": (PretrainOptions, "pretrain the testbed model from a seed (about 15-30 minutes on 2 cores)"),
    "export": (ExportOptions, "copy the shipped testbed model to a standard HF folder"),
}


def configure_parser(p) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    for name, (options, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text).add_configs(options)


def run(args) -> int:
    if args.action == "pretrain":
        opts = from_args(PretrainOptions, args)
        cfg = PretrainConfig(seed=opts.seed, max_steps=opts.max_steps, test_size=opts.test_size)
        record = pretrain(opts.out, cfg)
        keys = ("steps", "valid_accuracy", f"test_accuracy_{cfg.test_size}", "parameters")
        print(json.dumps({k: record[k] for k in keys}))
        return 0
    out = Path(from_args(ExportOptions, args).dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in TESTBED_DIR.iterdir():
        shutil.copy2(f, out / f.name)
    print(f"exported the testbed model to {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0
