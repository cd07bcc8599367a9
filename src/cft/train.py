"""Stage C: fine-tune on a labels file with one token-selection method (sft, cft, random, ...).

Training runs TRL's ``SFTTrainer`` on a pre-tokenized dataset (``input_ids``, ``labels``, ``weights``
from ``cft.selection``), used exactly as given: dataset preparation is skipped, so TRL neither
re-tokenizes, truncates nor re-masks it. One loss serves every method:

    loss = sum_t w_t * l_t / (sum of w_t over the optimizer step),   l_t = -log p(y_t)  (x sg(p) for dft)

with the sum over all micro-batches of the step and all processes (gradient accumulation and data
parallelism give the same loss as one big batch). With ``loss_norm="step"`` w_t = 1 on every trained
token: the mean over the step's trained tokens (CFT's N_crit); ``cft_mix`` weighs the non-critical tokens
``--mix-lambda`` instead of 1, so the normaliser is N_crit + lambda * N_other. With ``loss_norm="sequence"``
w_t = 1/n_i: the mean over sequences of each sequence's mean. Log-probabilities come from TRL's fused LM head, which
scores only the labelled positions (cheap for sparse CFT masks).

Options: cft's own are ``TrainConfig``'s fields; TRL's training arguments are ``CFTSFTConfig``'s, TRL's
``SFTConfig`` with cft's defaults (``--report-to wandb``, ``--push-to-hub``, ``--deepspeed``, ... as TRL has
them); ``--lr``/``--epochs``/``--batch-size`` are aliases of TRL's names.

Runs under ``accelerate launch`` unchanged. A non-finite loss stops training, naming the step; the
checkpoints in ``--out`` are only ever written from finite weights. ``--resume`` continues from the last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import SchedulerType
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import FusedCausalLMOutput, pad

from cft.artifacts import ArtifactLock, environment
from cft.config import attn_option, dtype_option, from_args, internal, is_internal, model_option, option
from cft.errors import CftError, UsageError
from cft.models import load_model
from cft.progress import Progress
from cft.selection import LOSS_NORMS, METHOD_HELP, METHODS, check_vocab, format_statistics, read_labels, select

SUMMARY = "train_summary.json"


@dataclass
class TrainConfig:
    """cft's own options of a training run (TRL's are ``CFTSFTConfig``); saved in ``train_summary.json``."""
    model: str = model_option(help="starting model: 'testbed', 'zoo:FAMILY', a model folder, a PEFT adapter folder "
                                   "(merged onto its base), a .gguf file or a hub id")
    input: str = option(help="labels JSONL written by `cft identify`")
    out: str = option(help="output folder (TRL's output_dir): the model, train_summary.json, checkpoints")
    method: str = option("cft", METHOD_HELP, choices=list(METHODS))
    loss_norm: str = option("step", "step: mean over the trained tokens of the optimizer step; sequence: mean of "
                                     "the per-sequence means", choices=list(LOSS_NORMS))
    dtype: str = dtype_option()
    attn_implementation: str | None = attn_option()
    lora: bool = option(False, "train a LoRA adapter (PEFT) instead of all weights")
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA scaling numerator (alpha / r scales the update)")
    lora_dropout: float = option(0.0, "dropout on the LoRA input")
    lora_targets: list[str] = option(factory=lambda: ["all-linear"],
                                     help="module names, or all-linear (every linear layer except lm_head)")
    save_merged: bool = option(False, "with --lora: save the merged full model instead of the adapter")
    resume: bool = option(False, "continue from the last complete checkpoint in --out")
    reference: str | None = option(None, "rho1: the reference model (default: the starting model)")
    score_batch_size: int = option(4, "batch size of the scoring passes of --method entropy and rho1")
    mix_lambda: float | None = option(None, "cft_mix: the loss weight of every non-critical response token (critical "
                                            "tokens weigh 1); 0 is cft, 1 is sft; required with --method cft_mix")


def cpu_only() -> bool:
    """Train on CPU: no CUDA, or ACCELERATE_USE_CPU set (as ``accelerate launch --cpu`` does)."""
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


@dataclass
class CFTTrainingDefaults:
    """The ``TrainingArguments`` defaults cft changes in both ``cft train`` and ``cft grpo``, and the fields cft
    sets itself (``internal``: not options). Listed first among a config's bases, so these declarations replace
    TRL's in place; every other TRL training argument keeps TRL's default and is an option as it is."""
    output_dir: str | None = internal(None)  # set from --out
    seed: int = option(0, "random seed: data order, LoRA initialisation, random token selection, sampling")
    bf16: bool = option(False, "bfloat16 mixed precision (TRL's own default turns it on)")
    activation_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory, slower)",
                                            aliases=("--gradient-checkpointing",))
    gradient_checkpointing: bool | None = internal(None)  # transformers' deprecated alias of the option above
    gradient_checkpointing_kwargs: dict[str, Any] | str | None = internal(None)
    report_to: None | str | list[str] = option("none", "where to send the logs: none, wandb, tensorboard, trackio, "
                                                       "all (the integration must be installed)")
    logging_steps: float = option(1, "log every N optimizer steps")
    save_total_limit: int | None = option(1, "checkpoints kept in --out")
    disable_tqdm: bool | None = option(None, "progress as a line every $CFT_PROGRESS_SECONDS (30) instead of a bar "
                                                 "(default: when stderr is not a terminal)")
    use_cpu: bool = internal(factory=cpu_only)  # decided before the model loads (see process_state)
    model_init_kwargs: dict[str, Any] | str | None = internal(None)  # cft loads the model (--dtype, ...)
    resume_from_checkpoint: str | None = internal(None)  # --resume picks the last complete checkpoint
    log_level: str = internal("passive")  # `cft --log-level` (before the command) sets it for every library

    def __post_init__(self):
        if self.disable_tqdm is None:
            self.disable_tqdm = not sys.stderr.isatty()
        if self.use_cpu:
            self.dataloader_pin_memory = False
        super().__post_init__()


@dataclass
class CFTSFTConfig(CFTTrainingDefaults, SFTConfig):
    """TRL's ``SFTConfig`` with cft's defaults; the fields of dataset preparation and of TRL's loss are fixed
    (internal): the dataset is pre-tokenized with per-token weights and the loss is ``SelectiveTrainer``'s."""
    learning_rate: float = option(1e-5, "peak learning rate (AdamW)", aliases=("--lr",))
    num_train_epochs: float = option(3.0, "epochs over the selected responses (--max-steps > 0 overrides)",
                                     aliases=("--epochs",))
    per_device_train_batch_size: int = option(8, "sequences per process and micro-batch", aliases=("--batch-size",))
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", aliases=("--grad-accum",))
    lr_scheduler_type: SchedulerType | str = option("cosine", "learning-rate schedule", aliases=("--lr-scheduler",))
    warmup_steps: float = option(0.03, "warmup: a fraction of the steps if < 1, else a step count",
                                 aliases=("--warmup",))
    save_steps: float = option(200, "checkpoint every N optimizer steps")
    logging_nan_inf_filter: bool = option(False, "drop NaN/inf losses from the logged average (cft stops at the "
                                                 "first one anyway)")
    # fixed: no dataset preparation (TRL neither re-tokenizes, truncates, packs nor re-masks the examples) ...
    dataset_kwargs: dict[str, Any] | str | None = internal(factory=lambda: {"skip_prepare_dataset": True})
    remove_unused_columns: bool = internal(False)  # the collator needs the weights column
    max_length: int | None = internal(None)
    packing: bool = internal(False)
    padding_free: bool = internal(False)
    completion_only_loss: bool | None = internal(False)
    assistant_only_loss: bool = internal(False)
    dataset_text_field: str = internal("text")
    dataset_num_proc: int | None = internal(None)
    truncation_mode: str = internal("keep_start")
    packing_strategy: str = internal("bfd")
    shuffle_dataset: bool = internal(False)
    eval_packing: bool | None = internal(None)
    # ... no change to the tokenizer the labels were made with ...
    eos_token: str | None = internal(None)
    pad_token: str | None = internal(None)
    chat_template_path: str | None = internal(None)
    # ... and cft's loss, normalised over the whole step on every process (--method dft gives DFT's weight)
    loss_type: str = internal("nll")
    average_tokens_across_devices: bool = internal(True)


