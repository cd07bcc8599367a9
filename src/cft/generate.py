"""Stage A: decode solutions (greedy by default) and keep their verdicts.

``decode`` is the batched decoder shared with evaluation, stopping a row at EOS or once its final answer
is complete, on one of two backends (``DecodeConfig.backend``, recorded in ``meta["decoding"]``):

- ``engine`` (default): ``cft.engine.PromptDecoder``, continuous batching over a preallocated
  key/value cache (a finished row is refilled at once; a prompt shared by n samples is prefilled once).
  A model ``engine.check_supported`` refuses falls back to ``hf`` with a one-line note.
- ``hf``: transformers' ``generate`` over token-id prompts with left padding, in fixed batches; a batch
  that runs out of memory is retried in halves, so one long batch does not end a long run.

Greedy outputs of the two are the same tokens (up to floating-point near-ties: a top-1/top-2 logit gap
of ~1e-6 in fp32). Sampling has the same distribution but not the same random numbers: ``hf`` draws from
torch's global generator seeded once per call, ``engine`` gives every output its own stream (seed, prompt,
sample index), so its samples do not depend on the batch size or on the other prompts of the call.

Decoding is pinned (``pinned_generation_config`` / ``pinned_generate``): transformers fills every
setting a call leaves unset from the checkpoint's ``generation_config.json``, and several of those act
even under greedy decoding (Qwen2.5-Instruct's ``repetition_penalty``, ``no_repeat_ngram_size``,
``min_new_tokens``, ``bad_words_ids``, ...). Then stage A's response would not be the model's argmax
path that stage B's teacher-forced pass and fast engine assume. Here nothing comes from the checkpoint
but its EOS ids; the resolved settings are recorded in the metadata (``meta["decoding"]``).

Problems whose prompt leaves no room for ``max_new_tokens`` in the model's context are skipped and
counted, never truncated; a verifier failure on one response marks that record (``verify_error``)
and the others are graded as usual.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from cft import verify
from cft.artifacts import InputError, ResumableWriter, environment, invalid_count, read_meta, record_key
from cft.config import attn_option, device_option, dtype_option, from_args, internal, model_option, option
from cft.data import Problem, load_problems
from cft.decoding import (
    AnswerStop,
    Output,
    finish_reason,
    is_out_of_memory,
    left_pad,
    pinned_generate,
    pinned_generation_config,
    trigger_tokens,
)
from cft.engine import EngineStats, PromptDecoder, Request, check_supported
from cft.models import load_model, stop_token_ids, vocab_rows
from cft.progress import Progress
from cft.prompts import render_ids, template_text

log = logging.getLogger(__name__)
BACKENDS = ("engine", "hf")


@dataclass
class DecodeConfig:
    """Decoding settings; everything here changes results and is recorded.

    Its option fields are ``cft generate``'s decoding options (``CONFIGS``). ``temperature``, ``n`` and
    ``seed`` are set by the code, not on that command line: Stage A is greedy, one response a problem
    (Stage B's protocol assumes the argmax path), and its seed is ``GenerateConfig.seed``; ``cft eval``
    and the experiment YAML set them through the library.
    """

    max_new_tokens: int = option(256, "decoding budget per response (problems whose prompt leaves less room in "
                                      "the model's context are skipped, never truncated)")
    temperature: float = internal(0.0)  # 0 = greedy
    n: int = internal(1)
    batch_size: int = option(64, "responses decoded together (a batch that runs out of memory is retried in halves)")
    rows: int | None = option(None, "engine backend: rows decoded together (default: --batch-size; 0: as many as "
                                    "a quarter of free memory holds, at least --batch-size, at most 512 on a CPU "
                                    "and 1024 on a GPU). Outputs do not depend on it")
    stop_at_answer: bool = option(False, "SPEED KNOB: stop a response once its first final answer is complete "
                                         "instead of at EOS or the cap; `correct` then grades that first answer, "
                                         "not the last one `cft eval` grades, so the run audits the stop "
                                         "(--stop-audit) and records what it changed")
    stop_audit: int = option(64, "with --stop-at-answer: responses it stopped re-decoded to EOS, a seeded sample "
                                 "(besides every stopped response whose verdict flips at its next answer)")
    seed: int = internal(0)
    backend: Literal["engine", "hf"] = option(
        "engine", "engine: cft.engine's continuous batching (a model it does not support falls back to hf, with a "
                  "note); hf: transformers' model.generate in fixed batches. Greedy outputs are the same tokens")


class _Temperature(LogitsProcessor):
    """Apply the temperature ourselves and record each step's entropy of the sampling distribution."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.entropies: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        scores = scores.float() / self.temperature
        logp = torch.log_softmax(scores, dim=-1)
        self.entropies.append(-(logp.exp() * logp).nan_to_num().sum(-1))
        return scores


def decoding_settings(model, tok, cfg: DecodeConfig) -> dict:
    """What decides the tokens, for the metadata: the pinned config, cft's temperature and stop rule."""
    gen = pinned_generation_config(stop_token_ids(tok, model), tok.pad_token_id, cfg.max_new_tokens,
                                   cfg.temperature > 0)
    settings = {k: v for k, v in gen.to_dict().items()
                if v is not None and not k.startswith("_") and k != "transformers_version"}
    return {"generation_config": settings, "temperature": cfg.temperature,
            "temperature_applied_by": "cft" if cfg.temperature > 0 else None,
            "stop_at_answer": cfg.stop_at_answer, "stop_rule": stop_rule(cfg.stop_at_answer),
            "inherited_from_checkpoint": ["eos_token_id"], "backend": cfg.backend}


def stop_rule(stop_at_answer: bool) -> str:
    """Where a response ends, in words for the metadata (generations' ``decoding``, labels' ``protocol``)."""
    if stop_at_answer:
        return "first complete answer (verify.answer_complete; opt-in speed knob, audited), EOS or the length cap"
    return "EOS or the length cap (the whole response is graded, as cft eval grades it)"


def resolve_backend(model, cfg: DecodeConfig, name: str = "model") -> DecodeConfig:
    """``cfg`` with the backend that will run: ``engine`` falls back to ``hf`` (one note) where it is refused."""
    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown backend {cfg.backend!r}; choose from {', '.join(BACKENDS)}")
    if cfg.backend == "engine":

        try:
            check_supported(model, name, fallback="decoding with model.generate instead (--backend hf)")
        except InputError as exc:
            log.warning("note: %s", exc)
            return replace(cfg, backend="hf")
    return cfg


def decode(model, tok, prompts: list[list[int]], cfg: DecodeConfig,
           progress: Progress | None = None, stats: EngineStats | None = None) -> list[list[Output]]:
    """``cfg.n`` outputs per prompt, in prompt order, on ``cfg.backend`` (see the module docstring).

    ``stats``: an ``engine.EngineStats`` the engine backend counts its forwards in (the caller's to read).
    """
    return next(decode_groups(model, tok, [(prompts, cfg)], progress, stats))[1]


def decode_groups(model, tok, groups: list[tuple[list[list[int]], DecodeConfig]], progress: Progress | None = None,
                  stats: EngineStats | None = None):
    """Decode groups of prompts, each under its own config; yield ``(group index, outputs)`` (outputs as
    ``decode`` returns them) as each group completes (``decode_outputs`` yields each output as it ends)."""
    results = [[[None] * cfg.n for _ in prompts] for prompts, cfg in groups]
    left = [len(prompts) * cfg.n for prompts, cfg in groups]
    for g, n in enumerate(left):
        if not n:
            yield g, results[g]
    for g, i, j, out in decode_outputs(model, tok, groups, progress, stats=stats):
        results[g][i][j] = out
        left[g] -= 1
        if not left[g]:
            yield g, results[g]


def decode_outputs(model, tok, groups: list[tuple[list[list[int]], DecodeConfig]], progress: Progress | None = None,
                   skip=None, stats: EngineStats | None = None):
    """Decode groups of prompts, each under its own config; yield ``(group, prompt index, sample index, Output)``
    for every output as it ends, so a caller can keep each one at once.

    ``skip(group, prompt index, sample index)``: True for an output not wanted (kept from an earlier run).
    ``engine`` leaves its request out, and the others keep their own random streams, so what is decoded is
    what a run of every output would give. ``hf`` decodes group by group (its sampling draws from one
    generator per call), so a group with any wanted output is decoded whole and only those are yielded.
    ``engine`` puts every group's outputs through one continuous batch, so rows stay full across groups;
    its groups may differ in temperature, ``n`` and seed only, and the first group's backend decides for all.
    """
    if not groups:
        return
    wanted = (lambda g, i, j: True) if skip is None else (lambda g, i, j: not skip(g, i, j))
    first = resolve_backend(model, groups[0][1])
    if first.backend == "hf":
        for g, (prompts, cfg) in enumerate(groups):
            keep = [(i, j) for i in range(len(prompts)) for j in range(cfg.n) if wanted(g, i, j)]
            if not keep:
                continue
            outs = _decode_hf(model, tok, prompts, replace(cfg, backend="hf"), progress)
            yield from ((g, i, j, outs[i][j]) for i, j in keep)
        return

    shared = ("max_new_tokens", "stop_at_answer", "batch_size", "rows")
    requests = []
    for g, (prompts, cfg) in enumerate(groups):
        if any(getattr(cfg, k) != getattr(first, k) for k in shared):
            raise ValueError(f"decode_groups: group {g} differs from group 0 in {shared} (one engine run decodes all)")
        requests += [r for r in engine_requests(prompts, cfg, g) if wanted(*r.tag)]
    for req, out in PromptDecoder(model, tok, first, stats).run(requests, progress):
        yield (*req.tag, out)


def engine_requests(prompts: list[list[int]], cfg: DecodeConfig, group: int = 0) -> list:
    """``cfg.n`` engine requests per prompt, longest prompts first, tagged (group, prompt index, sample).

    A sampled request's random stream is a hash of (seed, prompt, sample index), the index counting on
    over earlier identical prompts of the call, so outputs do not depend on batch size or prompt order.
    """

    seen: dict[tuple[int, ...], int] = {}
    requests = []
    for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
        key = tuple(prompts[i])
        first = seen.get(key, 0)
        seen[key] = first + cfg.n
        for j in range(cfg.n):
            stream = record_key(cfg.seed, prompts[i], first + j) if cfg.temperature > 0 else ""
            requests.append(Request(prompts[i], cfg.temperature, stream, (group, i, j)))
    return requests


@torch.inference_mode()
def _decode_hf(model, tok, prompts: list[list[int]], cfg: DecodeConfig,
               progress: Progress | None = None) -> list[list[Output]]:
    """``model.generate`` in batches of ``cfg.batch_size`` rows; an out-of-memory batch is retried in halves."""
    eos = stop_token_ids(tok, model)
    trigger = trigger_tokens(tok, vocab_rows(model)).to(model.device) if cfg.stop_at_answer else None
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[Output]] = [[] for _ in prompts]
    jobs = [i for i in order for _ in range(cfg.n)]
    torch.manual_seed(cfg.seed)
    start, size = 0, cfg.batch_size
    while start < len(jobs):
        batch = jobs[start : start + size]
        try:
            outs = _decode_batch(model, tok, [prompts[i] for i in batch], cfg, eos, trigger)
        except RuntimeError as exc:
            if not is_out_of_memory(exc) or len(batch) == 1:
                raise
            outs = None  # retried below, once the exception (and the failed batch's tensors) are released
        if outs is None:
            size = len(batch) // 2  # later batches keep the size that fits
            log.warning("decode: out of memory on a batch of %d, retrying with batches of %d", len(batch), size)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        for i, o in zip(batch, outs):
            results[i].append(o)
        if progress:
            progress.advance(len(batch), tokens=sum(len(o.ids) for o in outs))
        start += len(batch)
    return results


