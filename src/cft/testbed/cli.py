"""``cft testbed pretrain|export``: reproduce the shipped testbed model, or write it as a HF folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cft.models import TESTBED_DIR


def configure_parser(p) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    pre = sub.add_parser("pretrain", help="pretrain the testbed model from a seed (about 15-30 minutes on 2 cores)")
    pre.add_argument("--out", required=True, help="output folder (a standard HF model folder)")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--max-steps", type=int, default=6000)
    exp = sub.add_parser("export", help="copy the shipped testbed model to a standard HF folder")
    exp.add_argument("dir")


def run(args) -> int:
    if args.action == "pretrain":
        from cft.testbed.pretrain import PretrainConfig, pretrain

        record = pretrain(args.out, PretrainConfig(seed=args.seed, max_steps=args.max_steps))
        print(json.dumps({k: record[k] for k in ("steps", "valid_accuracy", "test_accuracy_500", "parameters")}))
        return 0
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in TESTBED_DIR.iterdir():
        shutil.copy2(f, out / f.name)
    print(f"exported the testbed model to {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0