CONFIGS = (TrainConfig, CFTSFTConfig)


def option_names(*classes: type) -> dict[str, str]:
    """Every name a flat mapping may use for the options of ``classes``: field names and their aliases
    (``lr`` for ``learning_rate``), each mapped to its field name."""
    names = {}
    for cls in classes:
        for f in fields(cls):
            if f.init and not is_internal(f):
                names[f.name] = f.name
                names.update((a.lstrip("-").replace("-", "_"), f.name) for a in f.metadata.get("aliases", ()))
    return names


def split_options(values: dict[str, Any], *classes: type) -> list:
    """One instance of each of ``classes`` from one flat mapping of option names or aliases (an experiment's
    ``train:`` section, a test's keyword arguments); an unknown name raises ``UsageError``."""
    names = option_names(*classes)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(unknown)}")
    by_field = {names[k]: v for k, v in values.items()}
    if len(by_field) < len(values):
        raise UsageError(f"an option given twice (by its name and an alias): {', '.join(sorted(values))}")
    return [cls(**{f.name: by_field[f.name] for f in fields(cls) if f.name in by_field and not is_internal(f)})
            for cls in classes]


def train_configs(**values: Any) -> tuple[TrainConfig, CFTSFTConfig]:
    """``(TrainConfig, CFTSFTConfig)`` from option names or aliases: ``train_configs(model=..., lr=1e-4, ...)``."""
    cfg, args = split_options(values, *CONFIGS)
    return cfg, args