def _decode_batch(model, tok, prompts: list[list[int]], cfg: DecodeConfig, eos: list[int], trigger) -> list[Output]:
    """One ``model.generate`` call over left-padded prompts: one output per prompt."""
    pad = tok.pad_token_id
    input_ids, mask = left_pad(prompts, pad, model.device)
    width = input_ids.shape[1]
    answer_stop = AnswerStop(tok, width, trigger) if trigger is not None else None
    stops = StoppingCriteriaList([answer_stop] if answer_stop else [])
    temp = _Temperature(cfg.temperature) if cfg.temperature > 0 else None
    out = pinned_generate(
        model, pinned_generation_config(eos, pad, cfg.max_new_tokens, temp is not None),
        input_ids=input_ids, attention_mask=mask,
        logits_processor=LogitsProcessorList([temp] if temp else []), stopping_criteria=stops,
    )
    new = out[:, width:].tolist()
    ent = torch.stack(temp.entropies, dim=1).tolist() if temp else None
    outputs = []
    for row, ids in enumerate(new):
        # A row ends at its EOS or where the answer rule stopped it; what follows is padding, which may
        # be the EOS token itself (pad == eos), so the recorded stop length decides, not the padding.
        end = next((k + 1 for k, t in enumerate(ids) if t in eos), len(ids))
        if answer_stop is not None:
            end = min(end, answer_stop.lengths.get(row, end))
        ids = ids[:end]
        text = tok.decode(ids, skip_special_tokens=True)
        mean_ent = sum(ent[row][: len(ids)]) / max(len(ids), 1) if ent else None
        outputs.append(Output(ids, text, finish_reason(ids, set(eos), text, cfg.stop_at_answer), mean_ent))
    return outputs


