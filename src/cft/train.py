"""Stage C: fine-tune on a labels file with one token-selection method (sft, cft, random, ...).

Training runs TRL's ``SFTTrainer`` on a pre-tokenized dataset (``input_ids``, ``labels``, ``weights``
from ``cft.selection``), used exactly as given: dataset preparation is skipped, so TRL neither
re-tokenizes, truncates nor re-masks it. One loss serves every method:

    loss = sum_t w_t * l_t / (sum of w_t over the optimizer step),   l_t = -log p(y_t)  (x sg(p) for dft)

with the sum over all micro-batches of the step and all processes (gradient accumulation and data
parallelism give the same loss as one big batch). With ``loss_norm="step"`` w_t = 1 on every trained
token: the mean over the step's trained tokens (CFT's N_crit). With ``loss_norm="sequence"`` w_t = 1/n_i:
the mean over sequences of each sequence's mean. Log-probabilities come from TRL's fused LM head, which
scores only the labelled positions (cheap for sparse CFT masks).

Runs under ``accelerate launch`` unchanged. A non-finite loss stops training, naming the step; the
checkpoints in ``--out`` are only ever written from finite weights. ``--resume`` continues from the last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cft.selection import LOSS_NORMS, METHOD_HELP, METHODS, check_vocab, format_statistics, read_labels, select

SUMMARY = "train_summary.json"


@dataclass
class TrainConfig:
    """Everything that determines a training run; saved, resolved, in ``train_summary.json``."""

    model: str
    input: str
    method: str = "cft"
    out: str = "runs/train"
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 3.0
    lr: float = 1e-5
    batch_size: int = 8  # per process
    grad_accum: int = 1
    seed: int = 0
    loss_norm: str = "step"
    lr_scheduler: str = "cosine"
    warmup: float = 0.03  # a fraction of the steps if < 1, else a step count
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: str = "float32"  # the dtype the weights are loaded in
    bf16: bool = False  # bfloat16 autocast (mixed precision)
    gradient_checkpointing: bool = False
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["all-linear"])
    save_merged: bool = False
    resume: bool = False
    save_steps: int = 200
    save_total_limit: int = 1
    logging_steps: int = 1
    reference: str | None = None  # rho1's reference model; None: the starting model
    score_batch_size: int = 4  # batch size of the scoring passes of entropy and rho1


class UsageError(ValueError):
    """A configuration a person can fix; the CLI prints it and exits with code 2."""


class NonFiniteLossError(RuntimeError):
    """Training met a NaN/inf loss (or non-finite weights at a save) and stopped."""

    def __init__(self, step: int, what: str, checkpoint: str | None):
        self.step, self.checkpoint = step, checkpoint
        keep = f"the last good checkpoint is {checkpoint}" if checkpoint else "no checkpoint was saved before it"
        super().__init__(f"{what} at step {step}; training stopped and {keep}")


def weighted_loss(log_probs: torch.Tensor, weights: torch.Tensor, normalizer: torch.Tensor | float,
                  dft: bool = False) -> torch.Tensor:
    """sum_t w_t * l_t / normalizer, with l_t = -log p_t, or -sg(p_t) log p_t for DFT.

    ``log_probs`` and ``weights`` are aligned (already shifted): both zero where the label is -100.
    """
    per_token = -log_probs * weights
    if dft:
        per_token = per_token * log_probs.detach().exp()
    return per_token.sum() / torch.as_tensor(normalizer, dtype=per_token.dtype, device=per_token.device).clamp(
        min=1e-12)


def last_checkpoint(out: str | os.PathLike) -> str | None:
    """The newest COMPLETE ``checkpoint-N`` folder in ``out``, or None.

    The Trainer writes ``trainer_state.json`` last (after weights, optimizer, scheduler and RNG states), so
    a folder without it is a save cut short by a kill; transformers' ``get_last_checkpoint`` would pick it
    and the resume would fail or load half-written weights. Such folders are reported and skipped.
    """
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    out = Path(out)
    if not out.is_dir():
        return None
    found = []
    for d in out.iterdir():
        step = d.name.removeprefix(PREFIX_CHECKPOINT_DIR + "-")
        if d.is_dir() and d.name.startswith(PREFIX_CHECKPOINT_DIR + "-") and step.isdigit():
            found.append((int(step), d))
    for _, d in sorted(found, reverse=True):
        if (d / TRAINER_STATE_NAME).is_file():
            return str(d)
        print(f"warning: {d} is incomplete (a save cut short); resuming from an earlier checkpoint", file=sys.stderr,
              flush=True)
    return None


def _trainer_class():
    """Built lazily so that importing cft.train (e.g. for the CLI's --help) does not import TRL."""
    from trl import SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from trl.trainer.utils import pad

    @dataclass
    class WeightedCollator(DataCollatorForLanguageModeling):
        """TRL's collator (right padding, labels padded with -100) plus the per-token weights (padded with 0)."""

        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = super().torch_call(examples)
            batch["weights"] = pad([torch.tensor(e["weights"], dtype=torch.float32) for e in examples],
                                   padding_value=0.0, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)
            return batch

    class SelectiveTrainer(SFTTrainer):
        """SFTTrainer with the weighted, step-normalised loss above and a NaN/inf guard."""

        loss_is_scaled_for_ga = True  # the loss is already divided by the whole step's weight

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["input_ids", "labels", "weights"]

        def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
            """The summed weight of the optimizer step over all micro-batches and processes."""
            if not batch_samples:
                return None
            total = sum(b["weights"][:, 1:].sum() for b in batch_samples).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                total = self.accelerator.gather(total.reshape(1)).sum()
            return total

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            weights = inputs.pop("weights")[:, 1:]
            if self.aux_loss_enabled:  # MoE models: TRL's load-balancing term, added as SFTTrainer adds it
                inputs["output_router_logits"] = True
            outputs = model(**inputs, use_cache=False, fused_lm_head=True)
            normalizer = weights.sum() if num_items_in_batch is None else num_items_in_batch
            loss = weighted_loss(outputs.log_probs, weights, normalizer, dft=self.args.loss_type == "dft")
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages the gradients over processes
            if self.aux_loss_enabled:
                steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
                loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            mode = "train" if model.training else "eval"
            gather = self.accelerator.gather_for_metrics
            n = gather(outputs.label_mask.sum()).sum()
            if n > 0:
                self._metrics[mode]["entropy"].append((gather(outputs.entropy.detach().sum()).sum() / n).item())
                self._metrics[mode]["mean_token_accuracy"].append((gather(outputs.is_top1.sum()).sum() / n).item())
            if self.aux_loss_enabled:
                self._metrics[mode]["aux_loss"].append(gather(outputs.aux_loss.detach()).mean().item())
            return (loss, outputs) if return_outputs else loss

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not bool(self.accelerator.gather(torch.isfinite(loss).float().reshape(1)).all()):
                raise NonFiniteLossError(self.state.global_step + 1, "non-finite loss",
                                         last_checkpoint(self.args.output_dir))
            return loss

        def _save_checkpoint(self, model, trial):
            """Refuses to checkpoint non-finite weights; each process checks its own shard (FSDP), all agree."""
            local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]
            bad = torch.tensor([float(not all(bool(torch.isfinite(p).all()) for p in local))], device=self.args.device)
            if bool(self.accelerator.gather(bad).sum() > 0):
                raise NonFiniteLossError(self.state.global_step, "non-finite weights",
                                         last_checkpoint(self.args.output_dir))
            super()._save_checkpoint(model, trial)

    return SelectiveTrainer, WeightedCollator


