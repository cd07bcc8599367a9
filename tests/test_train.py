"""`cft train`: the loss and its normalisation, label alignment through TRL's fused head, every method end
to end on a tiny model, LoRA, resume, the NaN guard, and 2 processes against 1 (slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from cft.models import load_model
from cft.selection import LabeledResponse, build_example, read_labels, token_kind
from cft.train import CFTSFTConfig, NonFiniteLossError, TrainConfig, UsageError, train, train_configs, weighted_loss

SRC = str(Path(__file__).resolve().parents[1] / "src")


def make_tiny_model(folder: Path, tok, seed: int = 0):
    """A 1-layer, 32-wide Llama with the testbed tokenizer, saved as a standard HF folder."""
    from cft.testbed.pretrain import PretrainConfig, build_model

    torch.manual_seed(seed)
    model = build_model(tok, PretrainConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_labels(path: Path, tok, n: int, start: int = 0, no_critical: tuple[int, ...] = ()) -> Path:
    """Labels records for testbed problems; the digit tokens (not the EOS) play the critical tokens."""
    from cft.prompts import render_ids
    from cft.testbed.problems import generate_split

    with open(path, "w") as fh:
        for i, p in enumerate(generate_split("train", start + n)[start:]):
            resp = tok(p.solution, add_special_tokens=False).input_ids + [tok.eos_token_id]
            crit = [int(i not in no_critical and token_kind(tok.decode([t])) == "digit") for t in resp[:-1]] + [0]
            fh.write(json.dumps({
                "schema": "cft.labels/1", "key": p.id, "id": p.id, "question": p.question, "gold": p.answer,
                "prompt_ids": render_ids(tok, p.question), "response_ids": resp, "response": p.solution,
                "critical": crit, "eligible": [1] * (len(resp) - 1) + [0],
            }) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, testbed_tokenizer):
    root = tmp_path_factory.mktemp("tiny")
    model_dir = make_tiny_model(root / "model", testbed_tokenizer)
    _, tok = load_model(str(model_dir), device="cpu")
    return SimpleNamespace(
        model=str(model_dir), tok=tok, root=root,
        labels=str(write_labels(root / "labels.jsonl", tok, 8, no_critical=(5,))),
        four=str(write_labels(root / "four.jsonl", tok, 4, start=8)),
        eight=str(write_labels(root / "eight.jsonl", tok, 8, start=12)),
    )


def _cfg(tiny, out, **kw) -> tuple[TrainConfig, CFTSFTConfig]:
    base = dict(model=tiny.model, input=tiny.labels, method="cft", out=str(out), max_steps=2, batch_size=4,
                lr=1e-3, warmup=0.0, save_steps=100)
    return train_configs(**{**base, **kw})


def _losses(summary: dict, key: str = "loss") -> list[float]:
    return [h[key] for h in summary["log_history"] if key in h and "train_runtime" not in h]


def test_options_split_into_cft_and_trl_configs(tmp_path):
    """Aliases reach TRL's fields; fields cft fixes (dataset preparation, TRL's own loss) are not options."""
    cfg, args = train_configs(model="testbed", input="l.jsonl", out=str(tmp_path), lr=3e-4, epochs=2, batch_size=2,
                              gradient_accumulation_steps=4, report_to="tensorboard", lora=True)
    assert (cfg.lora, args.learning_rate, args.num_train_epochs, args.per_device_train_batch_size) == (True, 3e-4, 2, 2)
    assert args.gradient_accumulation_steps == 4 and args.report_to == ["tensorboard"]
    assert args.bf16 is False and args.max_length is None and args.remove_unused_columns is False
    with pytest.raises(UsageError, match="given twice"):
        train_configs(model="testbed", input="l.jsonl", out=str(tmp_path), lr=1e-4, learning_rate=1e-4)
    for fixed in ("packing", "max_length", "output_dir", "loss_type"):
        with pytest.raises(UsageError, match=f"unknown option.*{fixed}"):
            train_configs(model="testbed", input="l.jsonl", out=str(tmp_path), **{fixed: None})


# --- the loss -------------------------------------------------------------------------------------------------


def test_weighted_loss_hand_computed():
    # sequence A: token losses 1 and 3; sequence B: token loss 4 (a third, masked position has loss 0)
    log_probs = -torch.tensor([[1.0, 3.0, 0.0], [4.0, 0.0, 0.0]])
    step_w = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    seq_w = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert math.isclose(weighted_loss(log_probs, step_w, step_w.sum()).item(), 8 / 3, rel_tol=1e-6)
    assert math.isclose(weighted_loss(log_probs, seq_w, seq_w.sum()).item(), ((1 + 3) / 2 + 4) / 2, rel_tol=1e-6)
    dft = (1 * math.exp(-1) + 3 * math.exp(-3) + 4 * math.exp(-4)) / 3
    assert math.isclose(weighted_loss(log_probs, step_w, 3, dft=True).item(), dft, rel_tol=1e-6)
    # gradient accumulation: micro-batches divided by the whole step's weight add up to the full-batch loss
    halves = sum(weighted_loss(log_probs[i : i + 1], seq_w[i : i + 1], seq_w.sum()) for i in range(2))
    assert math.isclose(halves.item(), 3.0, rel_tol=1e-6)


def test_dft_gradient_is_the_detached_weight_formula():
    """DFT's loss -sg(p_y) log p_y has gradient -(w p_y / N) (onehot(y) - softmax) in the logits; an undetached
    weight (the gradient of -p_y log p_y) differs, so this fails if the weight is not detached."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    targets = torch.tensor([[1, 4, 0], [2, 2, 3]])
    weights = torch.tensor([[1.0, 1.0, 0.0], [0.5, 1.0, 1.0]])
    log_probs = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1) * (weights > 0)
    weighted_loss(log_probs, weights, 4.0, dft=True).backward()
    with torch.no_grad():
        probs = torch.softmax(logits, -1)
        p_y = probs.gather(-1, targets[..., None])
        want = -(weights[..., None] * p_y / 4.0) * (torch.nn.functional.one_hot(targets, 5) - probs)
    torch.testing.assert_close(logits.grad, want, rtol=1e-6, atol=1e-7)