def decode_on(model, tok, starts: list[tuple[list[int], int]], until_answer: bool, cfg: DecodeConfig) -> list[Output]:
    """Greedy continuations of ``(ids, cap)`` pairs, each at most ``cap`` tokens, ending at EOS, at the cap or
    (``until_answer``) once the continuation's own text holds a complete answer.

    The engine gives every request its own cap; ``hf`` decodes to the largest and cuts (a greedy decode cut at
    n tokens is the decode capped at n).
    """
    if not starts:
        return []
    dcfg = resolve_backend(model, replace(cfg, max_new_tokens=max(c for _, c in starts), temperature=0.0, n=1,
                                          stop_at_answer=until_answer))
    if dcfg.backend == "engine":
        outs: list[Output | None] = [None] * len(starts)
        requests = [Request(ids, tag=i, max_new_tokens=cap) for i, (ids, cap) in enumerate(starts)]
        for req, out in PromptDecoder(model, tok, dcfg).run(requests):
            outs[req.tag] = out
        return outs
    eos = set(stop_token_ids(tok, model))
    cut = []
    for (_, cap), (out,) in zip(starts, _decode_hf(model, tok, [ids for ids, _ in starts], dcfg)):
        ids = out.ids[:cap]
        text = tok.decode(ids, skip_special_tokens=True)
        cut.append(Output(ids, text, finish_reason(ids, eos, text, until_answer)))
    return cut