def process_state():
    """accelerate's process state and whether it runs on CPU.

    Without CUDA, processes started by torchrun or ``accelerate launch --multi_gpu`` must ask accelerate for
    CPU explicitly, or each would train alone instead of joining a gloo process group.
    """
    from accelerate import PartialState

    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=use_cpu)
    if use_cpu and state.num_processes == 1 and "MASTER_ADDR" in os.environ and "LOCAL_RANK" not in os.environ:
        print("warning: running as ONE process: `accelerate launch --cpu --num_processes N` starts a single process "
              "unless given --mpirun_hostfile; for N processes on CPU use `accelerate launch --multi_gpu "
              "--num_processes N` or `torchrun --nproc_per_node N`", file=sys.stderr, flush=True)
    return state, use_cpu


def _check(cfg: TrainConfig) -> None:
    if cfg.method not in METHODS:
        raise UsageError(f"unknown method {cfg.method!r}; choose from {', '.join(METHODS)}")
    if cfg.loss_norm not in LOSS_NORMS:
        raise UsageError(f"unknown loss_norm {cfg.loss_norm!r}; choose from {', '.join(LOSS_NORMS)}")
    if cfg.reference is not None and cfg.method != "rho1":
        raise UsageError("--reference only applies to --method rho1")
    if cfg.save_merged and not cfg.lora:
        raise UsageError("--save-merged only applies with --lora")