def test_label_alignment_through_fused_head(tiny):
    """Position t-1 predicts labels[t]: TRL's fused head shifts the labels we build exactly once."""
    from trl.trainer.utils import add_fused_lm_head

    model, _ = load_model(tiny.model, device="cpu")
    rec = LabeledResponse("x", [1, 5, 9], [20, 21, 22, 2], [0, 1, 1, 0], [1, 1, 1, 0])
    ex = build_example(rec, [0, 1, 0, 1])
    ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits, -1)[0]
        add_fused_lm_head(model)
        fused = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs[0]
    assert ex["labels"] == [-100, -100, -100, -100, 21, -100, 2]
    for i in range(1, len(ex["input_ids"])):
        want = logp[i - 1, ex["input_ids"][i]].item() if ex["labels"][i] != -100 else 0.0
        assert math.isclose(fused[i - 1].item(), want, rel_tol=1e-5, abs_tol=1e-6), i


def _direct_loss(tiny, path: str, method: str, norm: str) -> float:
    """The first step's loss computed by hand from the starting model, one response at a time."""
    model, _ = load_model(tiny.model, device="cpu")
    per_seq, tokens = [], []
    for rec in read_labels(path):
        mask = rec.critical if method == "cft" else [1] * len(rec.response_ids)
        ids = torch.tensor([rec.prompt_ids + rec.response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        p = len(rec.prompt_ids)
        nll = [-logp[p + t - 1, y].item() for t, y in enumerate(rec.response_ids) if mask[t]]
        if method == "dft":
            nll = [v * math.exp(-v) for v in nll]
        per_seq.append(sum(nll) / len(nll))
        tokens += nll
    return sum(tokens) / len(tokens) if norm == "step" else sum(per_seq) / len(per_seq)


@pytest.mark.parametrize(("method", "norm"), [("cft", "step"), ("cft", "sequence"), ("dft", "step")])
def test_first_step_loss_and_gradient_accumulation(tiny, tmp_path, method, norm):
    """All 4 responses in one optimizer step: 1x4 and 4x1 (accumulated) give the hand-computed loss and the same
    gradient norm."""
    want = _direct_loss(tiny, tiny.four, method, norm)
    runs = [train(*_cfg(tiny, tmp_path / f"bs{bs}", input=tiny.four, method=method, loss_norm=norm, max_steps=1,
                       batch_size=bs, grad_accum=4 // bs))
            for bs in (4, 1)]
    for summary in runs:
        assert math.isclose(_losses(summary)[0], want, rel_tol=1e-4)
    g4, g1 = (_losses(s, "grad_norm")[0] for s in runs)
    assert math.isclose(g4, g1, rel_tol=1e-4)


# --- every method end to end ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sft", "cft", "random", "entropy", "numeric", "rho1", "dft", "rho1+reference",
                                    "cft_mix"])
def test_every_method_trains_and_saves(tiny, tmp_path, method):
    reference = None
    if method == "rho1+reference":
        method, reference = "rho1", str(make_tiny_model(tmp_path / "ref", tiny.tok, seed=1))
    mix = {"mix_lambda": 0.3} if method == "cft_mix" else {}
    summary = train(*_cfg(tiny, tmp_path / "out", method=method, reference=reference, **mix))
    stats = summary["tokens"]
    assert summary["status"] == "completed" and summary["global_step"] == 2
    assert all(math.isfinite(v) for v in _losses(summary))
    assert stats["responses"] == 8
    expected = {
        "sft": stats["response_tokens"], "dft": stats["response_tokens"], "numeric": stats["response_by_kind"]["digit"],
        "cft_mix": stats["response_tokens"],
    }.get(method, stats["critical_tokens"])
    assert stats["trained_tokens"] == expected
    assert stats["responses_excluded"] == (0 if method in ("sft", "dft", "numeric", "cft_mix") else 1)
    saved = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert saved["config"]["method"] == method and saved["log_history"] == summary["log_history"]
    assert saved["training_args"]["learning_rate"] == 1e-3 and saved["training_args"]["output_dir"] == str(
        tmp_path / "out")  # TRL's arguments, resolved, beside cft's
    model, _ = load_model(str(tmp_path / "out"), device="cpu")  # usable as --model DIR
    assert model.config.hidden_size == 32


def test_lora_adapter_and_merged(tiny, tmp_path):
    adapter = train(*_cfg(tiny, tmp_path / "adapter", lora=True, lora_r=4, lora_alpha=8))
    files = os.listdir(tmp_path / "adapter")
    assert adapter["saved"] == "adapter" and "adapter_config.json" in files and "config.json" not in files
    targets = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert not any("lm_head" in t for t in targets) and any(t.endswith("q_proj") for t in targets)

    merged = train(*_cfg(tiny, tmp_path / "merged", lora=True, lora_r=4, lora_alpha=8, save_merged=True, lr=1e-2))
    assert merged["saved"] == "merged"
    after = load_file(tmp_path / "merged" / "model.safetensors")
    before = load_file(Path(tiny.model) / "model.safetensors")
    assert not any("lora" in k for k in after) and set(after) == set(before)
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"],
                           before["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(UsageError, match="lm_head"):
        train(*_cfg(tiny, tmp_path / "bad", lora=True, lora_targets=["q_proj", "lm_head"]))


def test_moe_model_adds_the_load_balancing_loss(tiny, tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    tok = tiny.tok
    config = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           router_aux_loss_coef=0.01, output_router_logits=True, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    summary = train(*_cfg(tiny, tmp_path / "out", model=str(tmp_path / "moe")))
    assert all(aux > 0 for aux in _losses(summary, "aux_loss")) and len(_losses(summary, "aux_loss")) == 2


# --- resume and the NaN guard -----------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


class InterruptAfter(TrainerCallback):
    """Simulates a kill once ``step`` optimizer steps are done (and checkpointed)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupted


class PoisonAt(TrainerCallback):
    """Turns the weights into NaN at the end of optimizer step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))


def test_resume_after_interruption(tiny, tmp_path):
    kw = dict(max_steps=4, batch_size=2, save_steps=2)
    whole = train(*_cfg(tiny, tmp_path / "whole", **kw))
    with pytest.raises(Interrupted):
        train(*_cfg(tiny, tmp_path / "cut", **kw), callbacks=[InterruptAfter(2)])
    assert (tmp_path / "cut" / "checkpoint-2").is_dir() and not (tmp_path / "cut" / "train_summary.json").exists()
    with pytest.raises(UsageError, match="--resume"):
        train(*_cfg(tiny, tmp_path / "cut", **kw))
    resumed = train(*_cfg(tiny, tmp_path / "cut", resume=True, **kw))
    assert resumed["resumed_from"].endswith("checkpoint-2") and resumed["global_step"] == 4
    assert len(_losses(resumed)) == 4
    for a, b in zip(_losses(whole), _losses(resumed), strict=True):
        assert math.isclose(a, b, rel_tol=1e-5)


@pytest.mark.parametrize(("poison", "step", "what", "kept"), [
    (3, 4, "non-finite loss", "checkpoint-2"),  # weights go bad after step 3: step 4's loss is NaN
    (2, 2, "non-finite weights", None),  # weights go bad at a save step: that checkpoint is refused
])
def test_nan_guard_stops_and_keeps_last_good_checkpoint(tiny, tmp_path, poison, step, what, kept):
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLossError, match=f"{what} at step {step}") as err:
        train(*_cfg(tiny, out, max_steps=6, batch_size=2, save_steps=2), callbacks=[PoisonAt(poison)])
    assert err.value.step == step
    assert (err.value.checkpoint or "").endswith(kept or "") and (err.value.checkpoint is None) == (kept is None)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["status"].startswith("stopped") and str(step) in summary["error"]
    assert not (out / "model.safetensors").exists()
    if kept:
        weights = load_file(out / kept / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())


# --- several processes --------------------------------------------------------------------------------------------


def _cli(tiny, out, batch_size: int) -> list[str]:
    return ["-m", "cft.train", "--model", tiny.model, "--input", tiny.eight, "--method", "cft", "--out", str(out),
            "--max-steps", "3", "--batch-size", str(batch_size), "--lr", "1e-2", "--warmup", "0"]


@pytest.mark.slow
def test_two_processes_match_one(tiny, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU) with 2 sequences each = 1 process with 4.

    8 responses, a multiple of the global batch: otherwise accelerate repeats a few examples to even out the last
    batch of an epoch across processes (``even_batches``), and that step differs from one process by design.
    """
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *_cli(tiny, tmp_path / "one", 4)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29517"]
    two = subprocess.run([*launch, *_cli(tiny, tmp_path / "two", 2)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    s1, s2 = (json.loads((tmp_path / d / "train_summary.json").read_text()) for d in ("one", "two"))
    assert (s1["world_size"], s2["world_size"]) == (1, 2) and s1["global_batch_size"] == s2["global_batch_size"] == 4
    for key in ("loss", "grad_norm"):
        assert len(_losses(s1, key)) == 3
        for a, b in zip(_losses(s1, key), _losses(s2, key), strict=True):
            assert math.isclose(a, b, rel_tol=1e-4), (key, _losses(s1, key), _losses(s2, key))


def test_mix_lambda_belongs_to_cft_mix(tiny, tmp_path):
    with pytest.raises(UsageError, match="needs mix_lambda"):
        train(*_cfg(tiny, tmp_path / "a", method="cft_mix"))
    with pytest.raises(UsageError, match="not of cft"):
        train(*_cfg(tiny, tmp_path / "b", method="cft", mix_lambda=0.5))


def test_training_logs_one_readable_line_per_logging_step(tiny, tmp_path, capsys):
    """Not transformers' raw dict: ``train step 1/2: loss 0.1234, ...`` on stdout, through ``TrainProgress``."""
    summary = train(*_cfg(tiny, tmp_path / "out", disable_tqdm=True))
    out = capsys.readouterr().out
    assert "{'" not in out
    steps = [line for line in out.splitlines() if line.startswith("train step ")]
    assert [line.split(":")[0] for line in steps] == ["train step 1/2", "train step 2/2", "train step 2/2"]
    logged = [h for h in summary["log_history"] if "loss" in h]
    assert [f"loss {h['loss']:.4g}" in line for h, line in zip(logged, steps, strict=False)] == [True, True]
    assert all(h["num_tokens"] > 0 for h in logged)  # what the progress line's tokens/s is made of
    assert "train_runtime" in steps[-1]


def test_a_training_that_raises_stops_its_progress_ticker(tiny, tmp_path, monkeypatch):
    """``on_train_end`` does not run when training raises; the progress ticker must stop anyway, or it goes on
    printing into the log of whatever the process runs next (the experiment runner's next cell)."""
    from transformers import Trainer

    from cft import progress as progress_mod

    started = []
    real_init = progress_mod.Progress.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        started.append((self, self._ticker is not None))

    monkeypatch.setattr(progress_mod.Progress, "__init__", spy)

    def boom(self, *a, **k):
        self.callback_handler.on_train_begin(self.args, self.state, self.control)
        raise RuntimeError("boom")

    monkeypatch.setattr(Trainer, "_inner_training_loop", boom)
    with pytest.raises(RuntimeError, match="boom"):
        train(*_cfg(tiny, tmp_path / "out", disable_tqdm=True))
    assert any(ticking for _, ticking in started)  # a log-mode progress line was running
    assert all(p._ticker is None for p, _ in started)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_plain_head_scores_as_trls_fused_head(temperature, monkeypatch):
    """Off a GPU the trainers score tokens from the model's logits (``plain_lm_head``); the fields are TRL's fused
    head's, to float32 rounding, at any temperature, and the loss's gradient is the same."""
    from trl.trainer.utils import add_fused_lm_head

    from cft.train import plain_lm_head

    model, _ = load_model("testbed")
    add_fused_lm_head(model, temperature=temperature, outputs=("log_probs", "entropy", "is_top1"))
    fused = model.forward
    plain_lm_head(SimpleNamespace(model=model), temperature)
    ids = torch.randint(3, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[2, 9:] = -100  # a shorter row
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    grads = []
    for forward in (fused, model):
        model.zero_grad()
        out = forward(**batch, fused_lm_head=True)
        out.loss.backward()
        grads.append(model.lm_head.weight.grad.clone())
        got = {k: getattr(out, k) for k in ("log_probs", "entropy", "is_top1", "label_mask")}
        if forward is fused:
            want = got
    for key in ("log_probs", "entropy"):
        assert torch.allclose(got[key], want[key], atol=1e-5), key
    assert torch.equal(got["is_top1"].bool(), want["is_top1"].bool())
    assert torch.equal(got["label_mask"], want["label_mask"]) and int(got["label_mask"].sum()) == 7 + 7 + 4
    assert float(got["log_probs"][:, :4].abs().sum()) == 0.0 and float(got["log_probs"][:, 4:8].abs().min()) > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    import cft.train

    heads = []  # the plain path calls the model's head module; TRL's multiplies by its weight in tiles
    model.lm_head.register_forward_hook(lambda *_: heads.append(1))
    model(**batch, fused_lm_head=True)
    monkeypatch.setattr(cft.train, "PLAIN_HEAD_MAX_LOGITS", ids.numel())  # a batch too large for whole logits
    model(**batch, fused_lm_head=True)
    assert heads == [1]


def test_progress_line_shows_the_chosen_metrics_and_a_summary_in_full(capsys, monkeypatch):
    """GRPO logs some 30 metrics a step; with ``keys`` the line shows those (short names, in order), and a log
    holding none of them (the run's closing summary) is printed whole."""
    from types import SimpleNamespace

    from cft.train import TrainProgress

    monkeypatch.setenv("CFT_PROGRESS_SECONDS", "3600")
    cb = TrainProgress("grpo", {"reward": "reward", "completions/mean_length": "completion_length"})
    state = SimpleNamespace(is_local_process_zero=True, max_steps=4, global_step=0, num_input_tokens_seen=0)
    cb.on_train_begin(SimpleNamespace(disable_tqdm=True), state, None)
    state.global_step = 1
    cb.on_log(None, state, None, logs={"clip_ratio/low_mean": 0.0, "completions/mean_length": 58.0912,
                                       "reward": 0.265625, "num_tokens": 100.0})
    cb.on_log(None, state, None, logs={"train_runtime": 12.5, "total_flos": 1.0})
    cb.on_train_end(None, state, None)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("grpo step")]
    assert lines == ["grpo step 1/4: reward 0.2656, completion_length 58.09", "grpo step 1/4: train_runtime 12.5"]
