"""`cft grpo`: the prompts TRL builds equal the project's, the verifier reward, and a short run on a tiny model."""

from __future__ import annotations

import json

import pytest

from cft.grpo import accuracy, grpo, grpo_configs, prompt_for
from cft.models import load_model
from cft.prompts import render_ids
from tests.test_train import make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, testbed_tokenizer):
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", testbed_tokenizer))


@pytest.mark.parametrize("template", ["chat", "qwen25-math-cot", "gsm8k"])
def test_prompt_tokenizes_like_render_ids(tiny_dir, template):
    """TRL renders a conversational prompt with the chat template and tokenizes text prompts with special
    tokens; either way the ids must be the ones the rest of the project decodes from."""
    _, tok = load_model(tiny_dir, device="cpu")
    question = "Tom has 3 apples. He buys 2 more apples. How many apples does Tom have now?"
    prompt = prompt_for(tok, question, template)
    if isinstance(prompt, list):
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tok(text=prompt)["input_ids"]
    assert list(ids) == render_ids(tok, question, template)


def test_accuracy_reward_uses_the_verifier():
    chat = [[{"role": "assistant", "content": "3 + 2 = 5 apples. The answer is 5."}],
            [{"role": "assistant", "content": "The answer is 6."}]]
    assert accuracy(chat, answer=["5", "5"]) == [1.0, 0.0]
    assert accuracy(["so \\boxed{0.5}", "no answer"], answer=["1/2", "1"]) == [1.0, 0.0]


