"""Does the early stop decide labels? Default labels vs an independent reference, and what the answer stop changes.

Greedy responses (decoded to EOS or the cap, graded by their last answer, as ``cft eval`` grades) are labelled
by ``cft.identify`` twice: with the default rule (every branch decoded to EOS or the length cap) and with the
opt-in ``--stop-at-answer`` speed knob (a branch ends at its first complete answer; the run audits itself).
An independent reference then labels the same responses without ``cft``'s decoders: its own teacher-forced
ranking, a plain greedy loop over the model's forward per branch to EOS or stage A's length cap, and
``cft.verify`` on the whole text. The lines printed:

    rule=eos|answer decoded_tokens=<n> seconds=<s> ...     the decoding cost of each rule (seconds are wall time)
    label_changes=<share> positions=<n> changed=<n> branch_verdicts_changed=<n of branches run by both>
    reference ...                                          the reference's own cost
    default_label_changes=<share> positions=<n> changed=<n> near_tie_positions=<n>

``default_label_changes`` compares the default labels with the reference on every position that is not a
near-tie (a branch or alternative logit gap below the tolerance, in either); it must be 0. ``label_changes``
compares the answer stop with the default (the share of positions the speed knob relabels).

    python benchmarks/stop_rule.py                                   # testbed model, 50 correct responses
    python benchmarks/stop_rule.py --model smollm2 --data benchmarks/data/simple_sums.jsonl --gold self \\
        --responses 5 --problems 20 --max-new-tokens 64
    python benchmarks/stop_rule.py --model zoo:qwen2.5 --zoo-seed 7 --gold self --responses 10 --max-new-tokens 96

``--gold self`` takes each response's own final answer as its gold, for a model that rarely solves a problem.
``zoo:FAMILY`` with ``--zoo-seed S`` builds that family with seed S (``cft.zoo.build``; the tests use seed 0).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from cft import verify
from cft.artifacts import load_records
from cft.decoding.api import DecodeConfig
from cft.generate import GenerateConfig, generate
from cft.identify import DEFAULT_TOLERANCE, IdentifyConfig, identify
from cft.models import cache_kwarg, load_model, machine_line


def responses(model, tok, args, work: Path) -> Path:
    """Greedy responses decoded to EOS, the first ``--responses`` correct ones (any, with ``--gold self``)."""
    gen = work / "generations.jsonl"
    generate(GenerateConfig(model=args.model, data=args.data, out=str(gen), template=args.template,
                            limit=args.problems, dtype=args.dtype, device=args.device,
                            decode=DecodeConfig(max_new_tokens=args.max_new_tokens)),
             model=model, tok=tok)
    records = load_records(gen, "generations")
    if args.gold == "self":
        for r in records:
            r["gold"], r["correct"] = verify.extract_answer(r["response"]) or "<none>", True
    chosen = [r for r in records if r["correct"] and r["finish"] != "length"][: args.responses]
    if not chosen:
        raise SystemExit(f"no correct response in {len(records)} problems; raise --problems or use --gold self")
    out = work / "chosen.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    out.with_name(out.name + ".meta.json").write_text(gen.with_name(gen.name + ".meta.json").read_text())
    return out


def labels(model, tok, args, gen: Path, work: Path, stop_at_answer: bool) -> tuple[list[dict], dict, float]:
    """Labels, summary and wall seconds (the answer stop's audit included) under one rule."""
    out = work / f"labels-stop{int(stop_at_answer)}.jsonl"
    t0 = time.time()
    summary = identify(IdentifyConfig(model=args.model, input=str(gen), out=str(out), k=args.k,
                                      stop_at_answer=stop_at_answer or None), model=model, tok=tok)
    return load_records(out, "labels"), summary, time.time() - t0


# -- the independent reference: nothing of cft's decoders, ranking or protocol -------------------------


def eos_ids(tok, model) -> set[int]:
    """The tokenizer's EOS, the checkpoint's EOS ids and ``<|im_end|>``: where a chat model's response ends."""
    ids = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    for eos in (model.generation_config.eos_token_id, model.config.eos_token_id):
        ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if isinstance(i, int) and i != tok.unk_token_id}


