"""The benchmark scripts run end to end on the testbed (behaviour only: their timings are not checked)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_identify_speed_prints_identical_labels_and_a_full_length_ceiling():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "identify_speed.py"), "--responses", "2", "--problems", "20",
           "--max-new-tokens", "96", "--ceiling-tokens", "12", "--batch-size", "16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    last = (r"speedup=\d+\.\d labels_identical=true ceiling_fraction=\d+\.\d\d forward_ceiling_tok_s=\d+ "
            r"vs_bare=\d+\.\d\d step_efficiency=\d+\.\d\d tokens_per_forward=\d+\.\d\d")
    assert re.fullmatch(last, lines[-1]), lines[-1]
    ceiling = next(x for x in lines if x.startswith("ceiling"))
    assert "batch=16 new_tokens=12 " in ceiling  # every row decoded the full length: no early stop
    engines = {x.split()[0]: dict(kv.split("=") for kv in x.split()[1:])
               for x in lines if x.startswith(("reference ", "fast "))}
    assert set(engines) == {"reference", "fast"}
    assert engines["reference"]["responses"] == engines["fast"]["responses"] == "2"
    assert engines["reference"]["critical_fraction"] == engines["fast"]["critical_fraction"]
    # the fast engine skips rank-3 branches after a rank-2 success, never adds any
    assert int(engines["fast"]["branches"]) <= int(engines["reference"]["branches"])