def test_short_grpo_run_logs_reward_accuracy_entropy(tiny_dir, tmp_path):
    out = tmp_path / "grpo"
    summary = grpo(*grpo_configs(init=tiny_dir, out=str(out), limit=8, max_steps=2, prompts_per_step=2,
                                  num_generations=2, max_completion_length=12, lr=1e-4))
    rows = [json.loads(line) for line in (out / "grpo_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= row["reward"] <= 1.0 and row["accuracy"] == row["reward"]
        assert row["entropy"] > 0 and row["completion_length"] <= 12
    assert summary["global_step"] == 2 and summary["final"] == rows[-1]
    model, _ = load_model(str(out), device="cpu")  # the policy is saved as a standard checkpoint
    assert model.config.hidden_size == 32


def test_cli_trains_a_lora_adapter_and_grpo_starts_from_it(tiny_dir, testbed_tokenizer, tmp_path):
    """`cft train --lora` saves an adapter folder; `cft grpo --init ADAPTER` loads it onto its base, merged.

    The random tiny policy earns reward 0 everywhere, so GRPO's gradient is zero and its saved policy is exactly
    the model it started from: the merged adapter, which differs from the base where LoRA trained."""
    import torch
    from safetensors.torch import load_file

    from cft.cli import main
    from tests.test_train import write_labels

    labels = write_labels(tmp_path / "labels.jsonl", testbed_tokenizer, 4)
    adapter = tmp_path / "adapter"
    assert main(["train", "--model", tiny_dir, "--input", str(labels), "--out", str(adapter), "--lora", "--lora-r",
                 "4", "--max-steps", "1", "--batch-size", "4", "--lr", "1e-2", "--warmup", "0"]) == 0
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    assert json.loads((adapter / "train_summary.json").read_text())["training_args"]["learning_rate"] == 1e-2

    out = tmp_path / "rl"
    assert main(["grpo", "--init", str(adapter), "--out", str(out), "--limit", "4", "--max-steps", "1",
                 "--prompts-per-step", "2", "--num-generations", "2", "--max-completion-length", "8"]) == 0
    summary = json.loads((out / "grpo_summary.json").read_text())
    assert summary["global_step"] == 1 and summary["config"]["init"] == str(adapter)
    assert summary["training_args"]["per_device_train_batch_size"] == 4  # 2 prompts x 2 generations
    assert summary["steps_per_pass"] == 2  # 4 problems, 2 a step
    policy, base = load_file(out / "model.safetensors"), load_file(f"{tiny_dir}/model.safetensors")
    merged, _ = load_model(str(adapter), device="cpu")
    assert set(policy) == set(base)  # a plain model, no LoRA weights
    for k, v in merged.state_dict().items():
        if k in policy:
            torch.testing.assert_close(policy[k], v, rtol=0, atol=1e-6, msg=k)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(policy[key], base[key])


class Interrupted(Exception):
    pass


def test_grpo_checkpoints_and_resumes_to_the_same_policy(tiny_dir, tmp_path, monkeypatch):
    """A run cut right after its step-2 checkpoint, resumed with --resume, ends with the uninterrupted run's weights
    and log; without --resume the leftover checkpoint is refused.

    The random tiny policy never answers correctly (every reward 0, so no gradient); a reward that varies between
    completions (their share of digit characters) makes the policy move, so equal weights mean something.
    """
    import torch
    from safetensors.torch import load_file
    from trl import GRPOTrainer

    import cft.grpo
    from cft.train import UsageError

    def digits(completions, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]

    monkeypatch.setattr(cft.grpo, "accuracy", digits)
    kw = dict(init=tiny_dir, limit=8, max_steps=4, prompts_per_step=2, num_generations=2, max_completion_length=8,
              lr=1e-3, save_steps=2)
    grpo(*grpo_configs(out=str(tmp_path / "whole"), **kw))

    save = GRPOTrainer._save_checkpoint

    def save_then_die(self, model, trial):
        save(self, model, trial)
        raise Interrupted

    with monkeypatch.context() as m:
        m.setattr(GRPOTrainer, "_save_checkpoint", save_then_die)
        with pytest.raises(Interrupted):
            grpo(*grpo_configs(out=str(tmp_path / "cut"), **kw))
    assert (tmp_path / "cut" / "checkpoint-2" / "trainer_state.json").is_file()
    with pytest.raises(UsageError, match="--resume"):
        grpo(*grpo_configs(out=str(tmp_path / "cut"), **kw))
    summary = grpo(*grpo_configs(out=str(tmp_path / "cut"), resume=True, **kw))
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 4

    whole, cut = (load_file(tmp_path / d / "model.safetensors") for d in ("whole", "cut"))
    start = load_file(f"{tiny_dir}/model.safetensors")
    assert any(not torch.equal(start[k], whole[k]) for k in start)  # the policy moved
    for k in whole:
        torch.testing.assert_close(cut[k], whole[k], rtol=0, atol=1e-6, msg=k)
    logs = [[json.loads(x) for x in (tmp_path / d / "grpo_log.jsonl").read_text().splitlines()] for d in ("whole",
                                                                                                          "cut")]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    for a, b in zip(*logs, strict=True):
        assert a["reward"] == b["reward"] and a["completion_length"] == b["completion_length"]


@pytest.mark.slow
def test_grpo_from_the_pretrained_testbed_gets_verifier_reward_and_moves_the_policy(tmp_path):
    """The pretrained testbed solves some problems, so the verifier's reward varies within a group, the advantage is
    not zero, and one GRPO step changes the weights (a random tiny model earns 0 everywhere and cannot show this)."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "grpo"
    grpo(*grpo_configs(init="testbed", out=str(out), limit=8, max_steps=1, prompts_per_step=4, num_generations=4,
                        max_completion_length=128, lr=1e-4, temperature=0.7))
    (row,) = [json.loads(line) for line in (out / "grpo_log.jsonl").read_text().splitlines()]
    assert 0.0 < row["reward"] < 1.0 and row["reward_std"] > 0 and row["frac_reward_zero_std"] < 1.0, row
    assert row["grad_norm"] > 0, row
    start, _ = load_model("testbed", device="cpu")
    after = load_file(out / "model.safetensors")
    changed = [k for k, v in start.state_dict().items() if k in after and not torch.equal(v, after[k])]
    assert changed, "GRPO left every weight unchanged"


@pytest.mark.slow
def test_grpo_two_processes_checkpoint_and_save_on_every_rank(tiny_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo on CPU): every rank enters the checkpoint and final
    saves (a rank-0-only save would hang under ZeRO-3/FSDP, where the others must take part), each rank's RNG state
    lands in the checkpoint, the policy is loadable and the output's lock is released."""
    import os
    import subprocess
    import sys

    from tests.test_train import SRC

    out = tmp_path / "grpo"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              "29533", "-m", "cft.grpo", "--init", tiny_dir, "--out", str(out), "--limit", "8", "--max-steps", "2",
              "--prompts-per-step", "1", "--num-generations", "2", "--max-completion-length", "8", "--save-steps", "1"]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in (out / "checkpoint-2").glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert json.loads((out / "grpo_summary.json").read_text())["global_step"] == 2
    model, _ = load_model(str(out), device="cpu")
    assert model.config.hidden_size == 32
    assert not (tmp_path / "grpo.lock").exists()


def _rloo():
    """benchmarks/rloo.py: the plain-torch RLOO loop (a script beside the package, not part of it)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "rloo.py"
    spec = importlib.util.spec_from_file_location("cft_bench_rloo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gain(rewards: list[float], part: int) -> float:
    return sum(rewards[-part:]) / part - sum(rewards[:part]) / part


# A trivially learnable task: the same 4 testbed problems at every step. The pretrained testbed solves about a third
# of its samples, so every group has reward variance; a correct policy gradient memorises the 4 solutions and the
# sampled reward climbs from ~0.3 towards 0.8 within 24 steps. The margin (+0.15, first 6 steps against the last 6)
# is under half of what seed 0 gave while this test was written (+0.40 through cft grpo, +0.35 with the loop); a
# trainer that samples one policy and scores another, flips the advantage, or drops the completion tokens stays
# near 0.3 or falls.
LEARNABLE = dict(limit=4, prompts_per_step=4, steps=24, lr=3e-4, k=8, max_new_tokens=128)
MARGIN = 0.15


def test_reference_rloo_batch_samples_each_prompt_as_if_alone(monkeypatch):
    """The loop decodes a step's prompts in one left-padded batch; with the draw replaced by the argmax, every
    prompt's completion must equal the one it gets decoded alone (padding, mask and positions are right)."""
    import torch

    rloo = _rloo()
    from cft.data import load_problems

    model, tok = load_model("testbed", device="cpu")
    prompts = [render_ids(tok, p.question) for p in load_problems("testbed:train", seed=0, limit=6)]
    assert len({len(p) for p in prompts}) > 1  # the batch needs padding
    monkeypatch.setattr(torch, "multinomial", lambda probs, n, generator=None: probs.argmax(-1, keepdim=True))
    args = (2, 48, tok.eos_token_id, tok.pad_token_id, 1.0, torch.Generator())
    together = rloo.sample(model, prompts, *args)
    alone = [rloo.sample(model, [p], *args)[0] for p in prompts]
    assert together == alone


@pytest.mark.slow
def test_reference_rloo_loop_raises_the_reward_on_a_learnable_set():
    rewards = _rloo().rloo("testbed", seed=0, **LEARNABLE)
    assert len(rewards) == LEARNABLE["steps"]
    assert _gain(rewards, 6) >= MARGIN, rewards


@pytest.mark.slow
def test_grpo_raises_the_reward_on_a_learnable_set(tmp_path):
    """The same task through `cft grpo` (TRL's GRPOTrainer): its logged reward must rise by the same margin."""
    s = LEARNABLE
    grpo(*grpo_configs(init="testbed", out=str(tmp_path / "grpo"), limit=s["limit"], seed=0, lr=s["lr"],
                        prompts_per_step=s["prompts_per_step"], num_generations=s["k"], max_steps=s["steps"],
                        max_completion_length=s["max_new_tokens"]))
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "grpo_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, s["steps"] + 1))
    assert _gain([r["reward"] for r in rows], 6) >= MARGIN, rows


def test_grpo_trains_on_what_it_sampled(tiny_dir, tmp_path, monkeypatch):
    """One GRPO step, captured: the prompt ids TRL sampled from are ``render_ids``'s, every completion ends at its
    first EOS (or at the length limit) with nothing after it, TRL's per-token log-probabilities equal a plain
    forward's on the unpadded sequences, and its loss has the gradient of textbook REINFORCE with TRL's
    advantages: -sum_i A_i sum_t grad log p(y_it) / (completion tokens of the step) (DAPO normalisation, one
    iteration, so the importance ratio is 1)."""
    import copy

    import torch
    from trl import GRPOTrainer

    import cft.grpo

    def length(completions, **kwargs):  # the random tiny policy never answers correctly; this reward varies
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [len(t) / 100 for t in texts]

    monkeypatch.setattr(cft.grpo, "accuracy", length)
    seen = {}
    original = GRPOTrainer._generate_and_score_completions

    def capture(self, inputs):
        seen["state"] = copy.deepcopy(self.model.state_dict())  # the policy that sampled
        seen["batch"], seen["inputs"], seen["trainer"] = original(self, inputs), inputs, self
        return seen["batch"]

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", capture)
    cfg, args = grpo_configs(init=tiny_dir, out=str(tmp_path / "grpo"), limit=4, max_steps=1, prompts_per_step=2,
                             num_generations=4, max_completion_length=8, lr=1e-4)
    grpo(cfg, args)
    batch, trainer = seen["batch"], seen["trainer"]
    model, tok = trainer.model, trainer.processing_class  # the policy TRL scores with (its fused LM head added)
    model.load_state_dict(seen["state"])
    model.eval()
    assert tok.pad_token_id != tok.eos_token_id  # the testbed tokenizer: a pad id that is not EOS
    advantages = batch["advantages"]
    assert advantages.abs().sum() > 0
    n_tokens = int(batch["completion_mask"].sum())
    plain_loss = 0.0
    for i in range(advantages.numel()):
        prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()]
        completion = batch["completion_ids"][i][batch["completion_mask"][i].bool()].tolist()
        question = seen["inputs"][i]["prompt"][-1]["content"]
        assert prompt.tolist() == render_ids(tok, question)
        if tok.eos_token_id in completion:
            assert completion.index(tok.eos_token_id) == len(completion) - 1
        else:
            assert len(completion) == 8
        ids = torch.tensor([prompt.tolist() + completion])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
        logp = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)
        plain_loss = plain_loss - advantages[i] * logp.sum() / n_tokens
        with torch.no_grad():
            trl_logp, _, _ = trainer._get_per_token_logps_and_entropies(
                model, torch.cat([batch["prompt_ids"][i:i + 1], batch["completion_ids"][i:i + 1]], 1),
                torch.cat([batch["prompt_mask"][i:i + 1], batch["completion_mask"][i:i + 1]], 1),
                batch["completion_ids"].size(1))
        torch.testing.assert_close(trl_logp[0, :len(completion)], logp.detach(), rtol=0, atol=1e-4)

    def gradient(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    plain = gradient(plain_loss)
    model.train()
    trl = gradient(trainer._compute_loss(model, batch))
    assert plain.norm() > 0
    torch.testing.assert_close(trl, plain, rtol=1e-3, atol=1e-6)


def test_steps_per_pass_counts_prompts_over_processes_and_accumulation():
    from cft.grpo import CFTGRPOConfig, steps_per_pass

    args = CFTGRPOConfig(output_dir="unused", prompts_per_step=8, num_generations=8)
    assert steps_per_pass(512, args) == 64 and steps_per_pass(513, args) == 65
    assert steps_per_pass(512, args, processes=2) == 32
    args = CFTGRPOConfig(output_dir="unused", prompts_per_step=4, num_generations=4, gradient_accumulation_steps=2)
    assert steps_per_pass(64, args) == 8