@torch.inference_mode()
def greedy_to_end(model, ids: list[int], cap: int, eos: set[int]) -> tuple[list[int], float]:
    """Argmax (lowest id on a tie) one token at a time over the model's own cache, until EOS or ``cap`` tokens;
    returns the tokens and the smallest top-1 minus top-2 logit gap on the way (inf: nothing decoded)."""
    new: list[int] = []
    gap = float("inf")
    if cap <= 0:
        return new, gap
    out = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True)
    while True:
        logits = out.logits[0, -1].float()
        nxt = int(torch.argmax(logits))
        top = torch.topk(logits, 2).values
        gap = min(gap, float(top[0] - top[1]))
        new.append(nxt)
        if nxt in eos or len(new) >= cap:
            return new, gap
        cache = cache_kwarg(model)  # the forward's name for it: ``cache`` in newer transformers
        out = model(input_ids=torch.tensor([[nxt]], device=model.device), use_cache=True,
                    **{cache: getattr(out, cache)})


@torch.inference_mode()
def eos_reference(model, tok, rec: dict, k: int, max_new_tokens: int, tol: float, only: set[int] | None = None) -> dict:
    """One response's labels the plain way: per position, the first k-1 tokens other than y_t in the order
    (-logit, id), each decoded greedily to EOS or the cap and graded on the whole text; critical iff every one
    is wrong. Also per position whether anything came within ``tol`` of a tie (then either label may be right).
    ``only``: the positions to label (the others are None)."""
    prompt, response, gold = rec["prompt_ids"], rec["response_ids"], rec["gold"]
    eos = eos_ids(tok, model)
    logits = model(input_ids=torch.tensor([prompt + response], device=model.device)).logits[0].float()
    logits = logits[len(prompt) - 1 : -1]
    critical, near, branches, tokens = [], [], 0, 0
    for t, y in enumerate(response):
        if y in eos or (only is not None and t not in only):
            critical.append(None)
            near.append(False)
            continue
        values, order = torch.sort(logits[t], descending=True, stable=True)
        others = [(int(a), float(v)) for a, v in zip(order[: k + 1], values[: k + 1]) if int(a) != y]
        tied = len(others) > k - 1 and others[k - 2][1] - others[k - 1][1] < tol
        oks = []
        for a, _ in others[: k - 1]:
            # an EOS alternative ends its response at once; any other is followed to EOS or the cap
            cap = 0 if a in eos else max_new_tokens - (t + 1)
            cont, gap = greedy_to_end(model, prompt + response[:t] + [a], cap, eos)
            text = tok.decode(response[:t] + [a] + cont, skip_special_tokens=True)
            oks.append(verify.grade_detailed(text, gold).correct)
            tied |= gap < tol
            branches += 1
            tokens += len(cont)
        critical.append(int(not any(oks)))
        near.append(tied)
    return {"critical": critical, "near": near, "branches": branches, "tokens": tokens}


