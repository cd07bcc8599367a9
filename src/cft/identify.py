"""Stage B: label critical tokens by counterfactual decoding.

For each correct response Y and each position t, the alternatives are the model's rank-2..k tokens
at t (from one teacher-forced pass over prompt + Y). Each alternative a is continued greedily from
prompt + y_<t + a at the token-id level and its final answer verified; y_t is critical iff every
alternative fails.

A branch is a response decoded under the generation protocol: it stops at EOS, once its final answer
is complete (``verify.answer_complete`` on the whole response text, checked after every token
including a itself), or when the response reaches ``max_new_tokens`` tokens. Both engines apply
exactly this rule:

- ``reference``: one ``model.generate`` per branch from the full token prefix, every alternative.
- ``fast`` (default, ``cft.engine``): the prompt + response KV cache is computed once and shared by
  every branch; branches of many positions and responses decode together with continuous batching;
  the rank-r+1 branch runs only if the rank-r branch failed (exact: one success already makes the
  token non-critical).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import torch

from cft import verify
from cft.artifacts import (
    SCHEMAS,
    InputError,
    ResumableWriter,
    environment,
    invalid_count,
    load_records,
    read_meta,
    read_valid,
    record_key,
)
from cft.models import cache_kwarg, load_model, resolve, stop_token_ids
from cft.progress import Progress


@dataclass
class IdentifyConfig:
    """Resolved config of ``cft identify``; every field that changes labels is recorded."""

    model: str
    input: str
    out: str
    engine: str = "fast"  # fast | reference
    k: int = 3
    max_new_tokens: int = 256  # a branch is a whole response of at most this many tokens
    stop_at_answer: bool = True
    include_eos: bool = False
    batch_size: int | None = None  # fast engine rows; None = chosen from available memory
    dtype: str = "float32"
    device: str | None = None
    store_continuations: bool = True
    num_shards: int = 1
    shard_index: int = 0
    # Opt-in approximations (off by default; recorded in the metadata).
    skip_confident: float | None = None  # skip positions whose top-1 probability >= this
    continuation_cap: int | None = None  # decode at most this many tokens after the alternative
    approximations: list[str] = field(default_factory=list)


@dataclass
class Work:
    """One response under identification and the outcome of its branches."""

    key: str
    record: dict
    prompt_ids: list[int]
    response_ids: list[int]
    gold: str
    alternatives: list[list[int]]  # per position, alternatives in rank order ([] = not tested)
    greedy_mismatches: list[int]
    results: list[list[dict | None]]  # per position, per alternative: branch outcome
    open_branches: int = 0

    @property
    def done(self) -> bool:
        return self.open_branches == 0


class Protocol:
    """The stop rule and the verdict, shared by both engines so their labels agree."""

    def __init__(self, tok, model, cfg: IdentifyConfig):
        from cft.generate import trigger_tokens

        self.tok, self.cfg = tok, cfg
        self.eos = set(stop_token_ids(tok, model))
        self.trigger = trigger_tokens(tok).tolist()

    def budget(self, t: int) -> int:
        """How many tokens may follow the alternative at response position t."""
        left = self.cfg.max_new_tokens - (t + 1)
        if self.cfg.continuation_cap is not None:
            left = min(left, self.cfg.continuation_cap)
        return max(left, 0)

    def stopped(self, response: list[int], n_new: int, t: int) -> bool:
        """Whether a branch whose response is ``response`` (ending in ``n_new`` continuation tokens) ends."""
        last = response[-1]
        if last in self.eos or n_new >= self.budget(t):
            return True
        if self.cfg.stop_at_answer and self.trigger[last]:
            return verify.answer_complete(self.tok.decode(response, skip_special_tokens=True))
        return False

    def verdict(self, response: list[int], gold: str) -> verify.GradeResult:
        """Never raises: a verifier crash or timeout grades this branch wrong and is recorded on it."""
        return verify.grade_detailed(self.tok.decode(response, skip_special_tokens=True), gold)


@torch.inference_mode()
def teacher_forced(model, prompt_ids: list[int], response_ids: list[int], k: int, use_cache: bool = False):
    """Top-k tokens at every response position from one forward pass (and its KV cache if asked)."""
    ids = torch.tensor([prompt_ids + response_ids], device=model.device)
    out = model(input_ids=ids, use_cache=use_cache)
    logits = out.logits[0, len(prompt_ids) - 1 : -1].float()
    top = torch.topk(logits, k, dim=-1)
    probs = torch.softmax(logits, dim=-1).gather(-1, top.indices[:, :1]).squeeze(-1)
    return top.indices.tolist(), probs.tolist(), (getattr(out, cache_kwarg(model)) if use_cache else None)


def prepare(model, tok, rec: dict, key: str, cfg: IdentifyConfig, proto: Protocol, use_cache: bool):
    """Alternatives per position ("top-k minus y_t"), greedy check and the opt-in position filters."""
    prompt, response = rec["prompt_ids"], rec["response_ids"]
    top, top1_prob, cache = teacher_forced(model, prompt, response, cfg.k, use_cache)
    alternatives, mismatches = [], []
    for t, (y, cand) in enumerate(zip(response, top)):
        if cand[0] != y:
            mismatches.append(t)
        alts = [a for a in cand if a != y][: cfg.k - 1]
        if (y in proto.eos and not cfg.include_eos) or (
            cfg.skip_confident is not None and top1_prob[t] >= cfg.skip_confident
        ):
            alts = []
        alternatives.append(alts)
    work = Work(key, rec, prompt, response, rec["gold"], alternatives, mismatches,
                [[None] * len(a) for a in alternatives])
    return work, cache


def finish_branch(work: Work, t: int, j: int, cont: list[int], proto: Protocol, margin: float | None = None) -> bool:
    """Record branch (t, j)'s outcome; True when it succeeded (the token is then replaceable)."""
    response = work.response_ids[:t] + [work.alternatives[t][j]] + cont
    result = proto.verdict(response, work.gold)
    work.results[t][j] = {"token": work.alternatives[t][j], "rank": j + 2, "ok": result.correct,
                          "answer": result.prediction, "ids": cont if proto.cfg.store_continuations else None,
                          "margin": margin}
    if result.timed_out or result.error:
        work.results[t][j]["verify_error"] = "timeout" if result.timed_out else result.error
    return result.correct


