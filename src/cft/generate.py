"""Stage A: decode solutions (greedy by default) and keep their verdicts.

The decoding is ``cft.decoding.api.decode_outputs`` on the backend ``DecodeConfig.backend`` names (the fast
engine by default, ``hf`` for ``model.generate``; recorded in ``meta["decoding"]``, see ``cft.decoding.api``),
pinned so that nothing but the checkpoint's EOS ids comes from its ``generation_config.json``: then stage A's
response is the model's argmax path that stage B's teacher-forced pass and fast engine assume.

Problems whose prompt leaves no room for ``max_new_tokens`` in the model's context are skipped and
counted, never truncated; a verifier failure on one response marks that record (``verify_error``)
and the others are graded as usual.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

from cft import verify
from cft.artifacts import ResumableWriter, environment, invalid_count, record_key
from cft.config import attn_option, device_option, dtype_option, from_args, internal, model_option, option
from cft.data import Problem, load_problems
from cft.decoding import Output
from cft.decoding.api import DecodeConfig, decode_outputs, decoding_settings, resolve_backend
from cft.decoding.audit import print_stop_audit, stage_a_audit
from cft.models import load_model
from cft.progress import Progress
from cft.prompts import render_ids, template_text

log = logging.getLogger(__name__)


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
        "verify_error": verify.verify_error(result),
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
