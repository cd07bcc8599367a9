"""``cft testbed pretrain|export``: reproduce the shipped testbed model, or write it as a HF folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cft.models import TESTBED_DIR
from cft.testbed.pretrain import PretrainConfig, pretrain


def configure_parser(p) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    pre = sub.add_parser("pretrain", help="pretrain the testbed model from a seed (about 15-30 minutes on 2 cores)")
    pre.add_argument("--out", required=True, help="output folder (a standard HF model folder)")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--max-steps", type=int, default=6000)
    pre.add_argument("--test-size", type=int, default=None,
                     help="testbed:test problems scored at the end (default: 500, as for the shipped model)")
    exp = sub.add_parser("export", help="copy the shipped testbed model to a standard HF folder")
    exp.add_argument("dir")


def run(args) -> int:
    if args.action == "pretrain":
        sizes = {} if args.test_size is None else {"test_size": args.test_size}
        cfg = PretrainConfig(seed=args.seed, max_steps=args.max_steps, **sizes)
        record = pretrain(args.out, cfg)
        keys = ("steps", "valid_accuracy", f"test_accuracy_{cfg.test_size}", "parameters")
        print(json.dumps({k: record[k] for k in keys}))
        return 0
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in TESTBED_DIR.iterdir():
        shutil.copy2(f, out / f.name)
    print(f"exported the testbed model to {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0
