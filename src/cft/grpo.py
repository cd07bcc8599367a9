"""`cft grpo`: reinforcement learning (TRL's GRPOTrainer) from a fine-tuned checkpoint.

The paper's RL experiment starts GRPO from the SFT and from the CFT checkpoints and compares how reward
and policy entropy evolve. The reward is the project's own verifier (``cft.verify.grade``: 1 for a
correct final answer, else 0), so it agrees with the labels and the evaluation. Every logged step goes
to ``DIR/grpo_log.jsonl``: reward (= accuracy of the sampled completions, since the reward is the
verdict), its spread, policy entropy, KL, completion length. Generation uses transformers (no vLLM), so
it runs on a CPU with a small model, few generations and short completions.

Checkpoints go to ``DIR/checkpoint-N`` every ``--save-steps``; ``--resume`` continues from the last
complete one (the log keeps the steps up to it). The final policy is saved through the Trainer's own
``save_model`` on every process, which gathers ZeRO-3 / FSDP shards before the main process writes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LOG = "grpo_log.jsonl"
SUMMARY = "grpo_summary.json"
LOGGED = {
    "loss": "loss", "reward": "reward", "reward_std": "reward_std", "rewards/accuracy/mean": "accuracy",
    "entropy": "entropy", "kl": "kl", "completions/mean_length": "completion_length",
    "completions/clipped_ratio": "clipped_ratio", "frac_reward_zero_std": "frac_reward_zero_std",
    "learning_rate": "learning_rate", "grad_norm": "grad_norm",
}


@dataclass
class GRPORunConfig:
    """A GRPO run; saved, resolved, in ``grpo_summary.json``."""

    init: str
    out: str
    data: str = "testbed:train"
    limit: int | None = 1000
    template: str = "chat"
    max_steps: int = 100
    lr: float = 1e-6
    prompts_per_step: int = 4  # per process; each gets num_generations completions
    num_generations: int = 4
    max_completion_length: int = 128
    temperature: float = 1.0
    beta: float = 0.0  # KL coefficient; 0 needs no reference model
    seed: int = 0
    dtype: str = "float32"
    bf16: bool = False
    gradient_checkpointing: bool = False
    save_steps: int = 50
    save_total_limit: int = 1
    resume: bool = False


def prompt_for(tok, question: str, template: str) -> str | list[dict[str, str]]:
    """The prompt as GRPOTrainer takes it, tokenizing to exactly ``cft.prompts.render_ids(tok, question, template)``.

    Chat templates go in conversational form (TRL applies the chat template with a generation prompt);
    plain templates as text (TRL tokenizes it with special tokens, as render_ids does).
    """
    from cft.prompts import QWEN_SYSTEM, template_text

    plain = template_text(template)
    if plain is None and tok.chat_template:
        messages = [{"role": "user", "content": question}]
        if template == "qwen25-math-cot":
            messages.insert(0, {"role": "system", "content": QWEN_SYSTEM})
        return messages
    return (plain or "Question: {question}\nAnswer:").replace("{question}", question)


def accuracy(completions: list, answer: list[str], **kwargs: Any) -> list[float]:
    """GRPO reward: 1.0 when the verifier accepts the completion's final answer, else 0.0."""
    from cft.verify import grade

    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(grade(text, gold)[1]) for text, gold in zip(texts, answer, strict=True)]


def _log_callback(path: Path):
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        """Appends one JSON line per logged step (main process only)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or "reward" not in logs:
                return
            row = {"step": state.global_step, **{short: logs[k] for k, short in LOGGED.items() if k in logs}}
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    return JsonlLog()


def _keep_log_until(path: Path, step: int) -> None:
    """Drop the log rows after ``step`` (all of them for a fresh run): a resumed run logs those steps again."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in rows))


