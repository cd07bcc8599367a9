"""Stage B: label critical tokens by counterfactual decoding.

For each correct response Y and each position t, the candidates are the model's tokens at t in the
order (-logit, then token id) from one teacher-forced pass over prompt + Y; the alternatives are the
first k-1 of that order other than y_t, each stored with its true rank (rank 1 when y_t was not the
argmax). Each alternative a is continued greedily from prompt + y_<t + a at the token-id level and
its final answer verified; y_t is critical iff every alternative was graded and failed. A verifier
timeout or crash is retried once, then the branch is unknown (``ok`` None, ``verify_error`` set):
an unknown never makes a token critical.

A branch is a response decoded under Stage A's protocol (max_new_tokens, stop rule, dtype are
inherited from the generations' metadata, see ``resolve_protocol``): it ends at EOS or when the response
reaches ``max_new_tokens`` tokens, and its verdict is ``verify.grade_detailed`` of the whole text, the last
answer the evaluation's grader extracts (one definition of a response's answer in stages A, B and D).
With ``--stop-at-answer`` (an opt-in speed knob) a branch also ends once its first final answer is
complete (``verify.answer_complete``, checked after every token including a itself); a model that writes
a second answer then gets another verdict, so such a run audits itself (``branch_stop_audit``) and records
the verdicts and labels the stop changed. Both engines apply exactly this rule; ``--engine`` names a branch
backend of ``cft.decoding.backends`` (this module imports neither):

- ``reference`` (``cft.decoding.reference``): one pinned greedy ``generate`` per branch from the full token
  prefix, every alternative.
- ``fast`` (default, ``cft.decoding.fast`` on ``cft.decoding.engine``): the prompt + response KV cache is
  computed once and shared by every branch; branches of many positions and responses decode together with
  continuous batching; the rank-r+1 branch runs only if the rank-r branch did not succeed (exact: one success
  already makes the token non-critical). Its labels are the same bytes at any draft width or rows (near-ties
  decoded again alone, margins as orders of magnitude; ``cft.decoding.engine``).

What is guaranteed: the same protocol and rules in both engines, and identical labels up to
floating-point near-ties. A cached one-token step and a full forward differ in the last bits, so an
argmax can flip where the top-1/top-2 logit gap is that small. Both engines record each branch's
smallest gap (``margin``, its order of magnitude: ``protocol.round_margin``) and each position's gap
between its last alternative and the next token (``alt_margin``); the summary counts the near-ties
(below ``--tolerance``), and ``--crosscheck N`` re-decodes N random branches plus every near-tie with
the reference path and reports disagreements.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from cft import models, predict
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
from cft.config import attn_option, device_option, dtype_option, from_args, internal, model_option, option
from cft.decoding.api import DecodeConfig, stop_rule
from cft.decoding.audit import LISTED, Stop, audit_stops, print_stop_audit
from cft.decoding.backends import backend
from cft.decoding.rowcache import EngineStats, auto_batch_size
from cft.kinds import token_kind  # re-exported: identify's statistics break counts down by it
from cft.models import cache_kwarg, load_model, load_tokenizer, resolve
from cft.progress import Progress
from cft.protocol import (
    Protocol,
    Work,
    branch_record,
    reference_branch,  # the protocol's definition of a branch, also the fast engine's exact path at near-ties
    teacher_forced,
)

log = logging.getLogger(__name__)

# Bumped when a rule that changes labels changes (tie order, unknown verdicts), so a resume never
# mixes records made under two rules.
LABEL_RULES = "cft.identify/2: order (-logit, id); verifier failure = unknown"
PROTOCOL_DEFAULTS = {"max_new_tokens": 256, "stop_at_answer": False, "dtype": "float32", "template": None}
# A branch whose smallest top-1/top-2 logit gap is below this is a near-tie: another batch shape or
# kernel may flip its argmax. Per dtype, overridable with --tolerance.
DEFAULT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.1}


@dataclass
class IdentifyConfig:
    """Options of ``cft identify`` (stage B); every field that changes labels is recorded with the labels.

    ``max_new_tokens``, ``stop_at_answer``, ``dtype`` and ``template`` default to None: they are then
    inherited from the generations' metadata (Stage A's protocol), see ``resolve_protocol``.
    """
    model: str = model_option()
    input: str = option(help="generations JSONL from `cft generate`")
    out: str = option(help="output labels JSONL (cft.labels/2)")
    engine: Literal["fast", "reference"] = option(
        "fast", "fast: shared-prefix caches, continuous batching, drafting; reference: one plain greedy decode "
                "per branch (the protocol's definition)")
    k: int = option(3, "alternatives are the rank-2..k tokens", aliases=("-k",))
    max_new_tokens: int | None = option(
        None, "response length cap of a branch (default: Stage A's, from the generations' metadata)")
    stop_at_answer: bool | None = option(
        None, "SPEED KNOB: end a branch once its first final answer is complete instead of at EOS or the cap; the run "
              "audits what it changed (--stop-audit). Default: as Stage A did, which by default decodes to EOS; "
              "generations made with the answer stop need this flag")
    stop_audit: int = option(64, "with --stop-at-answer: stopped branches re-decoded to EOS, a seeded sample "
                                 "(--crosscheck-seed) besides every one whose verdict flips at its next answer")
    include_eos: bool = option(False, "also test the final EOS position")
    batch_size: int | None = option(None, "fast engine rows (default: from free memory)")
    draft: int | None = option(None, "fast engine: draft tokens verified per row and step (default: the width "
                                     "the run measures fastest, up to 4 on a CPU and 8 on a GPU; 0: none)")
    dtype: str | None = dtype_option(None, "weights and compute dtype (default: Stage A's, from the generations' "
                                           "metadata; 'auto': the checkpoint's)")
    device: str | None = device_option()
    attn_implementation: str | None = attn_option()
    store_continuations: bool = option(True, "store every branch's token ids (--no-store-continuations: "
                                             "verdicts and margins only)",
                                       aliases=("--continuations",))
    num_shards: int = option(1, "split the responses into this many shards (one process each)")
    shard_index: int = option(0, "which shard this process labels (under torchrun/accelerate: from RANK)")
    template: str | None = internal(None)  # recorded only: the prompt ids already hold the template
    force_protocol: bool = option(False, "accept --max-new-tokens/--stop-at-answer/--dtype that differ from Stage "
                                         "A's (recorded)")
    keep_truncated: bool = option(False, "also label correct responses that hit Stage A's length cap "
                                         "(finish == length)")
    crosscheck: int | None = option(None, "re-decode N random branches plus every near-tie with the reference "
                                          "engine and compare (0: the near-ties only)", metavar="N")
    tolerance: float | None = option(None, "a branch whose smallest top-1/top-2 logit gap is below T is a near-tie "
                                           f"(default per dtype: {DEFAULT_TOLERANCE})", metavar="T")
    crosscheck_seed: int = option(0, "seed of the crosscheck's and the stop audit's random samples of branches")
    # Opt-in approximations (off by default; recorded in the metadata).
    skip_confident: float | None = option(None, "APPROXIMATION: skip positions whose top-1 probability >= TAU",
                                          metavar="TAU")
    continuation_cap: int | None = option(None, "APPROXIMATION: decode at most N tokens after the alternative",
                                          metavar="N")
    # The learned predictor (cft.predict): off by default; its quality is measured and recorded in every run.
    predict: bool = option(False, "label a seeded subset exactly, train a probe on it, predict the other responses "
                                  "and decode exactly only the positions in an uncertain band; precision, recall, "
                                  "F1, AUC on held-out exact labels and the cost are printed and recorded "
                                  "(summary.predict)")
    predict_fraction: float = option(0.15, "--predict: share of the responses labelled exactly (at least 4)")
    predict_heldout: float = option(0.4, "--predict: share of the exact subset kept out of the probe's training "
                                         "(the band is chosen and the quality measured on it)")
    predict_seed: int = option(0, "--predict: seed of the subset, the held-out split and the probe")
    predict_recall: float = option(0.92, "--predict: recall on held-out critical positions the band must reach")
    predict_precision: float = option(0.92, "--predict: precision on held-out positions the band must reach")
    predict_band: list[float] | None = option(None, "--predict: decode exactly where LO <= p < HI (default: the "
                                                    "cheapest band reaching the targets on the held-out labels)",
                                              nargs=2, metavar=("LO", "HI"))
    predict_probe: Literal["logistic", "mlp"] = option("logistic", "--predict: the probe (logistic regression, "
                                                                   "or an MLP with one hidden layer of 64)")
    predict_layers: list[int] | None = option(None, "--predict: hidden-state layers the probe reads (0: embeddings; "
                                                    "default: the middle and the last)", nargs="+")
    approximations: list[str] = internal(factory=list)
    protocol: dict = internal(factory=dict)  # where the protocol came from (filled by resolve_protocol)

    @property
    def near_tie_tolerance(self) -> float:
        return self.tolerance if self.tolerance is not None else DEFAULT_TOLERANCE.get(self.dtype or "float32", 1e-3)


def prepare(model, tok, rec: dict, key: str, cfg: IdentifyConfig, proto: Protocol, use_cache: bool):
    """Alternatives per position (the order minus y_t, first k-1), their true ranks, the greedy check."""
    prompt, response = rec["prompt_ids"], rec["response_ids"]
    forced = teacher_forced(model, prompt, response, cfg.k, use_cache)
    alternatives, ranks, margins = [], [], []
    for t, (y, cand, vals) in enumerate(zip(response, forced.ids, forced.values)):
        others = [(r + 1, a, v) for r, (a, v) in enumerate(zip(cand, vals)) if a != y]
        tested = others[: cfg.k - 1]
        skip = (y in proto.eos and not cfg.include_eos) or (
            cfg.skip_confident is not None and forced.top1_prob[t] >= cfg.skip_confident)
        if skip or not tested:
            alternatives.append([])
            ranks.append([])
            margins.append(None)
            continue
        alternatives.append([a for _, a, _ in tested])
        ranks.append([r for r, _, _ in tested])
        margins.append(tested[-1][2] - others[cfg.k - 1][2] if len(others) >= cfg.k else None)
    mismatches = [t for t, r in enumerate(forced.y_rank) if r != 1]
    work = Work(key, rec, prompt, response, rec["gold"], alternatives, mismatches,
                [[None] * len(a) for a in alternatives], ranks=ranks, alt_margin=margins)
    return work, forced.cache


def label_record(work: Work, tok, cfg: IdentifyConfig, predictor: predict.Predictor | None = None) -> dict:
    """Critical iff every alternative was graded and failed; an unknown verdict never makes a token critical.

    With a ``predictor`` (``--predict``), a predicted response's positions outside the band take its labels.
    """
    critical = [int(bool(res) and all(r is not None and r["ok"] is False for r in res)) for res in work.results]
    eligible = [int(bool(a)) for a in work.alternatives]
    fields = (predictor.fields(work.key, critical, eligible) if predictor is not None
              else predict.exact_fields(len(critical)))
    branches = [[r if r is not None else branch_record(work, t, j) for j, r in enumerate(res)]
                for t, res in enumerate(work.results)]
    rec = work.record
    return {
        "key": work.key, "id": rec["id"], "question": rec.get("question"), "gold": rec["gold"],
        "prompt_ids": work.prompt_ids, "response_ids": work.response_ids, "response": rec.get("response"),
        "critical": critical, "eligible": eligible,
        "greedy": not work.greedy_mismatches, "greedy_mismatches": work.greedy_mismatches,
        "alt_margin": work.alt_margin, **fields,
        "branches": branches, "critical_spans": critical_spans(tok, work.response_ids, critical),
    }


def without_margins(rec: dict) -> dict:
    """A labels record without its branch margins: what must be equal across batch shapes and resumes.

    A margin comes from batched step logits, which differ in the last bits with the batch's
    composition (a resumed or sharded run batches other branches together); labels, continuations
    and verdicts do not, short of a near-tie.
    """
    return {**rec, "branches": [[{k: v for k, v in b.items() if k != "margin"} for b in br]
                                for br in rec["branches"]]}


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


def crosscheck(model, tok, labels: list[dict], cfg: IdentifyConfig, proto: Protocol) -> dict:
    """Re-decode ``cfg.crosscheck`` random branches plus every near-tie branch with the reference path.

    Compares continuation ids (when stored) and verdicts. A disagreement on a branch whose margin is
    below the tolerance is a floating-point near-tie (two kernels may pick either token); any other
    disagreement means the engines differ and is reported as unexplained.
    """
    tol = cfg.near_tie_tolerance
    decoded = [(i, t, j) for i, rec in enumerate(labels) for t, br in enumerate(rec["branches"])
               for j, b in enumerate(br) if b["ok"] is not None]
    near = {x for x in decoded if _near(labels[x[0]]["branches"][x[1]][x[2]], tol)}
    rest = [x for x in decoded if x not in near]
    chosen = sorted(near | set(random.Random(cfg.crosscheck_seed).sample(rest, min(cfg.crosscheck, len(rest)))))
    disagreements = []
    with Progress("crosscheck[reference]", total=len(chosen), unit="branch") as progress:
        for i, t, j in chosen:
            rec, b = labels[i], labels[i]["branches"][t][j]
            response = rec["response_ids"][:t] + [b["token"]]
            cont, margin = reference_branch(model, tok, proto, rec["prompt_ids"], response, t)
            progress.advance(tokens=len(cont))
            v = proto.verdict(response + cont, rec["gold"])
            ids_differ = b["ids"] is not None and b["ids"] != cont
            if ids_differ or v.ok != b["ok"]:
                disagreements.append({"key": rec["key"], "id": rec["id"], "position": t, "rank": b["rank"],
                                      "near_tie": _near(b, tol) or (margin is not None and margin < tol),
                                      "margin": b["margin"], "reference_margin": margin, "ids_differ": ids_differ,
                                      "fast": {"ok": b["ok"], "answer": b["answer"]},
                                      "reference": {"ok": v.ok, "answer": v.answer}})
    return {"crosschecked": len(chosen), "crosschecked_near_ties": len(near),
            "disagreements": len(disagreements),
            "disagreements_near_tie": sum(d["near_tie"] for d in disagreements),
            "disagreement_details": disagreements[:100]}


def branch_stop_audit(model, tok, labels: list[dict], cfg: IdentifyConfig, proto: Protocol) -> dict:
    """What ``--stop-at-answer`` changed: ``audit_stops`` over the graded branches it ended, and their labels.

    A branch ended by the stop is one whose stored continuation ends neither at EOS nor at the cap (without
    stored continuations every graded branch counts, and the look-ahead only finds its stop again). A
    position's label changes when a changed verdict changes it; it is unsettled when a success turned into a
    failure and the fast engine never ran the later ranks (it stops at the first success).
    """
    stops, where = [], []
    for i, rec in enumerate(labels):
        for t, br in enumerate(rec["branches"]):
            for j, b in enumerate(br):
                if b["ok"] is None:
                    continue
                response = rec["response_ids"][:t] + [b["token"]] + (b["ids"] or [])
                done = len(b["ids"] or [])
                if (b["ids"] is not None and response[-1] in proto.eos) or done >= proto.budget(t):
                    continue
                stops.append(Stop(rec["prompt_ids"], response, proto.budget(t) - done, rec["gold"], b["ok"]))
                where.append((i, t, j))
    dcfg = DecodeConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size or 64,
                        rows=None if cfg.batch_size else 0)
    summary, full = audit_stops(model, tok, stops, lambda ids, gold: proto.verdict(ids, gold).ok,
                                cfg.stop_audit, cfg.crosscheck_seed, dcfg)
    changed = {where[n]: ok for n, ok in full.items() if ok != stops[n].ok}
    labels_changed = unsettled = 0
    for i, t in {(i, t) for i, t, _ in changed}:
        branches = labels[i]["branches"][t]
        oks = [changed.get((i, t, j), b["ok"]) for j, b in enumerate(branches)]
        skipped = any(b["ok"] is None and not b["verify_error"] for b in branches)
        if any(ok is True for ok in oks):
            critical = 0
        elif skipped:
            unsettled += 1
            continue
        else:
            critical = int(all(ok is False for ok in oks))
        labels_changed += critical != labels[i]["critical"][t]
    summary.update(labels_changed=labels_changed, labels_unsettled=unsettled,
                   changed=[_changed_branch(labels[i], t, j, ok) for (i, t, j), ok in sorted(changed.items())][:LISTED])
    return summary


def _changed_branch(rec: dict, t: int, j: int, ok_at_end: bool | None) -> dict:
    b = rec["branches"][t][j]
    return {"key": rec["key"], "id": rec["id"], "position": t, "rank": b["rank"], "ok_at_stop": b["ok"],
            "answer_at_stop": b["answer"], "ok_at_end": ok_at_end}


def _near(branch: dict, tol: float) -> bool:
    return branch.get("margin") is not None and branch["margin"] < tol


def _works(model, tok, records, keys, cfg, proto, use_cache, adjust=None):
    for rec, key in zip(records, keys):
        work, cache = prepare(model, tok, rec, key, cfg, proto, use_cache)
        if adjust is not None:
            adjust(work)
        yield work, cache


def shard_of(cfg: IdentifyConfig) -> tuple[int, int]:
    """(index, count): explicit ``--num-shards``/``--shard-index``, else the launcher's RANK/WORLD_SIZE."""
    if cfg.num_shards < 1:
        raise InputError("--num-shards", None, None, f"must be at least 1, not {cfg.num_shards}")
    if not 0 <= cfg.shard_index < cfg.num_shards:
        raise InputError("--shard-index", None, None,
                         f"{cfg.shard_index} is out of range for --num-shards {cfg.num_shards} "
                         f"(0..{cfg.num_shards - 1})")
    if cfg.num_shards > 1:
        return cfg.shard_index, cfg.num_shards
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def rank_device() -> str | None:
    """``cuda:LOCAL_RANK`` under a multi-process launcher with CUDA present (each rank its own GPU), else None."""
    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return None