def _write_summary(out: Path, summary: dict[str, Any]) -> None:
    tmp = out / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(out / SUMMARY)


def train(cfg: TrainConfig, model=None, tok=None, callbacks: list | None = None) -> dict[str, Any]:
    """Select tokens, train, save a checkpoint usable as ``--model DIR``; returns the training summary.

    ``model``/``tok`` skip loading ``cfg.model`` (for in-process callers); ``callbacks`` are extra
    ``transformers.TrainerCallback`` objects. Raises ``NonFiniteLossError`` after writing the summary when
    the loss goes NaN/inf.
    """
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig

    from cft.artifacts import ArtifactLock, environment
    from cft.models import load_model

    _check(cfg)
    t0 = time.time()
    state, use_cpu = process_state()
    out = Path(cfg.out)
    lock = ArtifactLock(out) if state.is_main_process else None  # a second run on this --out stops here
    last = last_checkpoint(out)
    if cfg.resume and not last and state.is_main_process:
        print(f"--resume: no checkpoint in {out}; training from the start", flush=True)
    if last and not cfg.resume:
        raise UsageError(f"{out} holds checkpoints of an earlier run ({Path(last).name}); pass --resume to continue "
                         "it, or choose another --out")
    set_seed(cfg.seed)
    records = read_labels(cfg.input)  # before loading the model: a bad file fails fast
    if model is None or tok is None:
        model, tok = load_model(cfg.model, cfg.dtype, device=str(state.device))
    check_vocab(cfg.input, records, model.get_input_embeddings().num_embeddings)

    reference = None
    if cfg.reference is not None:
        reference, ref_tok = load_model(cfg.reference, cfg.dtype, device=str(state.device))
        if ref_tok.get_vocab() != tok.get_vocab():
            raise UsageError(f"the reference model {cfg.reference} has another tokenizer than {cfg.model}")
    selection = select(cfg.method, records, tok, model=model, reference=reference, seed=cfg.seed,
                       loss_norm=cfg.loss_norm, batch_size=cfg.score_batch_size)
    del reference
    stats = selection.stats
    if state.is_main_process:
        print(format_statistics(stats), flush=True)
    if not selection.examples:
        raise UsageError(f"method {cfg.method}: no response of {cfg.input} has a selected token; nothing to train")

    args = SFTConfig(
        output_dir=str(out), max_steps=cfg.max_steps, num_train_epochs=cfg.epochs, learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum, seed=cfg.seed,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, bf16=cfg.bf16, activation_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, report_to="none", logging_nan_inf_filter=False,
        loss_type="dft" if cfg.method == "dft" else "nll", dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None, packing=False, padding_free=False, completion_only_loss=False, assistant_only_loss=False,
        average_tokens_across_devices=True, disable_tqdm=not sys.stderr.isatty(),
        use_cpu=use_cpu, dataloader_pin_memory=not use_cpu,
    )
    peft_config = None
    if cfg.lora:
        targets: str | list[str] = cfg.lora_targets
        if targets == ["all-linear"]:
            targets = "all-linear"  # PEFT's preset: every linear layer but the output head
        elif "lm_head" in targets:
            raise UsageError("LoRA on lm_head is not supported: the fused loss reads lm_head.weight directly")
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=targets, task_type="CAUSAL_LM")

    trainer_cls, collator_cls = _trainer_class()
    trainer = trainer_cls(
        model=model, args=args, train_dataset=Dataset.from_list(selection.examples), processing_class=tok,
        data_collator=collator_cls(pad_token_id=tok.pad_token_id), callbacks=callbacks, peft_config=peft_config,
    )
    sharded = trainer.is_fsdp_enabled or (
        trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3)
    if cfg.save_merged and sharded:
        raise UsageError("--save-merged needs the whole model in one process; under ZeRO-3 or FSDP save the adapter "
                         "and merge it afterwards")
    summary: dict[str, Any] = {
        "status": "running", "config": asdict(cfg), "tokens": stats,
        "world_size": state.num_processes, "global_batch_size": cfg.batch_size * cfg.grad_accum * state.num_processes,
        "examples": len(selection.examples),
        "environment": environment(model),
    }
    try:
        result = trainer.train(resume_from_checkpoint=last if cfg.resume else None)
    except NonFiniteLossError as exc:
        if trainer.is_world_process_zero():
            summary.update(status="stopped: non-finite loss", error=str(exc), last_checkpoint=exc.checkpoint,
                           log_history=trainer.state.log_history, seconds=round(time.time() - t0, 1))
            _write_summary(out, summary)
        raise

    if cfg.save_merged:
        merged = trainer.model.merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(out)
    else:
        trainer.save_model(str(out))  # on every process: ZeRO-3 and FSDP gather the shards here
    if trainer.is_world_process_zero():
        tok.save_pretrained(out)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        summary.update(
            status="completed", global_step=result.global_step, train_loss=result.training_loss,
            final_loss=losses[-1] if losses else None, resumed_from=last if cfg.resume else None,
            saved="merged" if cfg.save_merged else ("adapter" if cfg.lora else "full"),
            log_history=trainer.state.log_history, seconds=round(time.time() - t0, 1),
        )
        _write_summary(out, summary)
        print(f"saved {summary['saved']} model to {out} after {result.global_step} steps "
              f"(final loss {summary['final_loss']}); summary in {out / SUMMARY}", flush=True)
    state.wait_for_everyone()
    if lock is not None:
        lock.release()
    return summary