class NonFiniteLossError(CftError, RuntimeError):
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


@dataclass
class WeightedCollator(DataCollatorForLanguageModeling):
    """TRL's collator (right padding, labels padded with -100) plus the per-token weights (padded with 0)."""
    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        batch["weights"] = pad([torch.tensor(e["weights"], dtype=torch.float32) for e in examples],
                               padding_value=0.0, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)
        return batch


class FiniteWeightsGuard(TrainerCallback):
    """Refuses to checkpoint non-finite weights. ``on_step_end``/``on_epoch_end`` run after the Trainer's flow
    callback has decided to save and before the save itself, so a bad step never reaches a checkpoint."""
    def __init__(self, trainer: SelectiveTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            self.trainer.check_finite_weights()

    on_epoch_end = on_step_end


class TrainProgress(TrainerCallback):
    """The progress of a Trainer (``train`` and ``grpo``) through ``cft.progress.Progress``: a bar in a terminal,
    a timed line in a log (steps, tokens/s, elapsed, ETA), and one readable line per logging step in place of
    the raw dict transformers prints (``install`` removes its ``ProgressCallback``/``PrinterCallback``).
    ``keys`` (metric -> short name): the step line shows only these, in this order (TRL's GRPO logs some 30
    metrics a step, which buried the reward in a log file); a log with none of them (the run's summary) in full."""

    def __init__(self, desc: str, keys: dict[str, str] | None = None):
        self.desc = desc
        self.keys = keys
        self.progress: Progress | None = None

    @classmethod
    def install(cls, trainer, desc: str, keys: dict[str, str] | None = None) -> None:
        trainer.pop_callback(ProgressCallback)
        trainer.pop_callback(PrinterCallback)
        trainer.add_callback(cls(desc, keys))

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_local_process_zero:
            self.progress = Progress(self.desc, state.max_steps, unit="step", bar=not args.disable_tqdm,
                                     initial=state.global_step)
            self.tokens_before = state.num_input_tokens_seen  # a resumed run's (GRPO counts on from it)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.advance(state.global_step - self.progress.done)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        if "num_tokens" in logs:  # cumulative tokens trained on (TRL's metric)
            self.progress.tokens = max(int(logs["num_tokens"]) - self.tokens_before, 0)
        shown = {short: logs[k] for k, short in (self.keys or {}).items() if k in logs} or {
            k: v for k, v in logs.items() if k != "total_flos"}
        values = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items())
        self.progress.write(f"{self.desc} step {state.global_step}/{state.max_steps}: {values}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    @staticmethod
    @contextmanager
    def closed_after(trainer):
        """Around ``trainer.train``: the progress line stops with training even when it raises (``on_train_end``
        never runs then, and the ticker went on printing into the log of the next job)."""
        try:
            yield
        finally:
            for cb in trainer.callback_handler.callbacks:
                if isinstance(cb, TrainProgress):
                    cb.on_train_end(None, None, None)


PLAIN_HEAD_MAX_LOGITS = 2**28  # a batch's logits, 0.5 GiB in bfloat16 (SmolLM2, 16 x 140 tokens: 2**26.7)


def plain_lm_head(trainer, temperature: float = 1.0) -> None:
    """Off a GPU, make ``model(..., labels=..., fused_lm_head=True)`` score tokens from the model's own logits.

    SFTTrainer and GRPOTrainer install TRL's fused LM head (``add_fused_lm_head``): per-token log-probabilities
    (and entropy, top-1 hits) without the (batch, length, vocabulary) logits. On a GPU it applies the head in
    tiles to the labelled positions only. Elsewhere it projects every position, padding and prompt included, in
    float32 tiles and again in the backward pass: a SmolLM2 training step in bfloat16 on a CPU took 1.8x as long
    as through the model's own forward (``benchmarks/dtype_speed.py``, ``fused_over_plain``). There this
    wrapper returns the same fields from the model's logits (under autocast when training in bfloat16; divided by
    ``temperature`` as TRL's head divides them), scored in float32 at the labelled positions only. A batch whose
    logits would exceed ``PLAIN_HEAD_MAX_LOGITS`` values still goes through TRL's head, which never holds them."""
    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is None:
            continue
        model = model.get_base_model() if hasattr(model, "get_base_model") else model
        fused, vocab = model.forward, model.get_output_embeddings().weight.shape[0]

        def forward(*args, fused_lm_head=False, labels=None, _fused=fused, _vocab=vocab, **kwargs):
            if (not fused_lm_head or labels is None or labels.device.type == "cuda" or "shift_labels" in kwargs
                    or labels.numel() * _vocab > PLAIN_HEAD_MAX_LOGITS):
                extra = {"labels": labels} if labels is not None else {}
                return _fused(*args, fused_lm_head=fused_lm_head, **extra, **kwargs)
            count = kwargs.pop("num_items_in_batch", None)
            out = _fused(*args, **{"use_cache": False, **kwargs})
            shifted = labels[:, 1:]
            mask = shifted != -100
            logp = (out.logits[:, :-1][mask].float() / temperature).log_softmax(-1)
            picked = shifted[mask]
            chosen = logp.gather(-1, picked[:, None])[:, 0]

            def spread(values: torch.Tensor) -> torch.Tensor:  # (batch, length - 1), zeros where unlabelled
                return values.new_zeros(mask.shape).masked_scatter(mask, values)

            # a ModelOutput, as TRL's head returns: DDP finds the output tensors in it (not in a plain object)
            return FusedCausalLMOutput(loss=-chosen.sum() / (mask.sum().clamp(min=1) if count is None else count),
                                       log_probs=spread(chosen), entropy=spread(-(logp.exp() * logp).sum(-1).detach()),
                                       is_top1=spread(logp.argmax(-1) == picked), label_mask=mask,
                                       aux_loss=getattr(out, "aux_loss", None))

        model.forward = forward


class SelectiveTrainer(SFTTrainer):
    """SFTTrainer with the weighted, step-normalised loss above and a NaN/inf guard.

    Overrides public hooks only: ``get_batch_samples`` (the loss normaliser of an optimizer step is the summed
    weight of all its micro-batches on all processes, not TRL's label count), ``compute_loss`` and
    ``training_step`` (the loss guard); the weights guard is a callback. What remains private is TRL's metric
    store ``self._metrics`` (``compute_loss`` adds entropy and token accuracy to it, as ``SFTTrainer.compute_loss``
    does, for ``SFTTrainer.log`` to average), hence ``trl<2`` in pyproject.toml.
    """
    loss_is_scaled_for_ga = True  # the loss is already divided by the whole step's weight

    def __init__(self, *args, dft: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        plain_lm_head(self)
        self.dft = dft  # DFT's weight sg(p) on each token's loss (cft's --method dft; TRL's loss_type is unused)
        self.tokens_trained = 0  # logged as ``num_tokens``, as SFTTrainer.compute_loss (replaced below) does
        TrainProgress.install(self, "train")
        self.add_callback(FiniteWeightsGuard(self))  # last: after every callback that may touch the weights

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The micro-batches of one optimizer step and their summed weight over all processes."""
        batch_samples = list(itertools.islice(epoch_iterator, num_batches))
        if not batch_samples:
            return batch_samples, None
        total = sum(b["weights"][:, 1:].sum() for b in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return batch_samples, total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop("weights")[:, 1:]
        if self.aux_loss_enabled:  # MoE models: TRL's load-balancing term, added as SFTTrainer adds it
            inputs["output_router_logits"] = True
        outputs = model(**inputs, use_cache=False, fused_lm_head=True)
        normalizer = weights.sum() if num_items_in_batch is None else num_items_in_batch
        loss = weighted_loss(outputs.log_probs, weights, normalizer, dft=self.dft)
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
        if mode == "train":
            self.tokens_trained += int(gather(inputs["attention_mask"].sum()).sum())
            self._metrics[mode]["num_tokens"] = [self.tokens_trained]
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(self.accelerator.gather(torch.isfinite(loss).float().reshape(1)).all()):
            raise NonFiniteLossError(self.state.global_step + 1, "non-finite loss",
                                     last_checkpoint(self.args.output_dir))
        return loss

    def check_finite_weights(self) -> None:
        """Raise ``NonFiniteLossError`` if any weight is NaN/inf; each process checks its own shard (FSDP), all
        agree."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]
        bad = torch.tensor([float(not all(bool(torch.isfinite(p).all()) for p in local))], device=self.args.device)
        if bool(self.accelerator.gather(bad).sum() > 0):
            raise NonFiniteLossError(self.state.global_step, "non-finite weights",
                                     last_checkpoint(self.args.output_dir))


def process_state():
    """accelerate's process state and whether it runs on CPU.

    Without CUDA, processes started by torchrun or ``accelerate launch --multi_gpu`` must ask accelerate for
    CPU explicitly, or each would train alone instead of joining a gloo process group.
    """
    from accelerate import PartialState

    use_cpu = cpu_only()
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


def train(cfg: TrainConfig, args: CFTSFTConfig | None = None, model=None, tok=None,
          callbacks: list | None = None) -> dict[str, Any]:
    """Select tokens, train, save a checkpoint usable as ``--model DIR``; returns the training summary.

    ``args``: TRL's training arguments (default ``CFTSFTConfig()``); their ``output_dir`` is ``cfg.out``.
    ``model``/``tok`` skip loading ``cfg.model`` (for in-process callers); ``callbacks`` are extra
    ``transformers.TrainerCallback`` objects. Raises ``NonFiniteLossError`` after writing the summary when
    the loss goes NaN/inf.
    """
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed

    _check(cfg)
    t0 = time.time()
    state, _ = process_state()
    out = Path(cfg.out)
    args = with_output_dir(args if args is not None else CFTSFTConfig(), out)
    lock = ArtifactLock(out) if state.is_main_process else None  # a second run on this --out stops here
    last = last_checkpoint(out)
    if cfg.resume and not last and state.is_main_process:
        print(f"--resume: no checkpoint in {out}; training from the start", flush=True)
    if last and not cfg.resume:
        raise UsageError(f"{out} holds checkpoints of an earlier run ({Path(last).name}); pass --resume to continue "
                         "it, or choose another --out")
    set_seed(args.seed)
    records = read_labels(cfg.input)  # before loading the model: a bad file fails fast
    if model is None or tok is None:
        model, tok = load_model(cfg.model, cfg.dtype, device=str(state.device),
                                attn_implementation=cfg.attn_implementation)
    check_vocab(cfg.input, records, model.get_input_embeddings().num_embeddings)

    reference = None
    if cfg.reference is not None:
        reference, ref_tok = load_model(cfg.reference, cfg.dtype, device=str(state.device),
                                        attn_implementation=cfg.attn_implementation)
        if ref_tok.get_vocab() != tok.get_vocab():
            raise UsageError(f"the reference model {cfg.reference} has another tokenizer than {cfg.model}")
    if cfg.mix_lambda is not None and cfg.method != "cft_mix":
        raise UsageError(f"--mix-lambda weights the non-critical tokens of --method cft_mix, not of {cfg.method}")
    try:
        selection = select(cfg.method, records, tok, model=model, reference=reference, seed=args.seed,
                           loss_norm=cfg.loss_norm, batch_size=cfg.score_batch_size, mix_lambda=cfg.mix_lambda)
    except ValueError as exc:  # e.g. cft_mix without --mix-lambda
        raise UsageError(str(exc)) from None
    del reference
    stats = selection.stats
    if state.is_main_process:
        print(format_statistics(stats), flush=True)
    if not selection.examples:
        raise UsageError(f"method {cfg.method}: no response of {cfg.input} has a selected token; nothing to train")

    peft_config = None
    if cfg.lora:
        targets: str | list[str] = cfg.lora_targets
        if targets == ["all-linear"]:
            targets = "all-linear"  # PEFT's preset: every linear layer but the output head
        elif "lm_head" in targets:
            raise UsageError("LoRA on lm_head is not supported: the fused loss reads lm_head.weight directly")
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=targets, task_type="CAUSAL_LM")

    trainer = SelectiveTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(selection.examples), processing_class=tok,
        data_collator=WeightedCollator(pad_token_id=tok.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of),
        callbacks=callbacks, peft_config=peft_config, dft=cfg.method == "dft",
    )
    sharded = trainer.is_fsdp_enabled or (
        trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3)
    if cfg.save_merged and sharded:
        raise UsageError("--save-merged needs the whole model in one process; under ZeRO-3 or FSDP save the adapter "
                         "and merge it afterwards")
    summary: dict[str, Any] = {
        "status": "running", "config": asdict(cfg), "training_args": args.to_dict(), "tokens": stats,
        "world_size": state.num_processes,
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * state.num_processes,
        "examples": len(selection.examples),
        "environment": environment(model),
    }
    try:
        with TrainProgress.closed_after(trainer):
            result = trainer.train(resume_from_checkpoint=last if cfg.resume else None)
        trainer.check_finite_weights()  # also when no checkpoint step guarded the last one (save_strategy no)
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


def with_output_dir(args, out: str | os.PathLike):
    """A copy of TRL's training arguments writing to ``out`` (cft's ``--out``). ``TrainingArguments.__post_init__``
    only defaults and expands ``output_dir``, so the copy needs no second ``__post_init__`` (which would, e.g.,
    refuse a GRPO config whose generation batch it already derived)."""
    import copy

    args = copy.copy(args)
    args.output_dir = str(Path(out).expanduser())
    return args


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, CFTSFTConfig]:
    return from_args(TrainConfig, args), from_args(CFTSFTConfig, args)


def run(args: argparse.Namespace) -> int:
    train(*config_from_args(args))
    return 0


if __name__ == "__main__":  # `python -m cft.train ...` / `accelerate launch -m cft.train ...`: as `cft train ...`
    from cft.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
