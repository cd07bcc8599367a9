"""Does the early stop change labels? Stage B with the answer-complete stop vs decoding every branch to EOS.

Greedy generations are labelled twice by ``cft.identify`` (same responses, same engine), once with
``stop_at_answer`` and once without; the last line is
``label_changes=<share of positions whose critical label differs> positions=<tested> changed=<n>
branch_verdicts_changed=<n of branches run by both>``. A share of ~0 means the stop rule is sound in
practice on this model (it saves decoding, it does not decide labels).

    python benchmarks/stop_rule.py                                   # testbed model, 50 correct responses
    python benchmarks/stop_rule.py --model smollm2 --gold self --responses 10 --max-new-tokens 128

``--gold self`` takes each response's own final answer (decoded to EOS) as its gold, for a model that
rarely solves a problem.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from cft.artifacts import load_records
from cft.generate import DecodeConfig, GenerateConfig, generate
from cft.identify import IdentifyConfig, identify
from cft.models import load_model, machine_line
from cft.verify import extract_answer


def responses(model, tok, args, work: Path) -> Path:
    """Greedy responses decoded to EOS, the first ``--responses`` correct ones (any, with ``--gold self``)."""
    gen = work / "generations.jsonl"
    generate(GenerateConfig(model=args.model, data=args.data, out=str(gen), template=args.template,
                            limit=args.problems, dtype=args.dtype, device=args.device,
                            decode=DecodeConfig(max_new_tokens=args.max_new_tokens, stop_at_answer=False)),
             model=model, tok=tok)
    records = load_records(gen, "generations")
    if args.gold == "self":
        for r in records:
            r["gold"], r["correct"] = extract_answer(r["response"]) or "<none>", True
    chosen = [r for r in records if r["correct"]][: args.responses]
    if not chosen:
        raise SystemExit(f"no correct response in {len(records)} problems; raise --problems or use --gold self")
    out = work / "chosen.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return out


def labels(model, tok, args, gen: Path, work: Path, stop_at_answer: bool) -> list[dict]:
    out = work / f"labels-stop{int(stop_at_answer)}.jsonl"
    identify(IdentifyConfig(model=args.model, input=str(gen), out=str(out), k=args.k, dtype=args.dtype,
                            device=args.device, max_new_tokens=args.max_new_tokens, stop_at_answer=stop_at_answer),
             model=model, tok=tok)
    return load_records(out, "labels")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="testbed")
    p.add_argument("--data", default="testbed:test")
    p.add_argument("--template", default="chat")
    p.add_argument("--responses", type=int, default=50)
    p.add_argument("--problems", type=int, default=100, help="problems to generate from")
    p.add_argument("--gold", choices=["data", "self"], default="data")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    args = p.parse_args()
    print(f"machine: {machine_line()}", flush=True)  # the CPU, its capability and bf16 support: which machine
    model, tok = load_model(args.model, args.dtype, args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        gen = responses(model, tok, args, work)
        early, full = (labels(model, tok, args, gen, work, stop) for stop in (True, False))
    positions = changed = branches = verdicts = 0
    for a, b in zip(early, full, strict=True):
        for ca, cb, ea, eb, ba, bb in zip(a["critical"], b["critical"], a["eligible"], b["eligible"],
                                          a["branches"], b["branches"]):
            if ea and eb:
                positions += 1
                changed += ca != cb
            for x, y in zip(ba, bb):
                if x["ok"] is not None and y["ok"] is not None:
                    branches += 1
                    verdicts += x["ok"] != y["ok"]
    print(f"model={args.model} responses={len(early)} k={args.k} max_new_tokens={args.max_new_tokens} "
          f"dtype={args.dtype}")
    print(f"label_changes={changed / max(positions, 1):.4f} positions={positions} changed={changed} "
          f"branch_verdicts_changed={verdicts} of {branches}")


if __name__ == "__main__":
    main()