def configure_parser(p: argparse.ArgumentParser) -> None:
    d = TrainConfig(model="", input="")
    p.add_argument("--model", required=True, help="starting model: testbed, a folder, a .gguf file or a hub id")
    p.add_argument("--input", required=True, help="labels JSONL written by `cft identify`")
    p.add_argument("--method", choices=METHODS, default=d.method, help=METHOD_HELP)
    p.add_argument("--out", required=True, help="output folder: the checkpoint, train_summary.json, checkpoints")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps; overrides --epochs when > 0")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per process and micro-batch")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--loss-norm", choices=LOSS_NORMS, default=d.loss_norm,
                   help="step: mean over the trained tokens of the optimizer step; "
                        "sequence: mean of the per-sequence means")
    p.add_argument("--lr-scheduler", default=d.lr_scheduler)
    p.add_argument("--warmup", type=float, default=d.warmup, help="a fraction of the steps if < 1, else steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--lora-targets", nargs="+", default=d.lora_targets,
                   help="module names, or all-linear (every linear layer except lm_head)")
    p.add_argument("--save-merged", action="store_true", help="with --lora: save the merged full model")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--save-steps", type=int, default=d.save_steps)
    p.add_argument("--save-total-limit", type=int, default=d.save_total_limit)
    p.add_argument("--logging-steps", type=int, default=d.logging_steps)
    p.add_argument("--reference", default=None, help="rho1: the reference model (default: the starting model)")
    p.add_argument("--score-batch-size", type=int, default=d.score_batch_size)


def run(args: argparse.Namespace) -> int:
    from cft.artifacts import InputError

    names = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    try:
        train(cfg)
    except NonFiniteLossError as exc:
        print(f"cft train: error: {exc}", file=sys.stderr)
        return 1
    except (UsageError, InputError) as exc:  # InputError: a bad labels file, or another run on this --out
        print(f"cft train: error: {exc}", file=sys.stderr)
        return 2
    return 0



if __name__ == "__main__":  # `python -m cft.train ...` / `accelerate launch -m cft.train ...`
    _parser = argparse.ArgumentParser(prog="cft train", description=__doc__.splitlines()[0])
    configure_parser(_parser)
    sys.exit(run(_parser.parse_args()))