@dataclass
class Stop:
    """A response (or branch) the answer stop ended before EOS and the cap, with the verdict it got there."""

    prompt_ids: list[int]
    response_ids: list[int]  # the graded response so far, ending where the stop rule ended it
    cap: int  # tokens it could still have decoded (> 0)
    gold: str
    ok: bool | None  # its verdict at the stop


def audit_stops(model, tok, stops: list[Stop], grade, sample: int, seed: int, cfg: DecodeConfig) -> tuple[dict, dict]:
    """What the answer stop changed: the verdicts of stopped responses decoded on to EOS or the cap.

    Every stop is decoded on to its next complete answer (or EOS/cap); one that reached EOS or the cap has
    the default rule's verdict already, and one whose verdict flipped at that next answer is decoded on to
    EOS/cap, as is a seeded sample of ``sample`` stops. ``grade(response_ids, gold)`` is the caller's verdict
    (``ok``: bool or None). Returns the summary and ``{stop index: verdict decoded to EOS/cap}`` of every stop
    whose full verdict is known.
    """
    ahead = decode_on(model, tok, [(s.prompt_ids + s.response_ids, s.cap) for s in stops], True, cfg)
    full: dict[int, bool | None] = {}
    flips = []
    for i, (s, out) in enumerate(zip(stops, ahead)):
        ok = grade(s.response_ids + out.ids, s.gold)
        if ok != s.ok:
            flips.append(i)
        if out.finish != "answer" or len(out.ids) >= s.cap:
            full[i] = ok
    sampled = random.Random(seed).sample(range(len(stops)), min(sample, len(stops)))
    rest = sorted((set(sampled) | set(flips)) - set(full))
    tail = decode_on(model, tok, [(stops[i].prompt_ids + stops[i].response_ids + ahead[i].ids,
                                   stops[i].cap - len(ahead[i].ids)) for i in rest], False, cfg)
    for i, out in zip(rest, tail):
        full[i] = grade(stops[i].response_ids + ahead[i].ids + out.ids, stops[i].gold)
    changed = sorted(i for i, ok in full.items() if ok != stops[i].ok)
    summary = {"stopped": len(stops), "sample": len(sampled), "flipped_at_next_answer": len(flips),
               "checked": len(full), "verdicts_changed": len(changed),
               "decoded_tokens": sum(len(o.ids) for o in ahead) + sum(len(o.ids) for o in tail)}
    return summary, full


