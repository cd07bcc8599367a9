"""Mutation check: plant deliberate bugs in a copy of the source and show that the tests catch each one.

Each mutation is (name, file, old snippet, new snippet, tests). The script copies ``src/`` to a
temporary folder, replaces the snippet there (the working tree is never touched), and runs the named
tests against the copy (``PYTHONPATH`` points at it). A mutation is CAUGHT when the tests fail, and
SURVIVED when they pass - a hole in the suite. Before the mutations the same tests run on the unmodified
copy and must pass, so a failure is the mutation's doing. When a snippet is no longer in its file (the
code was rewritten), the mutation is reported as NOT FOUND and needs updating; nothing is guessed.

    python benchmarks/mutation_check.py            # all mutations
    python benchmarks/mutation_check.py -k dft     # those whose name contains "dft"

Exit code 0 only when every mutation was applied and caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to src/cft
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or "file::-k expr" selections


MUTATIONS = [
    Mutation(
        "critical iff ANY alternative fails (instead of every one)", "identify.py",
        'critical = [int(bool(res) and all(r is not None and not r["ok"] for r in res)) for res in work.results]',
        'critical = [int(bool(res) and any(r is not None and not r["ok"] for r in res)) for res in work.results]',
        ("tests/test_identify.py::test_critical_rule_on_hand_built_model",),
    ),
    Mutation(
        "fast engine never runs rank 3 after a failed rank 2", "decoding/engine.py",
        "if not ok and j + 1 < len(work.alternatives[t]):",
        "if not ok and j + 1 < len(work.alternatives[t][:1]):",
        ("tests/test_identify.py::test_critical_rule_on_hand_built_model",
         "tests/test_identify.py::test_fast_engine_equals_reference_token_for_token"),
    ),
    Mutation(
        "selection mask shifted by one token", "selection.py",
        '"labels": pad + [t if m else -100 for t, m in zip(rec.response_ids, mask, strict=True)],',
        '"labels": pad + [t if m else -100 for t, m in zip(rec.response_ids, [0, *mask[:-1]], strict=True)],',
        ("tests/test_selection.py::test_example_layout_label_alignment_and_weights",
         "tests/test_train.py::test_label_alignment_through_fused_head"),
    ),
    Mutation(
        "DFT weight not detached", "train.py",
        "per_token = per_token * log_probs.detach().exp()",
        "per_token = per_token * log_probs.exp()",
        ("tests/test_train.py::test_dft_gradient_is_the_detached_weight_formula",),
    ),
    Mutation(
        "biased pass@k estimator 1 - (1 - c/n)^k", "evaluate.py",
        "return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))",
        "return float(1 - (1 - Fraction(c, n)) ** k)",
        ("tests/test_evaluate.py::test_pass_at_k_equals_enumeration_over_all_subsets",),
    ),
    Mutation(
        "skip_confident ignores its threshold (skips nothing)", "identify.py",
        "cfg.skip_confident is not None and top1_prob[t] >= cfg.skip_confident",
        "cfg.skip_confident is not None and top1_prob[t] >= 2.0",
        ("tests/test_exact_values.py::test_skip_confident_threshold_splits_positions",),
    ),
    Mutation(
        "sampling entropy of the untempered distribution", "decoding/hf.py",
        "        scores = scores.float() / self.temperature\n        logp = torch.log_softmax(scores, dim=-1)",
        "        logp = torch.log_softmax(scores.float(), dim=-1)\n        scores = scores.float() / self.temperature",
        ("tests/test_exact_values.py::test_sampling_entropy_equals_the_closed_form",),
    ),
    Mutation(
        "transfer returns the source labels unchanged", "transfer.py",
        'critical = [int(any(s < end and start < e for s, e in spans)) for start, end in enc["offset_mapping"]]',
        'critical = list(rec["critical"][:-1])',
        ("tests/test_transfer.py::test_transfer_testbed_to_smollm2_marks_the_hand_checked_target_tokens",),
    ),
    Mutation(
        "each writer locks a file of its own (no exclusion)", "artifacts.py",
        "self.lock = ArtifactLock(self.out)",
        "self.lock = ArtifactLock(str(self.out) + f'.{os.getpid()}')",
        ("tests/test_faults.py::test_a_second_writer_is_refused_naming_the_holder_then_a_killed_holder_is_taken_over",),
    ),
]


def run_tests(src: Path, tests: tuple[str, ...]) -> tuple[bool, str]:
    """Run the tests against ``src``; (passed, the last line of pytest's summary)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    env.pop("CFT_REQUIRE_ASSETS", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore",
                           *tests], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    lines = [x for x in proc.stdout.strip().splitlines() if x.strip()]
    return proc.returncode == 0, (lines[-1] if lines else proc.stderr.strip()[-200:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-k", default="", help="only mutations whose name contains this")
    args = p.parse_args()
    chosen = [m for m in MUTATIONS if args.k.lower() in m.name.lower()]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        ok, line = run_tests(src, tests)
        print(f"baseline (no mutation): {'pass' if ok else 'FAIL'}  [{line}]", flush=True)
        if not ok:
            print("the tests fail without any mutation; fix that first", file=sys.stderr)
            return 1
        for m in chosen:
            path = src / "cft" / m.file
            original = path.read_text()
            count = original.count(m.old)
            if count != 1:
                verdict, line = "NOT FOUND" if count == 0 else f"AMBIGUOUS ({count} matches)", f"src/cft/{m.file}"
            else:
                path.write_text(original.replace(m.old, m.new))
                try:
                    passed, line = run_tests(src, m.tests)
                finally:
                    path.write_text(original)
                verdict = "SURVIVED" if passed else "CAUGHT"
            results.append(verdict)
            print(f"{verdict:9s} {m.name}  ({m.file}; {', '.join(t.split('::')[-1] for t in m.tests)})  [{line}]",
                  flush=True)
    caught = results.count("CAUGHT")
    print(f"{caught}/{len(results)} mutations caught")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