def label_record(work: Work, tok, cfg: IdentifyConfig) -> dict:
    critical = [int(bool(res) and all(r is not None and not r["ok"] for r in res)) for res in work.results]
    branches = [
        [r if r is not None else {"token": a, "rank": j + 2, "ok": None, "answer": None, "ids": None}
         for j, (a, r) in enumerate(zip(alts, res))]
        for alts, res in zip(work.alternatives, work.results)
    ]
    rec = work.record
    return {
        "key": work.key, "id": rec["id"], "question": rec.get("question"), "gold": rec["gold"],
        "prompt_ids": work.prompt_ids, "response_ids": work.response_ids, "response": rec.get("response"),
        "critical": critical, "eligible": [int(bool(a)) for a in work.alternatives],
        "greedy": not work.greedy_mismatches, "greedy_mismatches": work.greedy_mismatches,
        "branches": branches, "critical_spans": critical_spans(tok, work.response_ids, critical),
    }


def critical_spans(tok, response_ids: list[int], critical: list[int]) -> list[list[int]]:
    """Character spans ``[start, end)`` of critical tokens in the decoded response text."""
    spans = []
    for t, c in enumerate(critical):
        if c:
            start = len(tok.decode(response_ids[:t], skip_special_tokens=True))
            end = len(tok.decode(response_ids[: t + 1], skip_special_tokens=True))
            if end > start:
                spans.append([start, end])
    return spans