@dataclass
class GenerateConfig:
    """Resolved config of ``cft generate``.

    The decoding settings stay a nested ``DecodeConfig`` (the library API of ``cft eval``, ``cft
    experiment`` and the demo, and ``config.decode`` in the sidecar that Stage B reads); on the command
    line and in ``--config`` files its fields are flat options beside these (``CONFIGS``), so no field
    name appears in both. ``config_from_args`` nests them again.
    """

    model: str = model_option()
    data: str = option(help="testbed:SPLIT or arith:SPLIT (train|val|test|test_ood), a benchmark spec such as "
                            "gsm8k:train, or a JSONL file")
    out: str = option(help="output JSONL (cft.generations/1)")
    template: str = option("chat", "chat, qwen25-math-cot, gsm8k, or a template file")
    question_field: str = option("question", "question field of JSONL input")
    answer_field: str = option("answer", "answer field of JSONL input")
    seed: int = option(0, "which testbed: or arith: problems are drawn (also the decoding seed)")
    limit: int | None = option(None, "at most this many problems")
    dtype: str = dtype_option()
    device: str | None = device_option()
    attn_implementation: str | None = attn_option()
    decode: DecodeConfig = internal(factory=DecodeConfig)


def verify_error(result: verify.GradeResult) -> str:
    """What went wrong while grading, for the record: ``timeout``, the error, or "" (graded normally).

    Never None: in a column that is null throughout the first block ``datasets`` reads (10 MB), a later
    error string cannot be cast, and ``datasets.load_dataset("json", ...)`` fails (docs/FORMATS.md).
    """
    return "timeout" if result.timed_out else (result.error or "")


def generation_key(p: Problem, prompt_ids: list[int], model_name: str, cfg: DecodeConfig) -> str:
    """Everything that determines a record; the id too, so two problems with the same text stay two records."""
    settings = {k: v for k, v in asdict(cfg).items()  # greedy: either backend; the engine's rows: any
                if (k != "backend" or cfg.temperature > 0) and k not in ("rows", "stop_audit")}
    return record_key(model_name, p.id, prompt_ids, settings, p.answer)


