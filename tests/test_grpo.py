"""`cft grpo`: the prompts TRL builds equal the project's, the verifier reward, and a short run on a tiny model."""

from __future__ import annotations

import json

import pytest

from cft.grpo import GRPORunConfig, accuracy, grpo, prompt_for
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
    summary = grpo(GRPORunConfig(init=tiny_dir, out=str(out), limit=8, max_steps=2, prompts_per_step=2,
                                 num_generations=2, max_completion_length=12, lr=1e-4))
    rows = [json.loads(line) for line in (out / "grpo_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= row["reward"] <= 1.0 and row["accuracy"] == row["reward"]
        assert row["entropy"] > 0 and row["completion_length"] <= 12
    assert summary["global_step"] == 2 and summary["final"] == rows[-1]
    model, _ = load_model(str(out), device="cpu")  # the policy is saved as a standard checkpoint
    assert model.config.hidden_size == 32
