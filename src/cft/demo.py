"""``cft demo``: the whole method on the built-in testbed, in minutes on a laptop CPU.

Base model -> D_correct from ``testbed:train`` (stage A) -> critical tokens (stage B) -> SFT and CFT
from the same base with the same data and hyper-parameters (stage C) -> base/SFT/CFT evaluated on
``testbed:test`` and ``testbed:test_ood`` (stage D). Every stage writes its artifact under ``--out``
and is resumable, so a rerun reuses finished work. ``DIR/summary.json`` collects the figures.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cft.artifacts import environment, write_meta


@dataclass
class DemoConfig:
    out: str = "demo"
    model: str = "testbed"
    train_problems: int = 300
    eval_problems: int = 150
    n_samples: int = 8
    temperature: float = 1.0
    epochs: float = 3.0
    lr: float = 3e-4
    batch_size: int = 16
    seed: int = 0


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.time()


def demo(cfg: DemoConfig) -> dict:
    from cft.evaluate import EvalConfig, evaluate
    from cft.generate import DecodeConfig, GenerateConfig, generate
    from cft.identify import IdentifyConfig, identify, print_summary
    from cft.models import load_model
    from cft.train import train, train_configs

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    model, tok = load_model(cfg.model)

    t = _step(f"stage A: greedy solutions of {cfg.train_problems} testbed:train problems")
    gen = generate(GenerateConfig(model=cfg.model, data="testbed:train", out=str(out / "generations.jsonl"),
                                  seed=cfg.seed, limit=cfg.train_problems, decode=DecodeConfig(seed=cfg.seed)),
                   model=model, tok=tok)
    print(f"{gen['correct']} of {gen['n']} correct ({gen['accuracy']:.1%}): D_correct")
    timings["generate"] = time.time() - t

    t = _step("stage B: critical tokens (fast engine)")
    labels = identify(IdentifyConfig(model=cfg.model, input=str(out / "generations.jsonl"),
                                     out=str(out / "labels.jsonl")), model=model, tok=tok)
    print_summary(labels)
    timings["identify"] = time.time() - t

    checkpoints = {"base": cfg.model}
    for method in ("sft", "cft"):
        t = _step(f"stage C: {method} from the base model")
        result = train(*train_configs(model=cfg.model, input=str(out / "labels.jsonl"), method=method,
                                      out=str(out / method), epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                      seed=cfg.seed, resume=True))
        checkpoints[method] = str(out / method)
        print(f"{method}: {result['global_step']} steps, final loss {result['final_loss']:.4f}")
        timings[f"train_{method}"] = time.time() - t

    methods: dict[str, dict] = {}
    for name, ckpt in checkpoints.items():
        t = _step(f"stage D: evaluate {name} on testbed:test and testbed:test_ood")
        m, mtok = (model, tok) if name == "base" else load_model(ckpt)
        metrics = evaluate(EvalConfig(model=ckpt, benchmarks=["testbed:test", "testbed:test_ood"],
                                      out=str(out / "eval" / name), limit=cfg.eval_problems, n_samples=cfg.n_samples,
                                      temperature=cfg.temperature, max_new_tokens=256, stop_at_answer=True,
                                      seed=cfg.seed), model=m, tok=mtok)
        test, ood = metrics["testbed:test"], metrics["testbed:test_ood"]
        methods[name] = {"accuracy": test["accuracy"], "accuracy_ood": ood["accuracy"],
                         "pass_at_k": test["pass_at_k"], "pass_at_k_ood": ood["pass_at_k"],
                         "entropy": test["entropy"], "entropy_ood": ood["entropy"]}
        timings[f"eval_{name}"] = time.time() - t

    summary = {
        "critical_fraction": labels["critical_fraction"],
        "critical_by_kind": {k: v["fraction"] for k, v in labels["critical_by_kind"].items()},
        "critical_counts_by_kind": labels["critical_by_kind"],
        "d_correct": gen["correct"],
        "methods": methods,
        "seconds": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_meta(out / "summary.json.meta.json",
               {"stage": "demo", "config": asdict(cfg), "environment": environment(model)})
    print_table(summary)
    return summary


def print_table(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    methods = summary["methods"]
    ks = list(next(iter(methods.values()))["pass_at_k"])
    table = Table(title="testbed: base vs SFT vs CFT (test = in-distribution, ood = more steps, larger numbers)")
    for col in ["method", "accuracy", "accuracy ood", *[f"pass@{k}" for k in ks], "entropy"]:
        table.add_column(col, justify="right")
    for name, m in methods.items():
        table.add_row(name, f"{m['accuracy']:.3f}", f"{m['accuracy_ood']:.3f}",
                      *[f"{m['pass_at_k'][k]:.3f}" for k in ks], f"{m['entropy']:.3f}")
    console = Console()
    console.print(table)
    kinds = ", ".join(f"{k} {v:.1%}" for k, v in summary["critical_by_kind"].items())
    console.print(f"critical tokens: {summary['critical_fraction']:.1%} of tested response tokens ({kinds})")


def configure_parser(p) -> None:
    defaults = DemoConfig()
    p.add_argument("--out", default=defaults.out, help="output folder (default: %(default)s)")
    p.add_argument("--train-problems", type=int, default=defaults.train_problems)
    p.add_argument("--eval-problems", type=int, default=defaults.eval_problems)
    p.add_argument("--n-samples", type=int, default=defaults.n_samples, help="sampled responses per problem (pass@k)")
    p.add_argument("--epochs", type=float, default=defaults.epochs)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)


def run(args) -> int:
    t0 = time.time()
    demo(DemoConfig(out=args.out, train_problems=args.train_problems, eval_problems=args.eval_problems,
                    n_samples=args.n_samples, epochs=args.epochs, lr=args.lr, seed=args.seed))
    print(f"demo finished in {time.time() - t0:.0f}s; results in {args.out}/summary.json")
    return 0