def token_kind(text: str) -> str:
    """Coarse kind of a token for statistics: ``digit``, ``operator`` or ``other``."""
    s = text.strip()
    if any(ch.isdigit() for ch in s):
        return "digit"
    if s and all(ch in "+-*/=<>^()%.,:×÷" for ch in s) and s not in {".", ",", ":"}:
        return "operator"
    return "other"


def run_reference(model, tok, works_iter, cfg: IdentifyConfig, proto: Protocol, on_done, progress):
    """The plain way: one greedy ``generate`` per branch, re-encoding prompt and prefix each time."""
    from transformers import StoppingCriteriaList

    from cft.generate import _AnswerStop, trigger_tokens

    trigger = trigger_tokens(tok).to(model.device)
    for work, _ in works_iter:
        for t, alts in enumerate(work.alternatives):
            for j, a in enumerate(alts):
                response = work.response_ids[:t] + [a]
                cont: list[int] = []
                if not proto.stopped(response, 0, t):
                    prefix = torch.tensor([work.prompt_ids + response], device=model.device)
                    stops = [_AnswerStop(tok, len(work.prompt_ids), trigger)] if cfg.stop_at_answer else []
                    out = model.generate(
                        input_ids=prefix, attention_mask=torch.ones_like(prefix), do_sample=False,
                        max_new_tokens=proto.budget(t), eos_token_id=sorted(proto.eos),
                        pad_token_id=tok.pad_token_id, stopping_criteria=StoppingCriteriaList(stops),
                        temperature=None, top_p=None, top_k=None,
                    )
                    cont = out[0, prefix.shape[1] :].tolist()
                finish_branch(work, t, j, cont, proto)
                progress.advance(0, tokens=len(cont) + 1)
        on_done(work)


def _works(model, tok, records, keys, cfg, proto, use_cache):
    for rec, key in zip(records, keys):
        yield prepare(model, tok, rec, key, cfg, proto, use_cache)


def shard_of(cfg: IdentifyConfig) -> tuple[int, int]:
    """(index, count): explicit ``--num-shards``/``--shard-index``, else the launcher's RANK/WORLD_SIZE."""
    if cfg.num_shards > 1:
        return cfg.shard_index, cfg.num_shards
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def shard_path(out: str, index: int, count: int) -> str:
    return out if count == 1 else f"{out}.shard{index}of{count}.jsonl"


def label_key(rec: dict, cfg: IdentifyConfig) -> str:
    """Everything that determines a labels record; the id too, so two problems with the same text stay two."""
    params = {k: v for k, v in asdict(cfg).items()
              if k in ("k", "max_new_tokens", "stop_at_answer", "include_eos", "skip_confident", "continuation_cap")}
    return record_key(cfg.model, str(rec["id"]), rec["prompt_ids"], rec["response_ids"], rec["gold"], params)


def vocab_size_of(name: str, model=None) -> int | None:
    """The model's vocabulary size, from its config when the weights are not loaded yet (None: unknown)."""
    if model is not None:
        return model.get_input_embeddings().num_embeddings
    from transformers import AutoConfig

    try:
        spec = resolve(name)
        return getattr(AutoConfig.from_pretrained(spec.path, gguf_file=spec.gguf_file), "vocab_size", None)
    except Exception:  # noqa: BLE001 - a model that cannot be read is reported by load_model itself
        return None