def generation_record(key: str, p: Problem, prompt_ids: list[int], o: Output) -> dict:
    """One ``cft.generations/1`` record; every record has every key, each always of one type or null."""
    result = verify.grade_detailed(o.text, p.answer)
    return {
        "key": key,
        "id": p.id,
        "question": p.question,
        "gold": p.answer,
        "prompt_ids": prompt_ids,
        "response_ids": o.ids,
        "response": o.text,
        "prediction": result.prediction,
        "correct": result.correct,
        "finish": o.finish,
        "verify_error": verify_error(result),
    }


def max_prompt_tokens(model, max_new_tokens: int) -> int | None:
    """The longest prompt that leaves ``max_new_tokens`` in the model's context; None when it is not known."""
    context = getattr(model.config, "max_position_embeddings", None)
    return None if context is None else context - max_new_tokens


def split_by_context(prompts: list[list[int]], model, max_new_tokens: int) -> tuple[list[int], list[int]]:
    """Indices of the prompts that fit the context and of those that do not (skipped, never truncated)."""
    limit = max_prompt_tokens(model, max_new_tokens)
    fits = [limit is None or len(p) <= limit for p in prompts]
    return [i for i, f in enumerate(fits) if f], [i for i, f in enumerate(fits) if not f]


def generate(cfg: GenerateConfig, model=None, tok=None) -> dict:
    """Run stage A; returns the summary also written to the metadata sidecar.

    Batches are fixed slices of the problems sorted by prompt length (less left padding). Each response is
    appended to the partial file as it ends; a resumed run decodes only the missing ones on the engine
    backend, and on ``hf`` every batch with a missing one (``decode_outputs``). The final file is in problem
    order.
    """
    problems = load_problems(cfg.data, seed=cfg.seed, limit=cfg.limit,
                             question_field=cfg.question_field, answer_field=cfg.answer_field)
    if model is None:
        model, tok = load_model(cfg.model, cfg.dtype, cfg.device, cfg.attn_implementation)
    prompts = [render_ids(tok, p.question, cfg.template) for p in problems]
    kept, too_long = split_by_context(prompts, model, cfg.decode.max_new_tokens)
    keys = {i: generation_key(problems[i], prompts[i], cfg.model, cfg.decode) for i in kept}
    writer = ResumableWriter(cfg.out, "generations")
    by_length = sorted(kept, key=lambda i: -len(prompts[i]))
    batches = [by_length[s : s + cfg.decode.batch_size] for s in range(0, len(kept), cfg.decode.batch_size)]
    todo = [b for b in batches if any(keys[i] not in writer.done for i in b)]
    dcfg = resolve_backend(model, cfg.decode, cfg.model)
    groups = [([prompts[i] for i in batch], dcfg) for batch in todo]
    # hf decodes a batch whole, the engine only what is missing
    pending = sum(map(len, todo)) if dcfg.backend == "hf" else sum(keys[i] not in writer.done for b in todo for i in b)
    t0 = time.time()
    with Progress("generate", total=pending, unit="resp", max_tokens=pending * dcfg.max_new_tokens) as progress:
        # each response is appended as it ends: a kill loses only the responses being decoded
        for b, k, _, o in decode_outputs(model, tok, groups, progress, lambda b, k, j: keys[todo[b][k]] in writer.done):
            i = todo[b][k]
            writer.add(generation_record(keys[i], problems[i], prompts[i], o))
        writer.write([])
    records = [writer.done[keys[i]] for i in kept]
    audit = stage_a_audit(model, tok, records, dcfg) if dcfg.stop_at_answer else None
    summary = {
        "n": len(records),
        "correct": sum(r["correct"] for r in records),
        "accuracy": sum(r["correct"] for r in records) / max(len(records), 1),
        "skipped_too_long": len(too_long),
        "invalid_skipped": invalid_count(cfg.data),
        "verify_errors": sum(bool(r.get("verify_error")) for r in records),
        "max_prompt_tokens": max_prompt_tokens(model, cfg.decode.max_new_tokens),
        "seconds": time.time() - t0,
        "stop_audit": audit,
    }
    meta = {"stage": "generate", "config": asdict(cfg), "seed": cfg.seed,
            "prompt_template": template_text(cfg.template) or cfg.template,
            "decoding": decoding_settings(model, tok, dcfg),
            "environment": environment(model), "summary": summary,
            "skipped_too_long_ids": [problems[i].id for i in too_long]}
    writer.finalize([keys[i] for i in kept], meta)
    return summary


