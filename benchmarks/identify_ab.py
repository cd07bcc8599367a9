"""Stage B speed of this checkout against another checkout's, alternated run by run on one set of generations.

Two worker processes, one per source tree (this one's ``src`` and ``--other``, e.g. a worktree of an older
commit), each load the model once and then run the fast engine's ``cft identify`` on the same generations
whenever told; the runs alternate in ABBA order after one warm-up pair that is not counted, so drift and a
noisy neighbour hit both sides alike, and only one side runs at a time. Prints every run (seconds, tokens/s, the
draft width it chose) and as its last line

    this_over_other=<total seconds of this checkout / of the other> pairwise_median=<...> pairwise_min=<...>
    pairwise_max=<...> rounds=<n> labels_identical=<true|false> files_identical=<true|false>

(one line): ``labels_identical`` compares the two label files without their margins (``without_margins``),
``files_identical`` byte for byte. Timings are each run's own ``summary.seconds`` (model loading excluded).

    git worktree add --detach /tmp/before <commit>
    python benchmarks/identify_ab.py --other /tmp/before/src --responses 40 --problems 150 --rounds 6
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from cft.artifacts import load_records
from cft.generate import GenerateConfig, generate
from cft.identify import without_margins
from cft.models import machine_line

WORKER = """
import json, os, sys
from cft.identify import IdentifyConfig, identify
from cft.models import load_model
model_name, dtype, gens, out, draft = sys.argv[1:6]
model, tok = load_model(model_name, dtype, "cpu", None)
print("ready", flush=True)
for _ in sys.stdin:
    for f in (out, out + ".meta.json", out + ".partial"):
        if os.path.exists(f):
            os.remove(f)
    s = identify(IdentifyConfig(model=model_name, input=gens, out=out, dtype=dtype,
                                draft=None if draft == "timed" else int(draft)), model, tok)
    print(json.dumps({"seconds": s["seconds"], "tokens": s["decoded_tokens"],
                      "draft": (s.get("engine") or {}).get("draft")}), flush=True)
"""


def correct_generations(model: str, problems: int, responses: int, work: Path) -> Path:
    """Greedy testbed:test solutions by this checkout; the first ``responses`` correct ones."""
    gens = work / "generations.jsonl"
    generate(GenerateConfig(model=model, data="testbed:test", limit=problems, out=str(gens), dtype="float32"))
    kept = [line for line in gens.read_text().splitlines() if json.loads(line)["correct"]][:responses]
    if len(kept) < responses:
        sys.exit(f"only {len(kept)} correct responses in {problems} problems; raise --problems")
    chosen = work / "chosen.jsonl"
    chosen.write_text("".join(line + "\n" for line in kept))
    meta = json.loads((work / "generations.jsonl.meta.json").read_text())
    (work / "chosen.jsonl.meta.json").write_text(json.dumps(meta))
    return chosen


def shared(rec: dict, other: dict) -> dict:
    """``rec`` without margins, on the fields both records have but the schema and the key (the key hashes the
    labelling parameters, an older version's included, not the labels): labels, verdicts and continuations."""
    rec = without_margins(rec)
    return {k: v for k, v in rec.items() if k in other and k not in ("schema", "key")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--other", required=True, help="the other checkout's src folder (holds its cft package)")
    ap.add_argument("--model", default="testbed")
    ap.add_argument("--responses", type=int, default=40)
    ap.add_argument("--problems", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=6, help="timed runs per side (ABBA after a warm-up pair)")
    ap.add_argument("--draft", default="timed", help="'timed' (each run chooses, the default) or a fixed width")
    args = ap.parse_args()
    here = str(Path(__file__).resolve().parents[1] / "src")
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gens = correct_generations(args.model, args.problems, args.responses, work)
        sides = {"this": here, "other": str(Path(args.other).resolve())}
        procs = {}
        for name, src in sides.items():
            out = str(work / f"labels-{name}.jsonl")
            procs[name] = subprocess.Popen(
                [sys.executable, "-c", WORKER, args.model, "float32", str(gens), out, args.draft],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=tmp,
                env=dict(os.environ, PYTHONPATH=src))
            if procs[name].stdout.readline().strip() != "ready":
                sys.exit(f"the {name} worker ({src}) did not start")
        seconds: dict[str, list[float]] = {"this": [], "other": []}

        def run(name: str, count: bool) -> None:
            procs[name].stdin.write("go\n")
            procs[name].stdin.flush()
            r = json.loads(procs[name].stdout.readline())
            print(f"{name:5s} {r['seconds']:6.2f}s {r['tokens'] / r['seconds']:8.0f} tok/s draft {r['draft']}"
                  f"{'' if count else ' (warm-up)'}", flush=True)
            if count:
                seconds[name].append(r["seconds"])

        run("other", False)
        run("this", False)
        for i in range(args.rounds):
            for name in (("other", "this") if i % 2 == 0 else ("this", "other")):
                run(name, True)
        for p in procs.values():
            p.stdin.close()
            p.wait()
        labels = {n: load_records(work / f"labels-{n}.jsonl", "labels") for n in sides}
        pairs = list(zip(labels["this"], labels["other"]))
        same_labels = len(labels["this"]) == len(labels["other"]) and all(shared(a, b) == shared(b, a)
                                                                            for a, b in pairs)
        same_files = (work / "labels-this.jsonl").read_bytes() == (work / "labels-other.jsonl").read_bytes()
    ratios = [a / b for a, b in zip(seconds["this"], seconds["other"])]
    print(f"this_over_other={sum(seconds['this']) / sum(seconds['other']):.3f} "
          f"pairwise_median={statistics.median(ratios):.3f} pairwise_min={min(ratios):.3f} "
          f"pairwise_max={max(ratios):.3f} rounds={args.rounds} labels_identical={str(same_labels).lower()} "
          f"files_identical={str(same_files).lower()}")


if __name__ == "__main__":
    main()
