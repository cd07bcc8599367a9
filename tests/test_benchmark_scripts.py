"""The benchmark scripts run end to end on the testbed (behaviour only: their timings are not checked)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cft.artifacts import load_records

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_identify_speed_prints_identical_labels_and_a_full_length_ceiling(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "identify_speed.py"), "--responses", "2", "--problems", "20",
           "--max-new-tokens", "96", "--ceiling-tokens", "12", "--batch-size", "16", "--keep", str(tmp_path),
           "--fast-runs", "2", "--compare-dtype", "bfloat16", "--crosscheck", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    last = (r"speedup=\d+\.\d labels_identical=true ceiling_fraction=\d+\.\d\d forward_ceiling_tok_s=\d+ "
            r"vs_bare=\d+\.\d\d step_efficiency=\d+\.\d\d tokens_per_forward=\d+\.\d\d "
            r"vs_bare_bound=\d+\.\d\d dtype_speedup=\d+\.\d\d crosschecked=(\d+) disagreements=(\d+) "
            r"disagreements_near_tie=(\d+)")
    m = re.fullmatch(last, lines[-1])
    assert m, lines[-1]
    crosschecked, disagreements, near = map(int, m.groups())
    assert crosschecked >= 3 and near == disagreements  # bf16 against bf16: any disagreement is a near-tie
    assert sum(x.startswith("dtype ") for x in lines) == 2
    # the script's own verdict is not trusted: the two engines' labels are compared here
    ref, fast = (load_records(tmp_path / f"labels-{e}.jsonl", "labels") for e in ("reference", "fast"))
    assert len(ref) == len(fast) == 2
    assert [r["critical"] for r in ref] == [r["critical"] for r in fast]
    assert [r["eligible"] for r in ref] == [r["eligible"] for r in fast]
    assert [r["response_ids"] for r in ref] == [r["response_ids"] for r in fast]
    for a, b in zip(ref, fast):
        for t, (xs, ys) in enumerate(zip(a["branches"], b["branches"], strict=True)):
            for j, (x, y) in enumerate(zip(xs, ys, strict=True)):
                assert y["ok"] is None or (x["ids"], x["ok"]) == (y["ids"], y["ok"]), (a["id"], t)
                # the fast engine leaves a branch unrun only after an earlier alternative succeeded; the reference
                # runs every branch
                assert x["ok"] is not None and (y["ok"] is not None or any(z["ok"] for z in ys[:j])), (a["id"], t)
    ceiling = next(x for x in lines if x.startswith("ceiling"))
    assert "batch=16 new_tokens=12 " in ceiling  # every row decoded the full length: no early stop
    engines = {x.split()[0]: dict(kv.split("=") for kv in x.split()[1:])
               for x in lines if x.startswith(("reference ", "fast "))}
    assert set(engines) == {"reference", "fast"}
    assert engines["reference"]["responses"] == engines["fast"]["responses"] == "2"
    assert engines["reference"]["critical_fraction"] == engines["fast"]["critical_fraction"]
    # the fast engine skips rank-3 branches after a rank-2 success, never adds any
    assert int(engines["fast"]["branches"]) <= int(engines["reference"]["branches"])


def test_eval_speed_runs_both_backends_and_reports_identical_greedy_outputs():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "eval_speed.py"), "--splits", "testbed:test", "--problems", "6",
           "--sampled-problems", "2", "--samples", "4", "--max-new-tokens", "48", "--batch-size", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    last = (r"speedup=\d+\.\d\d greedy_identical=true greedy_acc_hf=(\S+) greedy_acc_engine=(\S+) "
            r"sample_acc_hf=[\d.]+ sample_acc_engine=[\d.]+ entropy_hf=[\d.]+ entropy_engine=[\d.]+ "
            r"sampled_z=[\d.]+ hf_s=[\d.]+ engine_s=[\d.]+ speedup_same_rows=[\d.]+ hf_rows_s=[\d.]+ rows=(\d+) "
            r"forward_ceiling_tok_s=(\d+) engine_vs_bare=([\d.]+) needed_vs_bare=([\d.]+)")
    m = re.fullmatch(last, lines[-1])
    assert m, lines[-1]
    assert m[1] == m[2]
    # the header names the machine: its CPU, torch's CPU capability and whether bfloat16 is native
    assert re.fullmatch(r"machine: cpu='.+' cores=\d+ capability=\w+ native_bf16=(true|false) threads=\d+ .*torch=\S+",
                        lines[0]), lines[0]
    assert int(m[3]) >= 8  # the engine's rows: at least the batch size, from free memory
    assert int(m[4]) > 0 and float(m[5]) > 0 and float(m[6]) > 0
    assert re.search(rf"^bare    forward loop .* batch=\d+ width=\d+ q=1 tok/s={m[4]}$", proc.stdout, re.M)
    backends = {x.split()[0]: dict(kv.split("=") for kv in x.split()[1:])
                for x in lines if x.startswith(("hf ", "engine ", "hf_rows "))}
    # 6 greedy; 2 problems x (1 greedy + 4 samples)
    assert backends["hf"]["outputs"] == backends["engine"]["outputs"] == backends["hf_rows"]["outputs"] == "16"
    assert backends["hf"]["rows"] == "8" and backends["engine"]["rows"] == backends["hf_rows"]["rows"] == m[3]
    for b in backends.values():
        assert int(b["forwards"]) > 0 and 0 < float(b["tokens_per_forward"]) <= int(b["rows"])  # a token a row


@pytest.mark.slow
def test_identify_ab_against_the_same_checkout_finds_the_same_bytes():
    """Two workers on one source tree: the alternation runs, and both label files are byte-identical (a rerun
    writes the same bytes); the comparison on the fields both have agrees."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "identify_ab.py"), "--other", str(ROOT / "src"),
           "--responses", "2", "--problems", "20", "--rounds", "1", "--draft", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert sum(x.startswith(("this ", "other ")) for x in lines) == 4  # a warm-up pair and one timed pair
    assert re.fullmatch(r"this_over_other=\d+\.\d{3} pairwise_median=\d+\.\d{3} pairwise_min=\d+\.\d{3} "
                        r"pairwise_max=\d+\.\d{3} rounds=1 labels_identical=true files_identical=true", lines[-1])


def test_dtype_speed_alternates_the_two_dtypes_and_prints_the_ratios():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "dtype_speed.py"), "--problems", "4", "--max-new-tokens", "16",
           "--batch", "2", "--seq", "16", "--rounds", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    runs = [line for line in lines if line.startswith("round ")]
    assert [r.split(":")[0] for r in runs] == ["round 0 (warm-up) float32", "round 0 (warm-up) bfloat16",
                                              "round 1 bfloat16", "round 1 float32",
                                              "round 2 float32", "round 2 bfloat16"]
    assert all(("fused head" in r) == (" bfloat16:" in r) for r in runs)  # the head is compared in bfloat16
    assert re.fullmatch(r"decode_bf16_over_fp32=\d+\.\d{3} train_fp32_over_bf16=\d+\.\d{3} decode_fp32_tok_s=[\d.]+ "
                        r"decode_bf16_tok_s=[\d.]+ train_fp32_s=[\d.]+ train_bf16_s=[\d.]+ "
                        r"fused_over_plain=\d+\.\d{3} train_bf16_fused_s=[\d.]+ "
                        r"native_bf16=(true|false) rounds=1", lines[-1]), lines[-1]
