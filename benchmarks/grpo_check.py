"""Does `cft grpo` with its defaults raise the reward it optimizes? And does the independent RLOO loop agree?

From the demo's SFT checkpoint (``--init``; by default built here with the demo preset's SFT cells:
``cft experiment configs/experiment/demo.yaml methods=[sft] ...`` into ``WORK/demo``), for each seed:

1. `cft grpo` with its defaults (seed = the seed) -> per seed the mean reward of the first and of the last 20%
   of the logged steps; ``reward_gain_min`` is the smallest last - first over seeds. And per seed the mean
   reward of each pass over the training problems (every pass draws the same problems): ``last_pass_gain`` is
   the last complete pass minus the one before, mean over seeds with its 95% t interval (``_lo``, ``_hi``): an
   interval around 0 says the reward had stopped rising.
2. greedy accuracy on the first ``--eval-limit`` testbed:test problems, before (the SFT checkpoint) and after
   (each seed's policy); ``greedy_gain`` is after - before, with a paired bootstrap interval over problems and
   seeds (``greedy_gain_lo``, ``greedy_gain_hi``).
3. the plain-torch RLOO loop of benchmarks/rloo.py at the same settings (problems, prompts per step, completions
   per prompt, steps, learning rate, completion length, temperature) -> ``rloo_reward_gain_min``.

Everything lands in ``--work`` and a finished part is reused (delete the folder to start over). The last line of
output is ``key=value ...``. Timings are not printed: they depend on the machine and its load.

    python benchmarks/grpo_check.py                       # 3 seeds, 200 test problems
    python benchmarks/grpo_check.py --init DIR --seeds 0  # any checkpoint, one seed
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rloo import rloo  # noqa: E402  (benchmarks/rloo.py)

from cft.artifacts import load_records  # noqa: E402
from cft.evaluate import SAMPLES, EvalConfig, evaluate, problem_scores  # noqa: E402
from cft.grpo import LOG, SUMMARY, CFTGRPOConfig, GRPORunConfig, grpo, grpo_configs, steps_per_pass  # noqa: E402
from cft.stats import paired_bootstrap, pass_means, summarize  # noqa: E402

BENCHMARK = "testbed:test"


def demo_sft(work: Path) -> str:
    """The demo preset's SFT checkpoint (stage A and SFT training of seed 0), built once in ``work/demo``."""
    out = work / "demo"
    ckpt = out / "testbed" / "sft" / "seed0" / "train"
    if not (ckpt / "config.json").is_file():
        cmd = [sys.executable, "-m", "cft", "experiment", str(ROOT / "configs" / "experiment" / "demo.yaml"),
               f"out={out}", "methods=[sft]", "evaluate_base=false", f'benchmarks=["{BENCHMARK}"]',
               "eval.limit=20", "eval.n_samples=0"]
        print("building the demo's SFT checkpoint:", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
    return str(ckpt)


def greedy(model: str, out: Path, limit: int) -> dict[str, float]:
    """Per-problem greedy correctness on the first ``limit`` problems of BENCHMARK (decoded once per folder)."""
    cfg = EvalConfig(model=model, benchmarks=[BENCHMARK], out=str(out), limit=limit, n_samples=0,
                     max_new_tokens=256, stop_at_answer=True, device="cpu")
    if not (out / SAMPLES).is_file():
        evaluate(cfg)
    return problem_scores(load_records(out / SAMPLES, "samples"))[BENCHMARK]["accuracy"]


def ends(rewards: list[float]) -> tuple[float, float]:
    """Mean reward of the first and of the last 20% of the steps."""
    n = max(1, len(rewards) // 5)
    return sum(rewards[:n]) / n, sum(rewards[-n:]) / n


def fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init", help="starting checkpoint (default: the demo's SFT checkpoint, built in --work)")
    p.add_argument("--work", default=str(ROOT / "runs" / "grpo_check"), help="output folder (reused)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated GRPO / RLOO seeds")
    p.add_argument("--eval-limit", type=int, default=200, help="testbed:test problems for greedy accuracy")
    p.add_argument("--resamples", type=int, default=10_000, help="paired bootstrap resamples")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    init = a.init or demo_sft(work)
    seeds = [int(s) for s in a.seeds.split(",")]
    run, args = GRPORunConfig(init=init, out=""), CFTGRPOConfig()
    print(f"cft grpo defaults: limit {run.limit}, lr {args.learning_rate}, steps {args.max_steps}, "
          f"{args.prompts_per_step} prompts x {args.num_generations} completions per step, temperature "
          f"{args.temperature}, completions up to {args.max_completion_length} tokens", flush=True)

    before = greedy(init, work / "eval_init", a.eval_limit)
    after, gains, rloo_gains, pass_gains = {}, [], [], []
    for seed in seeds:
        out = work / f"grpo_seed{seed}"
        if not (out / SUMMARY).is_file():
            grpo(*grpo_configs(init=init, out=str(out), seed=seed))
        rewards = [json.loads(line)["reward"] for line in (out / LOG).read_text().splitlines()]
        first, last = ends(rewards)
        gains.append(last - first)
        summary = json.loads((out / SUMMARY).read_text())
        passes = pass_means(rewards, summary.get("steps_per_pass") or steps_per_pass(summary["problems"], args))
        if len(passes) >= 2:
            pass_gains.append(passes[-1] - passes[-2])
        after[seed] = greedy(str(out), work / f"eval_seed{seed}", a.eval_limit)
        acc = sum(after[seed].values()) / len(after[seed])
        print(f"seed {seed}: cft grpo reward {first:.3f} -> {last:.3f} ({len(rewards)} steps; per pass "
              f"{', '.join(f'{m:.3f}' for m in passes)}); greedy {sum(before.values()) / len(before):.3f} -> "
              f"{acc:.3f}", flush=True)

        log_path = work / f"rloo_seed{seed}.jsonl"
        if log_path.is_file():
            ref = [json.loads(line)["reward"] for line in log_path.read_text().splitlines()]
        else:
            ref = rloo(init, data=run.data, limit=run.limit, steps=args.max_steps, lr=args.learning_rate,
                       prompts_per_step=args.prompts_per_step, k=args.num_generations,
                       max_new_tokens=args.max_completion_length, temperature=args.temperature, seed=seed)
            log_path.write_text("".join(json.dumps({"step": i + 1, "reward": r}) + "\n" for i, r in enumerate(ref)))
        first, last = ends(ref)
        rloo_gains.append(last - first)
        print(f"seed {seed}: rloo reward {first:.3f} -> {last:.3f} ({len(ref)} steps)", flush=True)

    boot = paired_bootstrap(after, {s: before for s in seeds}, resamples=a.resamples)
    plateau = summarize(pass_gains)
    lo, hi = plateau["ci95"] or (None, None)
    before_acc = sum(before.values()) / len(before)
    print(" ".join([
        f"seeds={len(seeds)}", f"steps={args.max_steps}",
        f"reward_gain_min={min(gains):.3f}", f"reward_gain_mean={sum(gains) / len(gains):.3f}",
        f"last_pass_gain={fmt(plateau['mean'])}", f"last_pass_gain_lo={fmt(lo)}", f"last_pass_gain_hi={fmt(hi)}",
        f"greedy_before={before_acc:.3f}", f"greedy_after={before_acc + boot['mean']:.3f}",
        f"greedy_gain={boot['mean']:.3f}", f"greedy_gain_lo={boot['ci'][0]:.3f}", f"greedy_gain_hi={boot['ci'][1]:.3f}",
        f"rloo_reward_gain_min={min(rloo_gains):.3f}", f"rloo_reward_gain_mean={sum(rloo_gains) / len(rloo_gains):.3f}",
        f"problems={boot['n_problems']}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