def grpo(cfg: GRPORunConfig, model=None, tok=None) -> dict[str, Any]:
    """Run GRPO from ``cfg.init``; saves the policy (model + tokenizer) and the per-step log in ``cfg.out``."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import GRPOConfig, GRPOTrainer

    from cft.artifacts import ArtifactLock, environment
    from cft.data import load_problems
    from cft.models import load_model
    from cft.train import UsageError, last_checkpoint, process_state

    t0 = time.time()
    state, use_cpu = process_state()
    out = Path(cfg.out)
    lock = ArtifactLock(out) if state.is_main_process else None  # a second run on this --out stops here
    last = last_checkpoint(out)
    if last and not cfg.resume:
        raise UsageError(f"{out} holds checkpoints of an earlier run ({Path(last).name}); pass --resume to continue "
                         "it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG
    if state.is_main_process:
        _keep_log_until(log_path, json.loads((Path(last) / "trainer_state.json").read_text())["global_step"]
                        if last else 0)
    set_seed(cfg.seed)
    if model is None or tok is None:
        model, tok = load_model(cfg.init, cfg.dtype, device=str(state.device))
    problems = load_problems(cfg.data, seed=cfg.seed, limit=cfg.limit)
    dataset = Dataset.from_list(
        [{"prompt": prompt_for(tok, p.question, cfg.template), "answer": p.answer, "id": p.id} for p in problems])
    args = GRPOConfig(
        output_dir=str(out), max_steps=cfg.max_steps, learning_rate=cfg.lr, seed=cfg.seed,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.num_generations, num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, beta=cfg.beta,
        logging_steps=1, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, report_to="none", use_cpu=use_cpu, bf16=cfg.bf16, use_vllm=False,
        activation_checkpointing=cfg.gradient_checkpointing,
        disable_tqdm=not sys.stderr.isatty(), dataloader_pin_memory=not use_cpu,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy], args=args, train_dataset=dataset,
                          processing_class=tok, callbacks=[_log_callback(log_path)])
    result = trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(out))  # on every process: ZeRO-3 and FSDP gather the shards here
    summary: dict[str, Any] = {}
    if trainer.is_world_process_zero():
        tok.save_pretrained(out)
        rows = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
        summary = {
            "config": asdict(cfg), "environment": environment(model), "global_step": result.global_step,
            "problems": len(problems), "final": rows[-1] if rows else None, "seconds": round(time.time() - t0, 1),
            "resumed_from": last,
        }
        (out / SUMMARY).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if rows:
            last = rows[-1]
            print(f"grpo: {result.global_step} steps; last step reward {last.get('reward')}, "
                  f"entropy {last.get('entropy')}; log in {log_path}", flush=True)
    state.wait_for_everyone()
    if lock is not None:
        lock.release()
    return summary


def configure_parser(p: argparse.ArgumentParser) -> None:
    d = GRPORunConfig(init="", out="")
    p.add_argument("--init", required=True, help="starting checkpoint, e.g. the output folder of `cft train`")
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=d.data, help="testbed:<split> or a JSONL file with question and answer")
    p.add_argument("--limit", type=int, default=d.limit, help="number of training problems")
    p.add_argument("--template", default=d.template, help="prompt template (chat, qwen25-math-cot, gsm8k, a file)")
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--prompts-per-step", type=int, default=d.prompts_per_step, help="prompts per process and step")
    p.add_argument("--num-generations", type=int, default=d.num_generations, help="completions per prompt (>= 2)")
    p.add_argument("--max-completion-length", type=int, default=d.max_completion_length)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--beta", type=float, default=d.beta, help="KL coefficient (0: no reference model)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-steps", type=int, default=d.save_steps, help="checkpoint every N steps")
    p.add_argument("--save-total-limit", type=int, default=d.save_total_limit, help="checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")


def run(args: argparse.Namespace) -> int:
    from cft.artifacts import InputError
    from cft.train import UsageError

    names = GRPORunConfig.__dataclass_fields__
    try:
        grpo(GRPORunConfig(**{k: v for k, v in vars(args).items() if k in names}))
    except (UsageError, InputError) as exc:  # InputError: bad data, or another run on this --out
        print(f"cft grpo: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # `python -m cft.grpo ...` / `accelerate launch -m cft.grpo ...`
    _parser = argparse.ArgumentParser(prog="cft grpo", description=__doc__.splitlines()[0])
    configure_parser(_parser)
    sys.exit(run(_parser.parse_args()))