def shard_path(out: str, index: int, count: int) -> str:
    return out if count == 1 else f"{out}.shard{index}of{count}.jsonl"


def label_params(cfg: IdentifyConfig, model) -> dict:
    """Every setting that can change a labels record (the engine is not one: both give the same labels)."""
    params = {k: v for k, v in asdict(cfg).items()
              if k in ("model", "k", "max_new_tokens", "stop_at_answer", "include_eos", "dtype",
                       "skip_confident", "continuation_cap")}
    if cfg.predict:
        params.update({k: v for k, v in asdict(cfg).items() if k.startswith("predict")})
    params["rules"] = LABEL_RULES
    params["weights"] = models.weights_fingerprint(model)
    params["model_dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    return params


def label_key(rec: dict, params: dict) -> str:
    """Everything that determines a labels record; the id too, so two problems with the same text stay two."""
    return record_key(str(rec["id"]), rec["prompt_ids"], rec["response_ids"], rec["gold"], params)


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


def resolve_protocol(cfg: IdentifyConfig, model=None) -> IdentifyConfig:
    """Fill the protocol settings left unset from Stage A's metadata; refuse a conflicting explicit one.

    A shorter ``max_new_tokens`` than Stage A's makes late positions spuriously critical, another dtype
    makes the responses not greedy: such a flag is an error unless ``force_protocol`` (recorded).
    Idempotent: a second call sees the resolved values, which agree.
    """
    meta = read_meta(cfg.input)
    gen_cfg = meta.get("config") or {}
    decode = gen_cfg.get("decode") or {}
    stage_a = {"max_new_tokens": decode.get("max_new_tokens"), "stop_at_answer": decode.get("stop_at_answer"),
               "dtype": gen_cfg.get("dtype"), "template": gen_cfg.get("template")}
    if (decode.get("temperature") or 0) > 0 and not cfg.protocol:
        log.warning("%s was sampled (temperature %s): its responses are not the greedy path, and every "
                    "mismatch is counted as not greedy", cfg.input, decode["temperature"])
    if not meta:
        if not cfg.protocol:
            log.warning("%s has no metadata (%s.meta.json): Stage A's protocol is unknown; using identify's "
                        "settings as given", cfg.input, cfg.input)
        stage_a = {}
    if stage_a.get("stop_at_answer") and cfg.stop_at_answer is None:
        raise InputError(f"{cfg.input}.meta.json", None, "stop_at_answer",
                         "these responses were made with the answer stop (each ends at its first complete answer "
                         "and `correct` grades that answer, not the last one cft eval grades); label them with "
                         "the rule they were made with by passing --stop-at-answer (its effect is audited and "
                         "recorded), or regenerate them without --stop-at-answer")
    # the answer stop over responses decoded to EOS is the opt-in speed knob, not a conflict (it is audited)
    conflicts = [name for name, value in stage_a.items()
                 if value is not None and getattr(cfg, name) is not None and getattr(cfg, name) != value
                 and not (name == "stop_at_answer" and cfg.stop_at_answer)]
    if conflicts and not cfg.force_protocol:
        what = "; ".join(f"{name} {getattr(cfg, name)!r} (Stage A: {stage_a[name]!r})" for name in conflicts)
        raise InputError(f"{cfg.input}.meta.json", None, conflicts[0],
                         f"identify settings differ from the protocol that produced these responses: {what}; "
                         "drop the flag to inherit it, or pass --force-protocol")
    inherited = []
    for name, default in PROTOCOL_DEFAULTS.items():
        if getattr(cfg, name) is None:
            value = stage_a.get(name)
            if value is None and name == "dtype" and model is not None:
                value = str(next(model.parameters()).dtype).replace("torch.", "")
            setattr(cfg, name, default if value is None else value)
            if value is not None:
                inherited.append(name)
    if not cfg.protocol:
        cfg.protocol = {"source": "generations metadata" if meta else "defaults (no generations metadata)",
                        "inherited": inherited, "forced": conflicts if cfg.force_protocol else [],
                        "branch_end": stop_rule(cfg.stop_at_answer)}
    return cfg


@dataclass
class Inputs:
    """The responses to label (all shards, in order) and what was left out."""
    records: list[dict]
    n_input: int
    excluded_truncated: int


def select_inputs(cfg: IdentifyConfig, vocab_size: int | None = None) -> Inputs:
    """The correct generations (every shard's), validated before any model loads.

    A response that hit Stage A's length cap (``finish == "length"``) is left out unless
    ``keep_truncated``: its answer may come from the last-number fallback of an unfinished solution.
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
        for name in ("question", "response", "finish"):
            if rec.get(name) is not None and not isinstance(rec[name], str):
                raise bad(name, "not a string")
        if rec["correct"] and not rec["response_ids"]:
            raise bad("response_ids", "empty response marked correct")
        seen[str(rid)] = lineno
        return rec

    records = read_valid(cfg.input, parse, SCHEMAS["generations"])
    correct = [r for r in records if r["correct"]]
    kept = [r for r in correct if cfg.keep_truncated or r.get("finish") != "length"]
    return Inputs(kept, len(records), len(correct) - len(kept))


def identify(cfg: IdentifyConfig, model=None, tok=None) -> dict:
    """Run stage B (this process's shard); returns the summary also written to the metadata.

    Finished responses are appended to ``OUT.partial`` as they complete (see ``ResumableWriter.add``);
    a rerun after a kill labels only the responses missing there.
    """
    if cfg.k < 2:
        raise InputError("-k", None, None, f"k must be at least 2 (one alternative), not {cfg.k}")
    if cfg.predict:
        predict.Settings.of(cfg)  # bad --predict-* options fail before any model loads
    index, count = shard_of(cfg)
    resolve_protocol(cfg, model)
    inputs = select_inputs(cfg, vocab_size_of(cfg.model, model))
    if model is None:
        model, tok = load_model(cfg.model, cfg.dtype, cfg.device or rank_device(), cfg.attn_implementation)
    cfg.approximations = [name for name, v in (("skip_confident", cfg.skip_confident),
                                               ("continuation_cap", cfg.continuation_cap)) if v is not None]
    proto = Protocol(tok, model, cfg)
    params = label_params(cfg, model)
    all_keys = [label_key(r, params) for r in inputs.records]
    records, keys = inputs.records[index::count], all_keys[index::count]
    out = shard_path(cfg.out, index, count)
    writer = ResumableWriter(out, "labels")
    todo = [(r, k) for r, k in zip(records, keys) if k not in writer.done]
    decoder = backend(cfg.engine, "branches")  # fast (the engine) or reference, by name (cft.decoding.backends)
    if decoder.check is not None:
        decoder.check(model, cfg.model)

    predictor = (predict.Predictor(model, cfg, all_keys, lambda y: token_kind(tok.decode([y])))
                 if cfg.predict else None)

    def on_done(work: Work) -> None:
        writer.add(label_record(work, tok, cfg, predictor))
        progress.advance(1)

    passes: list = []  # the engine's statistics of each decode pass (--predict decodes in two)

    def decode(todo: list[tuple[dict, str]], adjust=None) -> None:
        works = _works(model, tok, [r for r, _ in todo], [k for _, k in todo], cfg, proto, decoder.shares_prefix,
                       adjust)
        max_prompt = max((len(r["prompt_ids"]) for r, _ in todo), default=0)
        passes.append(decoder.branches(model, tok, works, cfg, proto, on_done, progress, max_prompt))

    t0 = time.time()
    with Progress(f"identify[{cfg.engine}]", total=len(todo), unit="resp") as progress:
        if predictor is not None:
            predictor.run(list(zip(records, keys)), writer.done, decode)
        else:
            decode(todo)
        writer.write([])
        decoded = progress.tokens
    seconds = time.time() - t0
    labels = [writer.done[k] for k in keys]
    summary = summarize(labels, tok, cfg.near_tie_tolerance)
    summary["predict"] = predictor.summary(labels) if predictor is not None else None
    check = {"crosschecked": 0, "crosschecked_near_ties": 0, "disagreements": 0, "disagreements_near_tie": 0,
             "disagreement_details": []}
    if cfg.crosscheck is not None and cfg.engine == "fast":  # the reference engine is its own crosscheck
        check = crosscheck(model, tok, labels, cfg, proto)
    summary.update(check)
    summary["stop_audit"] = branch_stop_audit(model, tok, labels, cfg, proto) if cfg.stop_at_answer else None
    summary.update(n_input=inputs.n_input, responses=len(labels), invalid_skipped=invalid_count(cfg.input),
                   excluded_truncated=inputs.excluded_truncated,
                   seconds=seconds, decoded_tokens=decoded,
                   tokens_per_second=decoded / max(seconds, 1e-9), shard=[index, count],
                   engine=EngineStats.total(passes))
    meta = {"stage": "identify", "config": asdict(cfg), "seed": None,  # greedy throughout: nothing is random
            "label_params": params, "all_keys_digest": record_key(all_keys), "responses_total": len(all_keys),
            "generation_meta": read_meta(cfg.input), "environment": environment(model), "summary": summary}
    writer.finalize(keys, meta)
    return summary


def summarize(labels: list[dict], tok, tolerance: float | None = None) -> dict:
    """Critical fraction over tested positions, its split by token kind, the greedy check and the unknowns.

    With a ``tolerance``, also the near-ties: decoded branches whose smallest logit margin is below it,
    and positions whose last alternative is within it of the next-ranked token.
    """
    by_kind: dict[str, list[int]] = {}
    branches = unknown_positions = unknown_branches = near_ties = near_tie_positions = 0
    continuation: int | None = 0  # tokens of the stored continuations (None: some were not stored)
    for rec in labels:
        margins = rec.get("alt_margin") or [None] * len(rec["response_ids"])
        for y, crit, elig, br, am in zip(rec["response_ids"], rec["critical"], rec["eligible"], rec["branches"],
                                         margins):
            if not elig:
                continue
            kind = by_kind.setdefault(token_kind(tok.decode([y])), [0, 0])
            kind[0] += crit
            kind[1] += 1
            ran = [b for b in br if b["ok"] is not None or b.get("verify_error")]
            branches += len(ran)
            if continuation is not None:
                lengths = [len(b["ids"]) if b.get("ids") is not None else None for b in ran]
                continuation = None if None in lengths else continuation + sum(lengths)
            unknown = sum(b["ok"] is None for b in ran)
            unknown_branches += unknown
            unknown_positions += bool(unknown) and not any(b["ok"] for b in ran)
            if tolerance is not None:
                near_ties += sum(_near(b, tolerance) for b in ran)
                near_tie_positions += am is not None and am < tolerance
    tested = sum(v[1] for v in by_kind.values())
    summary = {
        "critical_fraction": sum(v[0] for v in by_kind.values()) / max(tested, 1),
        "critical_by_kind": {k: {"critical": v[0], "tokens": v[1], "fraction": v[0] / max(v[1], 1)}
                             for k, v in sorted(by_kind.items())},
        "positions": tested,
        "branches": branches,
        "not_greedy": sum(not r["greedy"] for r in labels),
        "no_critical_token": sum(not any(r["critical"]) for r in labels),
        "unknown_positions": unknown_positions,
        "unknown_branches": unknown_branches,
        "continuation_tokens": continuation,  # every sitting's, unlike ``decoded_tokens`` (this run's)
    }
    if tolerance is not None:
        summary.update(tolerance=tolerance, near_ties=near_ties, near_tie_positions=near_tie_positions)
    return summary


CONFIGS = (IdentifyConfig,)


def configure_parser(p) -> None:
    """The actions that are not label settings."""
    p.add_argument("--merge", action="store_true", help="merge the shard files of --out into --out")
    p.add_argument("--merge-timeout", type=float, default=None, metavar="SECONDS",
                   help="under a launcher, how long rank 0 waits for the other ranks' shards (default: forever)")
    p.add_argument("--dry-run", action="store_true", help="count the work and estimate time; decode nothing")


def config_from_args(args) -> IdentifyConfig:
    return from_args(IdentifyConfig, args)


def print_summary(s: dict) -> None:
    kinds = ", ".join(f"{k} {v['fraction']:.1%} of {v['tokens']}" for k, v in s["critical_by_kind"].items())
    print(f"{s['responses']} responses, {s['positions']} positions, {s['branches']} branches, "
          f"{s['decoded_tokens']} decoded tokens in {s['seconds']:.1f}s ({s['tokens_per_second']:.0f} tok/s)")
    print(f"critical fraction {s['critical_fraction']:.1%} ({kinds}); not greedy: {s['not_greedy']}; "
          f"no critical token: {s['no_critical_token']}")
    print(f"excluded truncated: {s.get('excluded_truncated', 0)}; unknown positions (verifier failed twice): "
          f"{s.get('unknown_positions', 0)}")
    if "near_ties" in s:
        print(f"near ties (margin < {s['tolerance']:g}): {s['near_ties']} branches, {s['near_tie_positions']} "
              f"positions; crosschecked {s.get('crosschecked', 0)} branches with the reference engine: "
              f"{s.get('disagreements', 0)} disagreements ({s.get('disagreements_near_tie', 0)} on near ties)")
    if s.get("predict"):
        predict.print_summary(s["predict"])
    audit = s.get("stop_audit")
    print_stop_audit(audit, "branches")
    if audit:
        print(f"answer stop audit: {audit['labels_changed']} labels changed, {audit['labels_unsettled']} unsettled "
              "(a success became a failure where later ranks never ran)")
    unexplained = s.get("disagreements", 0) - s.get("disagreements_near_tie", 0)
    if unexplained:
        print(f"WARNING: {unexplained} disagreements between the engines are not near ties; see "
              "summary.disagreement_details in the metadata")


def run(args) -> int:
    cfg = config_from_args(args)
    if args.merge:
        path = merge_shards(cfg.out, cfg.num_shards, timeout=args.merge_timeout)
        print(f"merged {cfg.num_shards} shards -> {path}")
        return 0
    if args.dry_run:
        print_plan(plan(cfg))
        return 0
    s = identify(cfg)
    print_summary(s)
    index, count = s["shard"]
    if count > 1 and "WORLD_SIZE" in os.environ and index == 0:
        print(f"merged {count} shards -> {merge_shards(cfg.out, count, wait=True, timeout=args.merge_timeout)}")
    return 0


MERGE_FIELDS = ("label_params", "all_keys_digest", "responses_total")


def _shard_problem(path: str, meta: dict, first: dict | None, index: int, count: int) -> str | None:
    """Why shard file ``path`` cannot be merged (None: it can), given shard 0's metadata ``first``."""
    if not os.path.exists(path) or not meta:
        return "missing" if not os.path.exists(path) else "has no metadata (unfinished?)"
    if meta.get("summary", {}).get("shard") != [index, count]:
        return f"was written as shard {meta.get('summary', {}).get('shard')}, not [{index}, {count}] (stale file?)"
    if any(f not in meta for f in MERGE_FIELDS):
        return "was written by an older cft (no merge fields); rerun it"
    if first is not None:
        differ = [f for f in MERGE_FIELDS if meta[f] != first[f]]
        if differ:
            names = sorted(k for k in set(meta["label_params"]) | set(first["label_params"])
                           if meta["label_params"].get(k) != first["label_params"].get(k))
            return f"is from another run than shard 0 ({', '.join(names) or ', '.join(differ)} differ; stale file?)"
    return None


def merge_shards(out: str, count: int, wait: bool = False, poll_seconds: float = 2.0,
                 timeout: float | None = None) -> str:
    """Interleave shard files back into single-process order (shard i holds responses i, i+N, ...).

    Each shard must come from the same run: same label settings and weights, same input (the digest
    of every response key, which each rank computes) and exactly the keys its index implies. With
    ``wait`` (rank 0 under a launcher) shards still missing or stale are waited for, up to ``timeout``.
    """
    if count < 2:
        raise InputError("--num-shards", None, None, f"merging needs --num-shards >= 2, not {count}")
    paths = [shard_path(out, i, count) for i in range(count)]
    start = time.time()
    while True:
        metas = [read_meta(p) if os.path.exists(p) else {} for p in paths]
        problems = [(p, _shard_problem(p, m, metas[0] if i else None, i, count))
                    for i, (p, m) in enumerate(zip(paths, metas))]
        problems = [(p, why) for p, why in problems if why]
        if not problems:
            break
        if not wait or (timeout is not None and time.time() - start > timeout):
            path, why = problems[0]
            waited = f" after waiting {time.time() - start:.0f}s (--merge-timeout)" if wait else ""
            raise InputError(path, None, None, f"cannot merge: shard file {why}{waited}; "
                             f"{len(problems)} of {count} shards not ready; rerun that shard, then --merge")
        time.sleep(poll_seconds)
    shards = [load_records(p, "labels") for p in paths]
    merged = [shards[i % count][i // count] for i in range(sum(map(len, shards)))]
    digest = record_key([r["key"] for r in merged])
    if digest != metas[0]["all_keys_digest"] or any(len(s) != len(range(i, metas[0]["responses_total"], count))
                                                     for i, s in enumerate(shards)):
        raise InputError(paths[0], None, None, "cannot merge: the shard files do not hold exactly the responses "
                                               "their indices imply (edited or mixed files?)")
    writer = ResumableWriter(out, "labels")
    writer.write(merged)
    cfg = metas[0]["config"]
    tol = cfg.get("tolerance") or DEFAULT_TOLERANCE.get(cfg.get("dtype") or "float32", 1e-3)
    summary = summarize(merged, load_tokenizer(cfg["model"]), tol)
    summed = ("decoded_tokens", "excluded_truncated", "crosschecked", "crosschecked_near_ties", "disagreements",
              "disagreements_near_tie")
    summary.update({f: sum(m["summary"].get(f, 0) for m in metas) for f in summed})
    engines = [m["summary"].get("engine") for m in metas]
    summary["engine"] = EngineStats.total([EngineStats.from_dict(e) for e in engines]) if all(engines) else None
    audits = [m["summary"].get("stop_audit") for m in metas]
    summary["stop_audit"] = _sum_audits(audits) if all(audits) else None
    parts = [m["summary"].get("predict") for m in metas]
    summary["predict"] = predict.merge(parts, merged) if all(parts) else None
    summary.update(responses=len(merged), n_input=metas[0]["summary"].get("n_input"),
                   seconds=max(m["summary"]["seconds"] for m in metas),
                   disagreement_details=[d for m in metas for d in m["summary"].get("disagreement_details", [])])
    writer.finalize([r["key"] for r in merged], {**metas[0], "merged_from": paths, "summary": summary})
    return out


def _sum_audits(audits: list[dict]) -> dict:
    """The shards' stop audits as one: counts summed (each shard audited its own seeded sample), lists joined."""
    out = {}
    for k, v in audits[0].items():
        if isinstance(v, list):
            out[k] = [x for a in audits for x in a.get(k, [])][:LISTED]
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = sum(a.get(k, 0) for a in audits)
        else:
            out[k] = v
    return out


def plan(cfg: IdentifyConfig) -> dict:
    """What identification would do: counts from the input, time from a short synthetic decode benchmark."""
    resolve_protocol(cfg)
    index, count = shard_of(cfg)
    inputs = select_inputs(cfg)
    records = inputs.records[index::count]
    positions = sum(len(r["response_ids"]) - (0 if cfg.include_eos else 1) for r in records)
    per_branch = [len(r["response_ids"]) - t for r in records for t in range(len(r["response_ids"]))]
    est_tokens = sum(min(n, cfg.max_new_tokens) for n in per_branch)
    model, tok = load_model(cfg.model, cfg.dtype, cfg.device or rank_device(), cfg.attn_implementation)
    width = int(sum(len(r["prompt_ids"]) + len(r["response_ids"]) // 2 for r in records) / max(len(records), 1))
    rate = decode_rate(model, cfg.batch_size, max(width, 1))
    return {"input_records": inputs.n_input, "responses": len(records), "positions": positions,
            "max_branches": positions * (cfg.k - 1), "min_branches": positions,
            "estimated_tokens_min": est_tokens, "estimated_tokens_max": est_tokens * (cfg.k - 1),
            "decode_tokens_per_second": rate, "estimated_seconds_min": est_tokens / rate,
            "estimated_seconds_max": est_tokens * (cfg.k - 1) / rate,
            "predict_fraction": cfg.predict_fraction if cfg.predict else None}


@torch.inference_mode()
def decode_rate(model, batch_size: int | None, width: int, steps: int = 8) -> float:
    """Tokens/s of batched one-token decode steps over a cache of ``width`` (synthetic tokens)."""
    from transformers import DynamicCache

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
    if p.get("predict_fraction") is not None:
        print(f"with --predict: these estimates are for exact labels of every response; the run decodes the "
              f"exactly labelled subset ({p['predict_fraction']:.0%} of the responses) and the positions the "
              f"probe leaves uncertain, which only the run itself measures (summary.decoded_tokens)")