def stage_a_audit(model, tok, records: list[dict], cfg: DecodeConfig) -> dict:
    """``audit_stops`` over the responses the answer stop ended: how many `correct` verdicts it changed."""
    stopped = [r for r in records if r["finish"] == "answer" and len(r["response_ids"]) < cfg.max_new_tokens]
    stops = [Stop(r["prompt_ids"], r["response_ids"], cfg.max_new_tokens - len(r["response_ids"]), r["gold"],
                  r["correct"]) for r in stopped]

    def grade(ids: list[int], gold: str) -> bool:
        return verify.grade_detailed(tok.decode(ids, skip_special_tokens=True), gold).correct

    summary, full = audit_stops(model, tok, stops, grade, cfg.stop_audit, cfg.seed, cfg)
    summary["changed"] = [{"id": stopped[i]["id"], "correct_at_stop": stops[i].ok, "correct_at_end": ok}
                          for i, ok in sorted(full.items()) if ok != stops[i].ok][:100]
    return summary


def earlier_audit(out, config: dict) -> dict | None:
    """The stop audit a finished earlier run with this config recorded in ``out``'s metadata (None: none), for
    a rerun that decoded nothing new (``cft eval`` reuses a finished run's samples): it audits the same records,
    so it is not decoded again."""
    meta = read_meta(out)
    return meta.get("stop_audit") if meta.get("config") == json.loads(json.dumps(config, default=str)) else None


def print_stop_audit(audit: dict | None, what: str) -> None:
    """One line on what the answer stop changed (nothing without the stop), and a warning when it changed any."""
    if not audit:
        return
    print(f"answer stop audit: {audit['stopped']} {what} stopped at their first answer; {audit['checked']} decoded "
          f"on to EOS or the cap ({audit['flipped_at_next_answer']} flipped at their next answer, a sample of "
          f"{audit['sample']}): {audit['verdicts_changed']} verdicts changed")
    if audit["verdicts_changed"]:
        print(f"WARNING: the answer stop changed {audit['verdicts_changed']} verdicts of the {audit['checked']} "
              "checked; the default (no --stop-at-answer) grades what cft eval grades")


CONFIGS = (GenerateConfig, DecodeConfig)


def config_from_args(args) -> GenerateConfig:
    """The options of both configs; the decoding seed is the problem seed (one ``--seed``)."""
    return from_args(GenerateConfig, args, decode=from_args(DecodeConfig, args, seed=args.seed))


def run(args) -> int:
    cfg = config_from_args(args)
    s = generate(cfg)
    print(f"generated {s['n']} responses, {s['correct']} correct ({s['accuracy']:.1%}) -> {cfg.out}")
    if s["skipped_too_long"]:
        print(f"skipped {s['skipped_too_long']} problems whose prompt is longer than {s['max_prompt_tokens']} tokens "
              f"(the model's context minus --max-new-tokens {cfg.decode.max_new_tokens}); their ids are in "
              f"{cfg.out}.meta.json")
    print_stop_audit(s["stop_audit"], "responses")
    if s["verify_errors"]:
        print(f"the verifier failed or timed out on {s['verify_errors']} responses (graded wrong, field verify_error)")
    return 0
