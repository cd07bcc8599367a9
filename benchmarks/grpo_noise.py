"""Do the policy gradients of different RL steps agree? The measurement behind `cft grpo`'s defaults (issue #24).

At ``--init`` (default: the demo's SFT checkpoint, built as benchmarks/grpo_check.py does), the policy gradients
(plain REINFORCE with a leave-one-out baseline, benchmarks/rloo.py) of ``--batches`` independent steps are taken
for two settings: the old one (4 prompts x 4 completions from 1000 problems) and the defaults (8 x 8 from 64).
The mean pairwise cosine between them is about the share of one step's squared gradient norm that all steps have
in common; near 0, what a step learns about its own problems (and its sampling noise) does not carry to the
problems of other steps. Last line: ``key=value ...``.

    python benchmarks/grpo_noise.py [--init DIR] [--batches 12]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpo_check import ROOT, demo_sft  # noqa: E402
from rloo import gradient_agreement  # noqa: E402

SETTINGS = {"old_4x4_of_1000": dict(limit=1000, prompts_per_step=4, k=4),
            "default_8x8_of_64": dict(limit=64, prompts_per_step=8, k=8)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", help="starting checkpoint (default: the demo's SFT checkpoint, built in --work)")
    p.add_argument("--work", default=str(ROOT / "runs" / "grpo_check"), help="where the demo checkpoint is built")
    p.add_argument("--batches", type=int, default=12, help="independent steps per setting")
    a = p.parse_args()
    init = a.init or demo_sft(Path(a.work))
    out = {}
    for name, setting in SETTINGS.items():
        out[name] = gradient_agreement(init, batches_=a.batches, **setting)
        print(f"{name}: mean pairwise cosine of {a.batches} step gradients {out[name]:.4f}", flush=True)
    print(" ".join(f"cosine_{k}={v:.4f}" for k, v in out.items()) + f" batches={a.batches}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