def select_inputs(cfg: IdentifyConfig, vocab_size: int | None = None) -> tuple[list[dict], int]:
    """The correct generations of this shard, validated before any model loads.

    Returns them and the number of valid input records (correct or not).
    """
    seen: dict[str, int] = {}

    def parse(lineno: int, rec: dict) -> dict:
        def bad(name: str, message: str) -> InputError:
            return InputError(cfg.input, lineno, name, message)

        rid = rec.get("id")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise bad("id", "missing or not a string")
        if str(rid) in seen:
            raise bad("id", f"duplicate id {str(rid)!r} (first on line {seen[str(rid)]})")
        for name in ("prompt_ids", "response_ids"):
            ids = rec.get(name)
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise bad(name, "missing or not a list of integers")
            if any(t < 0 for t in ids):
                raise bad(name, "negative token id")
            if vocab_size is not None and any(t >= vocab_size for t in ids):
                raise bad(name, f"token id outside the model's vocabulary (size {vocab_size}); was this file "
                                "made with another tokenizer?")
        if not rec["prompt_ids"]:
            raise bad("prompt_ids", "empty prompt")
        if not isinstance(rec.get("gold"), str) or not rec["gold"].strip():
            raise bad("gold", "missing or not a non-empty string")
        if not isinstance(rec.get("correct"), bool):
            raise bad("correct", "missing or not a boolean")
        for name in ("question", "response"):
            if rec.get(name) is not None and not isinstance(rec[name], str):
                raise bad(name, "not a string")
        if rec["correct"] and not rec["response_ids"]:
            raise bad("response_ids", "empty response marked correct")
        seen[str(rid)] = lineno
        return rec

    records = read_valid(cfg.input, parse, SCHEMAS["generations"])
    correct = [r for r in records if r["correct"]]
    index, count = shard_of(cfg)
    return [r for i, r in enumerate(correct) if i % count == index], len(records)


def identify(cfg: IdentifyConfig, model=None, tok=None) -> dict:
    """Run stage B (this process's shard); returns the summary also written to the metadata.

    Finished responses are appended to ``OUT.partial`` as they complete (see ``ResumableWriter.add``);
    a rerun after a kill labels only the responses missing there.
    """
    records, n_input = select_inputs(cfg, vocab_size_of(cfg.model, model))
    if model is None:
        model, tok = load_model(cfg.model, cfg.dtype, cfg.device)
    cfg.approximations = [name for name, v in (("skip_confident", cfg.skip_confident),
                                               ("continuation_cap", cfg.continuation_cap)) if v is not None]
    proto = Protocol(tok, model, cfg)
    index, count = shard_of(cfg)
    out = shard_path(cfg.out, index, count)
    keys = [label_key(r, cfg) for r in records]
    writer = ResumableWriter(out, "labels")
    todo = [(r, k) for r, k in zip(records, keys) if k not in writer.done]

    def on_done(work: Work) -> None:
        writer.add(label_record(work, tok, cfg))
        progress.advance(1)

    t0 = time.time()
    with Progress(f"identify[{cfg.engine}]", total=len(todo), unit="resp") as progress:
        if cfg.engine == "reference":
            run_reference(model, tok, _works(model, tok, [r for r, _ in todo], [k for _, k in todo], cfg, proto, False),
                          cfg, proto, on_done, progress)
        elif cfg.engine == "fast":
            from cft.engine import BranchDecoder

            works = _works(model, tok, [r for r, _ in todo], [k for _, k in todo], cfg, proto, True)
            max_prompt = max((len(r["prompt_ids"]) for r, _ in todo), default=0)
            BranchDecoder(model, tok, cfg, proto).run(works, on_done, progress, max_prompt)
        else:
            raise ValueError(f"unknown engine {cfg.engine!r}; choose fast or reference")
        writer.write([])
        decoded = progress.tokens
    seconds = time.time() - t0
    labels = [writer.done[k] for k in keys]
    summary = summarize(labels, tok)
    summary.update(n_input=n_input, responses=len(labels), invalid_skipped=invalid_count(cfg.input),
                   seconds=seconds, decoded_tokens=decoded,
                   tokens_per_second=decoded / max(seconds, 1e-9), shard=[index, count])
    meta = {"stage": "identify", "config": asdict(cfg), "seed": None,  # greedy throughout: nothing is random
            "generation_meta": read_meta(cfg.input), "environment": environment(model), "summary": summary}
    writer.finalize(keys, meta)
    return summary