def compare_with_reference(model, tok, default: list[dict], k: int, max_new_tokens: int, tol: float,
                           sample: int | None = None, seed: int = 0) -> dict:
    """``eos_reference`` against the labels ``default`` on every eligible position (``sample``: a seeded sample)."""
    eligible = [(i, t) for i, rec in enumerate(default) for t, e in enumerate(rec["eligible"]) if e]
    if sample is not None:
        eligible = random.Random(seed).sample(eligible, min(sample, len(eligible)))
    positions = changed = near_ties = branches = tokens = 0
    details = []
    t0 = time.time()
    for i, rec in enumerate(default):
        only = {t for j, t in eligible if j == i}
        if not only:
            continue
        ref = eos_reference(model, tok, rec, k, max_new_tokens, tol, only)
        branches += ref["branches"]
        tokens += ref["tokens"]
        for t, (crit, elig) in enumerate(zip(rec["critical"], rec["eligible"])):
            if not elig or ref["critical"][t] is None:
                continue
            flagged = ref["near"][t] or (rec["alt_margin"][t] is not None and rec["alt_margin"][t] < tol) or any(
                b["margin"] is not None and b["margin"] < tol for b in rec["branches"][t])
            if flagged:
                near_ties += 1
                continue
            positions += 1
            if crit != ref["critical"][t]:
                changed += 1
                details.append((rec["id"], t, crit, ref["critical"][t]))
    return {"positions": positions, "changed": changed, "near_ties": near_ties, "branches": branches,
            "tokens": tokens, "seconds": time.time() - t0, "details": details[:10]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="testbed")
    p.add_argument("--zoo-seed", type=int, default=None, help="with --model zoo:FAMILY: build it with this seed")
    p.add_argument("--data", default="testbed:test")
    p.add_argument("--template", default="chat")
    p.add_argument("--responses", type=int, default=50)
    p.add_argument("--problems", type=int, default=100, help="problems to generate from")
    p.add_argument("--gold", choices=["data", "self"], default="data")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--no-reference", action="store_true", help="skip the independent reference")
    p.add_argument("--reference-sample", type=int, default=None, metavar="N",
                   help="the reference labels a seeded sample of N positions (default: every position)")
    args = p.parse_args()
    print(f"machine: {machine_line()}", flush=True)  # the CPU, its capability and bf16 support: which machine
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model.startswith("zoo:") and args.zoo_seed is not None:
            from cft import zoo

            args.model = str(zoo.build(args.model.removeprefix("zoo:"), work / "zoo", seed=args.zoo_seed))
        model, tok = load_model(args.model, args.dtype, args.device)
        gen = responses(model, tok, args, work)
        default, s_eos, sec_eos = labels(model, tok, args, gen, work, False)
        early, s_ans, sec_ans = labels(model, tok, args, gen, work, True)
    tol = DEFAULT_TOLERANCE[args.dtype]
    print(f"model={args.model} zoo_seed={args.zoo_seed} responses={len(default)} k={args.k} "
          f"max_new_tokens={args.max_new_tokens} dtype={args.dtype} threads={torch.get_num_threads()}")
    print(f"rule=eos    decoded_tokens={s_eos['decoded_tokens']} seconds={sec_eos:.1f} branches={s_eos['branches']} "
          f"critical_fraction={s_eos['critical_fraction']:.4f}")
    audit = s_ans["stop_audit"]
    print(f"rule=answer decoded_tokens={s_ans['decoded_tokens']} seconds={sec_ans:.1f} branches={s_ans['branches']} "
          f"critical_fraction={s_ans['critical_fraction']:.4f} audit_tokens={audit['decoded_tokens']} "
          f"stopped={audit['stopped']} audit_checked={audit['checked']} "
          f"audit_verdicts_changed={audit['verdicts_changed']} audit_labels_changed={audit['labels_changed']} "
          f"audit_labels_unsettled={audit['labels_unsettled']}")
    positions = changed = branches = verdicts = 0
    for a, b in zip(early, default, strict=True):
        for ca, cb, ea, eb, ba, bb in zip(a["critical"], b["critical"], a["eligible"], b["eligible"],
                                          a["branches"], b["branches"]):
            if ea and eb:
                positions += 1
                changed += ca != cb
            for x, y in zip(ba, bb):
                if x["ok"] is not None and y["ok"] is not None:
                    branches += 1
                    verdicts += x["ok"] != y["ok"]
    print(f"label_changes={changed / max(positions, 1):.4f} positions={positions} changed={changed} "
          f"branch_verdicts_changed={verdicts} of {branches}")
    if not args.no_reference:
        ref = compare_with_reference(model, tok, default, args.k, args.max_new_tokens, tol, args.reference_sample)
        print(f"reference (own ranking, a plain greedy loop per branch to EOS/cap, cft.verify) "
              f"positions_sampled={args.reference_sample or 'all'} branches={ref['branches']} "
              f"decoded_tokens={ref['tokens']} seconds={ref['seconds']:.1f}")
        print(f"default_label_changes={ref['changed'] / max(ref['positions'], 1):.4f} positions={ref['positions']} "
              f"changed={ref['changed']} near_tie_positions={ref['near_ties']} (tolerance {tol:g}) {ref['details']}")


if __name__ == "__main__":
    main()