def summarize(labels: list[dict], tok) -> dict:
    """Critical fraction over tested positions, its split by token kind, and the greedy check."""
    by_kind: dict[str, list[int]] = {}
    branches = 0
    for rec in labels:
        for y, crit, elig, br in zip(rec["response_ids"], rec["critical"], rec["eligible"], rec["branches"]):
            if elig:
                kind = by_kind.setdefault(token_kind(tok.decode([y])), [0, 0])
                kind[0] += crit
                kind[1] += 1
                branches += sum(b["ok"] is not None for b in br)
    tested = sum(v[1] for v in by_kind.values())
    return {
        "critical_fraction": sum(v[0] for v in by_kind.values()) / max(tested, 1),
        "critical_by_kind": {k: {"critical": v[0], "tokens": v[1], "fraction": v[0] / max(v[1], 1)}
                             for k, v in sorted(by_kind.items())},
        "positions": tested,
        "branches": branches,
        "not_greedy": sum(not r["greedy"] for r in labels),
        "no_critical_token": sum(not any(r["critical"]) for r in labels),
    }


def configure_parser(p) -> None:
    from cft.generate import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--input", required=True, help="generations JSONL from `cft generate`")
    p.add_argument("--out", required=True, help="output labels JSONL (cft.labels/1)")
    p.add_argument("--engine", default="fast", choices=["fast", "reference"])
    p.add_argument("-k", "--k", type=int, default=3, help="alternatives are the rank-2..k tokens (default: 3)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="response length cap of a branch")
    p.add_argument("--no-stop-at-answer", action="store_true")
    p.add_argument("--include-eos", action="store_true", help="also test the final EOS position")
    p.add_argument("--batch-size", type=int, default=None, help="fast engine rows (default: from free memory)")
    p.add_argument("--no-continuations", action="store_true", help="do not store branch token ids")
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--shard-index", type=int, default=0)
    p.add_argument("--merge", action="store_true", help="merge the shard files of --out into --out")
    p.add_argument("--dry-run", action="store_true", help="count the work and estimate time; decode nothing")
    p.add_argument("--skip-confident", type=float, default=None, metavar="TAU",
                   help="APPROXIMATION: skip positions whose top-1 probability >= TAU")
    p.add_argument("--continuation-cap", type=int, default=None, metavar="N",
                   help="APPROXIMATION: decode at most N tokens after the alternative")


def config_from_args(args) -> IdentifyConfig:
    return IdentifyConfig(
        model=args.model, input=args.input, out=args.out, engine=args.engine, k=args.k,
        max_new_tokens=args.max_new_tokens, stop_at_answer=not args.no_stop_at_answer,
        include_eos=args.include_eos, batch_size=args.batch_size, dtype=args.dtype, device=args.device,
        store_continuations=not args.no_continuations, num_shards=args.num_shards, shard_index=args.shard_index,
        skip_confident=args.skip_confident, continuation_cap=args.continuation_cap,
    )


def print_summary(s: dict) -> None:
    kinds = ", ".join(f"{k} {v['fraction']:.1%} of {v['tokens']}" for k, v in s["critical_by_kind"].items())
    print(f"{s['responses']} responses, {s['positions']} positions, {s['branches']} branches, "
          f"{s['decoded_tokens']} decoded tokens in {s['seconds']:.1f}s ({s['tokens_per_second']:.0f} tok/s)")
    print(f"critical fraction {s['critical_fraction']:.1%} ({kinds}); not greedy: {s['not_greedy']}; "
          f"no critical token: {s['no_critical_token']}")


def run(args) -> int:
    cfg = config_from_args(args)
    if args.merge:
        path = merge_shards(cfg.out, cfg.num_shards)
        print(f"merged {cfg.num_shards} shards -> {path}")
        return 0
    if args.dry_run:
        print_plan(plan(cfg))
        return 0
    s = identify(cfg)
    print_summary(s)
    index, count = s["shard"]
    if count > 1 and "WORLD_SIZE" in os.environ and index == 0:
        print(f"merged {count} shards -> {merge_shards(cfg.out, count, wait=True)}")
    return 0


def merge_shards(out: str, count: int, wait: bool = False, poll_seconds: float = 5.0) -> str:
    """Interleave shard files back into single-process order (shard i holds responses i, i+N, ...)."""
    from cft.models import load_tokenizer

    paths = [shard_path(out, i, count) for i in range(count)]
    while wait and not all(os.path.exists(p) and os.path.exists(p + ".meta.json") for p in paths):
        time.sleep(poll_seconds)
    shards = [load_records(p, "labels") for p in paths]
    metas = [read_meta(p) for p in paths]
    merged = [shards[i % count][i // count] for i in range(sum(map(len, shards)))]
    writer = ResumableWriter(out, "labels")
    writer.write(merged)
    cfg = metas[0]["config"]
    summary = summarize(merged, load_tokenizer(cfg["model"]))
    summary.update(responses=len(merged), decoded_tokens=sum(m["summary"]["decoded_tokens"] for m in metas),
                   seconds=max(m["summary"]["seconds"] for m in metas))
    writer.finalize([r["key"] for r in merged], {**metas[0], "merged_from": paths, "summary": summary})
    return out


def plan(cfg: IdentifyConfig) -> dict:
    """What identification would do: counts from the input, time from a short synthetic decode benchmark."""
    records, n_input = select_inputs(cfg)
    positions = sum(len(r["response_ids"]) - (0 if cfg.include_eos else 1) for r in records)
    per_branch = [len(r["response_ids"]) - t for r in records for t in range(len(r["response_ids"]))]
    est_tokens = sum(min(n, cfg.max_new_tokens) for n in per_branch)
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device)
    width = int(sum(len(r["prompt_ids"]) + len(r["response_ids"]) // 2 for r in records) / max(len(records), 1))
    rate = decode_rate(model, cfg.batch_size, max(width, 1))
    return {"input_records": n_input, "responses": len(records), "positions": positions,
            "max_branches": positions * (cfg.k - 1), "min_branches": positions,
            "estimated_tokens_min": est_tokens, "estimated_tokens_max": est_tokens * (cfg.k - 1),
            "decode_tokens_per_second": rate, "estimated_seconds_min": est_tokens / rate,
            "estimated_seconds_max": est_tokens * (cfg.k - 1) / rate}


@torch.inference_mode()
def decode_rate(model, batch_size: int | None, width: int, steps: int = 8) -> float:
    """Tokens/s of batched one-token decode steps over a cache of ``width`` (synthetic tokens)."""
    from transformers import DynamicCache

    from cft.engine import auto_batch_size

    n = batch_size or auto_batch_size(model, width * 2)
    ids = torch.randint(0, model.config.vocab_size, (n, width), device=model.device)
    cache = DynamicCache()
    arg = {cache_kwarg(model): cache}
    model(input_ids=ids, use_cache=True, **arg)
    step_ids = ids[:, -1:]
    t0 = time.time()
    for _ in range(steps):
        model(input_ids=step_ids, use_cache=True, **arg)
    return n * steps / (time.time() - t0)


def print_plan(p: dict) -> None:
    print(f"{p['responses']} correct responses of {p['input_records']} records; {p['positions']} positions; "
          f"branches {p['min_branches']}..{p['max_branches']}")
    print(f"estimated decoded tokens {p['estimated_tokens_min']}..{p['estimated_tokens_max']} at "
          f"{p['decode_tokens_per_second']:.0f} tok/s (measured now on synthetic steps): "
          f"{p['estimated_seconds_min']:.0f}..{p['estimated_seconds_max']:.0f} s")
