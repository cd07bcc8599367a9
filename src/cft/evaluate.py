"""Stage D: greedy accuracy, pass@k and maj@k under sampling, and output entropy on benchmarks (``cft eval``).

Per benchmark, every problem gets one greedy response (accuracy, the Qwen2.5-Math toolkit's protocol)
and ``n_samples`` sampled ones: pass@k with the unbiased estimator of Chen et al. 2021 (coverage: an
oracle picks), maj@k (self-consistency: the most frequent answer of k samples is graded; see
``majority_at_k``), both averaged over every k-subset of the n samples, and the mean per-token entropy
of the sampling distribution (the paper's diversity claims). Every response is kept
in ``DIR/samples.jsonl`` (``cft.samples/1``), written as it is decoded and resumable, so every metric
can be recomputed from it alone: ``cft eval --rescore DIR`` re-grades with the current verifier and
rewrites ``DIR/metrics.json`` without decoding again.

Problems are decoded in chunks of similar prompt length (less left padding). Sampling is reproducible
per chunk: each chunk's seed is a hash of what it decodes (``--seed``, problem ids, prompts, sample
indices; not the model's name or any folder), so a resumed run re-decodes a torn chunk exactly as the first
run did, and the models of one comparison share their random numbers. The ``engine`` backend (default, see
``generate``) decodes every chunk in one continuous batch and keeps each response as it ends (a resumed run
decodes only the missing ones, each from its own random stream); ``hf`` decodes chunk by chunk. The backend
that ran is recorded, and is part of a sampled record's key (the two draw different samples).
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Literal

from cft import verify
from cft.artifacts import InputError, ResumableWriter, environment, load_records, read_meta, record_key, write_meta
from cft.benchmarks import BENCHMARKS
from cft.config import MODEL_HELP, attn_option, device_option, dtype_option, from_args, model_option, option
from cft.data import Problem, is_generated, load_problems
from cft.decoding.api import DecodeConfig, decode_outputs, resolve_backend
from cft.decoding.audit import earlier_audit, print_stop_audit, stage_a_audit
from cft.errors import UsageError
from cft.models import load_model
from cft.progress import Progress
from cft.prompts import QWEN_SYSTEM, render_ids, template_text

SAMPLES = "samples.jsonl"
METRICS = "metrics.json"


@dataclass
class EvalConfig:
    """Resolved config of ``cft eval`` (its options, ``CONFIGS``); recorded in the samples sidecar."""
    model: str = model_option(help="the model to evaluate: records in --out made under the same name are reused; "
                                    + MODEL_HELP)
    benchmarks: list[str] = option(help="benchmark names (gsm8k, math500, ...), specs such as gsm8k:test or "
                                        "testbed:test or arith:test, or JSONL files; space- or comma-separated")
    out: str = option(help="output folder: metrics.json, samples.jsonl and its .meta.json sidecar")
    limit: int | None = option(None, "first N problems of each benchmark")
    n_samples: int = option(4, "sampled responses per problem for pass@k and maj@k (0: none)")
    temperature: float = option(0.6, "sampling temperature (> 0)")
    template: str | None = option(None, "chat, qwen25-math-cot, gsm8k or a template file (default: chat for "
                                        "testbed: and arith: specs, qwen25-math-cot otherwise)")
    data_dir: str | None = option(None, "benchmark data folder (default: $CFT_DATA_DIR or ../shared/data)")
    max_new_tokens: int = option(1024, "decoding budget per response")
    batch_size: int = option(64, "greedy responses decoded together (sampled: this divided by --n-samples); on "
                                 "the engine backend, the chunk of problems its random streams are drawn for")
    rows: int = option(0, "engine backend: rows decoded together (0: as many as a quarter of free memory holds, "
                          "at least --batch-size, at most 512 on a CPU and 1024 on a GPU; continuous batching keeps "
                          "them full). Outputs do not depend on it")
    stop_at_answer: bool = option(False, "SPEED KNOB: stop a response once its first final answer is complete "
                                         "instead of at EOS (the toolkit decodes to EOS); the run decodes the greedy "
                                         "responses it stopped on to EOS and reports the verdicts it changed")
    seed: int = option(0, "which testbed: or arith: problems; the sampling seed")
    question_field: str = option("question", "question field of JSONL files")
    answer_field: str = option("answer", "answer field of JSONL files")
    dtype: str = dtype_option()
    device: str | None = device_option()
    attn_implementation: str | None = attn_option()
    backend: Literal["engine", "hf"] = option("engine", "decoder: engine (continuous batching) or hf (model.generate)"
                                                        "; see cft generate --help")

    def __post_init__(self) -> None:
        names = [b.strip() for item in self.benchmarks for b in item.split(",") if b.strip()]  # gsm8k,math500
        self.benchmarks = list(dict.fromkeys(names))  # a benchmark named twice is evaluated once
        if not self.benchmarks:
            raise UsageError("no benchmarks to evaluate")
        if self.n_samples > 0 and self.temperature <= 0:
            raise UsageError("sampling needs temperature > 0 (or n_samples = 0)")

    def template_for(self, benchmark: str) -> str:
        if self.template is not None:
            return self.template
        return "chat" if is_generated(benchmark) else "qwen25-math-cot"

    def decoding(self, kind: str) -> DecodeConfig:
        """The decoding of one kind of response; the seed is replaced per chunk."""
        sampled = kind == "sample"
        return DecodeConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature if sampled else 0.0,
                            n=self.n_samples if sampled else 1, batch_size=self.batch_size, rows=self.rows,
                            stop_at_answer=self.stop_at_answer, seed=self.seed, backend=self.backend)


@dataclass(frozen=True)
class Item:
    """One problem of one benchmark, with its rendered prompt."""
    benchmark: str
    problem: Problem
    prompt_ids: list[int]


# ---------------------------------------------------------------- metrics (pure, shared with --rescore)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed in exact rational arithmetic and rounded once, so it is stable for any n.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def k_values(n: int) -> list[int]:
    """1, 2, 4, ... below n, then n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n] if n >= 1 else []


def answer_clusters(predictions: list[str | None], correct: list[bool] | None = None) -> list[int | None]:
    """The answer cluster of each sample, clusters numbered in order of first appearance; None: no answer.

    Answers are grouped by the grader's equivalence, not by string ("0.5" and "1/2" are one answer): a
    sample joins the first cluster whose representative (its first member) it is equivalent to, checked
    with ``verify.is_equivalent(answer, representative)``, so the grouping is deterministic even where
    the equivalence is not transitive. Given the samples' verdicts (``correct``), the right answers are
    one cluster (each is equivalent to the gold answer) and only wrong answers are compared with each
    other: far fewer verifier calls.
    """
    reps: list[str | None] = []  # None: the cluster of right answers
    out: list[int | None] = []
    for index, pred in enumerate(predictions):
        if pred is None or not pred.strip():
            out.append(None)
            continue
        right = correct is not None and correct[index]
        if right:
            found = reps.index(None) if None in reps else None
        else:
            found = next((i for i, rep in enumerate(reps)
                          if rep is not None and (pred == rep or verify.is_equivalent(pred, rep))), None)
        if found is None:
            reps.append(None if right else pred)
            found = len(reps) - 1
        out.append(found)
    return out


def _times(a: list[int], b: list[int]) -> list[int]:
    """Product of two polynomials given by their integer coefficients."""
    out = [0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        if x:
            for j, y in enumerate(b):
                out[i + j] += x * y
    return out


def majority_at_k(clusters: list[int | None], correct: list[bool], ks: list[int]) -> dict[int, Fraction]:
    """maj@k for each k in ``ks``: the share of all k-subsets of the n samples whose majority answer is right.

    ``clusters`` from ``answer_clusters``; ``correct[c]`` is cluster c's verdict (that of its first member).
    In a subset the answer with the most votes wins; samples without an answer do not vote, and a subset with
    none is wrong. **Ties go to the cluster that appears first in the n samples** (the lowest sample index),
    a fixed rule; sampled responses are exchangeable, so it is as good as a random one on average.

    Exact closed form by counting: cluster i (size s_i) wins a k-subset holding v of its samples when every
    earlier cluster holds fewer than v and every later one at most v, the unanswered samples being free. For
    each v the number of ways to fill the other k - v places is the coefficient of x^(k-v) in
    prod_{j<i} sum_{c<v} C(s_j, c) x^c * prod_{j>i} sum_{c<=v} C(s_j, c) x^c * (1 + x)^(n_none), so
    maj@k = sum over right clusters i and v of C(s_i, v) * that coefficient / C(n, k). Integer arithmetic: exact.
    """
    n = len(clusters)
    if any(not 1 <= k <= n for k in ks):
        raise ValueError(f"maj@k needs 1 <= k <= n (n={n}, ks={ks})")
    sizes = Counter(c for c in clusters if c is not None)
    if sorted(sizes) != list(range(len(correct))):
        raise ValueError(f"clusters must be numbered 0..{len(correct) - 1}, one verdict each")
    none = n - sum(sizes.values())
    wins = dict.fromkeys(ks, 0)
    for i, right in enumerate(correct):
        if not right:
            continue
        for v in range(1, sizes[i] + 1):
            poly = [math.comb(none, c) for c in range(none + 1)]
            for j in range(len(correct)):
                if j != i:
                    poly = _times(poly, [math.comb(sizes[j], c) for c in range(min(sizes[j], v - (j < i)) + 1)])
            for k in ks:
                if v <= k < v + len(poly):
                    wins[k] += math.comb(sizes[i], v) * poly[k - v]
    return {k: Fraction(wins[k], math.comb(n, k)) for k in ks}


def problem_majority(samples: list[dict], ks: list[int]) -> dict[int, Fraction]:
    """maj@k of one problem's sampled records (in sample order), from their stored predictions and verdicts."""
    samples = sorted(samples, key=lambda r: r["sample"])
    clusters = answer_clusters([r["prediction"] for r in samples], [bool(r["correct"]) for r in samples])
    correct: dict[int, bool] = {}
    for c, r in zip(clusters, samples, strict=True):
        if c is not None:
            correct.setdefault(c, bool(r["correct"]))
    return majority_at_k(clusters, [correct[c] for c in range(len(correct))], ks)


def compute_metrics(records: list[dict]) -> dict[str, dict]:
    """Metrics per benchmark (in order of first appearance) from ``cft.samples/1`` records alone."""
    grouped: dict[str, list[dict]] = {}
    for rec in records:
        grouped.setdefault(rec["benchmark"], []).append(rec)
    return {bench: _benchmark_metrics(recs) for bench, recs in grouped.items()}


def problem_scores(records: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Per benchmark and metric, each problem's own score: greedy correctness (``accuracy``) and the unbiased
    ``pass@k`` of its samples; the means over problems are ``compute_metrics``'. A paired bootstrap over problems
    (``cft.stats.paired_bootstrap``) resamples these."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    samples: dict[tuple[str, str], list[dict]] = {}
    for rec in records:
        scores = out.setdefault(rec["benchmark"], {})
        if rec["kind"] == "greedy":
            scores.setdefault("accuracy", {})[rec["id"]] = float(bool(rec["correct"]))
        else:
            samples.setdefault((rec["benchmark"], rec["id"]), []).append(rec)
    n_samples = {bench: min((len(rs) for (b, _), rs in samples.items() if b == bench), default=0) for bench in out}
    for (bench, pid), rs in samples.items():
        n, c = len(rs), sum(bool(r["correct"]) for r in rs)
        for k in k_values(n_samples[bench]):
            out[bench].setdefault(f"pass@{k}", {})[pid] = pass_at_k(n, c, k)
    return out


def _benchmark_metrics(records: list[dict]) -> dict:
    greedy = [r for r in records if r["kind"] == "greedy"]
    samples: dict[str, list[dict]] = {}
    for r in records:
        if r["kind"] == "sample":
            samples.setdefault(r["id"], []).append(r)
    n_per_problem = [len(rs) for rs in samples.values()]
    n_samples = min(n_per_problem, default=0)
    if n_samples and len(samples) != len(greedy):
        raise ValueError(f"{records[0]['benchmark']}: {len(greedy)} greedy responses but {len(samples)} problems "
                         "with samples")
    counts = [(len(rs), sum(r["correct"] for r in rs)) for rs in samples.values()]
    ks = k_values(n_samples)
    pass_k = {str(k): math.fsum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks}
    majority = [problem_majority(rs, ks) for rs in samples.values()]
    maj_k = {str(k): float(sum(m[k] for m in majority) / len(majority)) for k in ks}
    sampled = [r for rs in samples.values() for r in rs]
    tokens = sum(len(r["response_ids"]) for r in sampled)
    entropy = math.fsum(r["entropy"] * len(r["response_ids"]) for r in sampled) / tokens if tokens else None
    return {
        "accuracy": sum(r["correct"] for r in greedy) / len(greedy) if greedy else None,
        "n": len(greedy),
        "n_samples": n_samples,
        "pass_at_k": pass_k,
        "maj_at_k": maj_k,
        "entropy": entropy,
        "truncated": sum(r["finish"] == "length" for r in greedy) / len(greedy) if greedy else None,
    }


def print_table(metrics: dict[str, dict], title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    ks = sorted({int(k) for m in metrics.values() for k in m["pass_at_k"]})
    table = Table(title=title or None)
    labels = {b: Path(b).name if "/" in b else b for b in metrics}  # a JSONL path by its file name: keeps the columns
    table.add_column("benchmark", no_wrap=True, min_width=max(map(len, labels.values()), default=9))
    maj_ks = [k for k in ks if k > 1]  # maj@1 is pass@1
    for col in ["n", "greedy acc", *(f"pass@{k}" for k in ks), *(f"maj@{k}" for k in maj_ks), "entropy", "truncated"]:
        table.add_column(col, justify="right")

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    for bench, m in metrics.items():
        table.add_row(labels[bench], str(m["n"]), pct(m["accuracy"]), *(pct(m["pass_at_k"].get(str(k))) for k in ks),
                      *(pct(m.get("maj_at_k", {}).get(str(k))) for k in maj_ks),
                      "-" if m["entropy"] is None else f"{m['entropy']:.3f}", pct(m["truncated"]))
    Console().print(table)


# ---------------------------------------------------------------- evaluation


def load_benchmark_problems(cfg: EvalConfig) -> list[tuple[str, Problem]]:
    """Problems of every benchmark, validated; a bare benchmark name (``gsm8k``) means its test split."""
    pairs = []
    for bench in cfg.benchmarks:
        spec = f"{bench}:test" if bench in BENCHMARKS else bench
        pairs += [(bench, p) for p in load_problems(spec, seed=cfg.seed, limit=cfg.limit,
                                                    question_field=cfg.question_field,
                                                    answer_field=cfg.answer_field, data_dir=cfg.data_dir)]
    return pairs


def load_items(cfg: EvalConfig, tok, problems: list[tuple[str, Problem]] | None = None) -> list[Item]:
    """Every problem with its rendered prompt (in the benchmark's template)."""
    problems = load_benchmark_problems(cfg) if problems is None else problems
    return [Item(bench, p, render_ids(tok, p.question, cfg.template_for(bench))) for bench, p in problems]


def _key(cfg: EvalConfig, item: Item, kind: str, index: int) -> str:
    """Everything that determines a response; sampled ones also depend on their chunk (batch size, seed)."""
    d = cfg.decoding(kind)
    settings = {"max_new_tokens": d.max_new_tokens, "stop_at_answer": d.stop_at_answer}
    if kind == "sample":
        settings.update(temperature=d.temperature, n=d.n, seed=d.seed, batch_size=d.batch_size, backend=d.backend)
    return record_key(cfg.model, item.benchmark, item.problem.id, item.prompt_ids, item.problem.answer, kind, index,
                      settings)


def _record(key: str, item: Item, kind: str, index: int, out) -> dict:
    """One ``cft.samples/1`` record; every record has every key (``entropy`` is null for greedy ones)."""
    result = verify.grade_detailed(out.text, item.problem.answer)
    return {
        "key": key, "benchmark": item.benchmark, "id": item.problem.id, "question": item.problem.question,
        "gold": item.problem.answer, "kind": kind, "sample": index, "prompt_ids": item.prompt_ids,
        "response_ids": out.ids, "response": out.text, "finish": out.finish, "prediction": result.prediction,
        "correct": result.correct, "verify_error": verify.verify_error(result), "entropy": out.entropy,
    }


def _templates(cfg: EvalConfig, tok, items: list[Item]) -> dict[str, dict]:
    """What each benchmark's prompt was: template name, its text, and one rendered prompt verbatim."""
    info = {}
    for bench in cfg.benchmarks:
        name = cfg.template_for(bench)
        first = next((it for it in items if it.benchmark == bench), None)
        info[bench] = {
            "template": name,
            "text": template_text(name) or tok.chat_template,
            "system": QWEN_SYSTEM if name == "qwen25-math-cot" else None,
            "example": tok.decode(first.prompt_ids) if first else None,
        }
    return info


def evaluate(cfg: EvalConfig, model=None, tok=None) -> dict[str, dict]:
    """Decode, grade and score every benchmark; returns the metrics also written to ``DIR/metrics.json``."""
    problems = load_benchmark_problems(cfg)  # bad input fails here, before any model loads
    if model is None:
        model, tok = load_model(cfg.model, cfg.dtype, cfg.device, cfg.attn_implementation)
    out_dir = Path(cfg.out)
    cfg = replace(cfg, backend=resolve_backend(model, cfg.decoding("greedy"), cfg.model).backend)
    items = load_items(cfg, tok, problems)
    kinds, keys, chunks = plan(cfg, items)
    writer = ResumableWriter(out_dir / SAMPLES, "samples")
    if (out_dir / SAMPLES).exists():  # a finished earlier run: reuse whatever it shares with this one
        wanted = set(keys.values())
        for rec in load_records(out_dir / SAMPLES, "samples"):
            if rec["key"] in wanted:
                writer.done.setdefault(rec["key"], rec)
    chunks = [c for c in chunks if any(keys[c[0], i, j] not in writer.done for i in c[2] for j in range(c[1]))]

    def key(c: int, k: int, j: int) -> str:  # of chunk c's k-th problem's j-th response
        return keys[chunks[c][0], chunks[c][2][k], j]

    pending = sum(n * len(idx) for _, n, idx in chunks) if cfg.backend == "hf" else sum(  # hf decodes a chunk whole
        key(c, k, j) not in writer.done for c, (_, n, idx) in enumerate(chunks) for k in range(len(idx))
        for j in range(n))
    t0 = time.time()
    with Progress("eval", total=pending, unit="resp", max_tokens=pending * cfg.max_new_tokens) as progress:
        # each response is appended as it ends: a kill loses only the responses being decoded
        for c, k, j, out in decode_outputs(model, tok, decode_chunks(cfg, items, chunks, keys), progress,
                                           lambda c, k, j: key(c, k, j) in writer.done):
            kind, _, idx = chunks[c]
            writer.add(_record(key(c, k, j), items[idx[k]], kind, j, out))
        writer.write([])
        decoded_tokens = progress.tokens

    order = [keys[kind, i, j] for i in range(len(items)) for kind, n, _ in kinds for j in range(n)]
    metrics = compute_metrics([writer.done[k] for k in order])
    seconds = time.time() - t0
    greedy = [writer.done[keys["greedy", i, 0]] for i in range(len(items))]
    # the knob's effect on accuracy: greedy responses it stopped, decoded on to EOS (samples cannot be)
    audit = None
    if cfg.stop_at_answer:
        audit = (not chunks and earlier_audit(out_dir / SAMPLES, asdict(cfg))) or stage_a_audit(
            model, tok, greedy, cfg.decoding("greedy"))
    meta = {
        "stage": "eval",
        "config": asdict(cfg),
        "prompt_templates": _templates(cfg, tok, items),
        "decoding": {kind: asdict(cfg.decoding(kind)) for kind, _, _ in kinds},
        "environment": environment(model),
        "verifier_stats": verify.stats(),  # process-wide counts, timeouts included
        "timing": {"seconds": seconds, "decoded_tokens": decoded_tokens,
                   "tokens_per_second": decoded_tokens / max(seconds, 1e-9)},
        "summary": metrics,
        "stop_audit": audit,
    }
    writer.finalize(order, meta)
    write_meta(out_dir / METRICS, metrics)
    return metrics


Chunk = tuple[str, int, list[int]]  # (kind, n, item indices): decoded in one call (hf) and written together


def plan(cfg: EvalConfig, items: list[Item]) -> tuple[list[tuple[str, int, int]], dict, list[Chunk]]:
    """The kinds of response ``(kind, n, problems per chunk)``, every record key by ``(kind, item, sample)``,
    and the chunks ``(kind, n, item indices)``: problems sorted by prompt length (less left padding per batch)."""
    kinds = [("greedy", 1, cfg.batch_size)]
    if cfg.n_samples > 0:
        kinds.append(("sample", cfg.n_samples, max(1, cfg.batch_size // cfg.n_samples)))
    keys = {(kind, i, j): _key(cfg, it, kind, j)
            for kind, n, _ in kinds for i, it in enumerate(items) for j in range(n)}
    by_length = sorted(range(len(items)), key=lambda i: -len(items[i].prompt_ids))
    chunks = [(kind, n, by_length[s : s + size]) for kind, n, size in kinds for s in range(0, len(items), size)]
    return kinds, keys, chunks


def decode_chunks(cfg: EvalConfig, items: list[Item], chunks: list[Chunk],
                  keys: dict) -> list[tuple[list[list[int]], DecodeConfig]]:
    """The prompts and decoding of each chunk ``(kind, n, item indices)``. The seed hashes what the chunk
    decodes, not the model's name or the folders: a moved checkpoint or run folder samples the same, and every
    model of a comparison gets the same random numbers."""
    groups = []
    for kind, n, idx in chunks:
        what = [(items[i].problem.id, items[i].prompt_ids, j) for i in idx for j in range(n)]
        dcfg = replace(cfg.decoding(kind), seed=int(record_key(cfg.seed, kind, what), 16) % 2**31)
        groups.append(([items[i].prompt_ids for i in idx], dcfg))
    return groups


def rescore(out_dir: str | Path) -> dict[str, dict]:
    """Re-grade ``DIR/samples.jsonl`` with the current verifier and recompute every metric; no decoding."""
    out_dir = Path(out_dir)
    path = out_dir / SAMPLES
    partial = Path(str(path) + ".partial")
    if partial.exists():
        raise InputError(partial, None, None, f"an evaluation into {out_dir} is unfinished; rerun it to finish, "
                                              "or delete this file")
    records = load_records(path, "samples")
    changed = rewritten = 0
    for index, rec in enumerate(records):
        result = verify.grade_detailed(rec["response"], rec["gold"])
        changed += (result.prediction, result.correct) != (rec["prediction"], rec["correct"])
        # in _record's key order (the writer appends ``schema``); a record from before verify_error gets it
        body = {k: v for k, v in rec.items() if k != "schema"}
        fresh = {k: v for k, v in body.items() if k not in ("verify_error", "entropy")} | {
            "prediction": result.prediction, "correct": result.correct, "verify_error": verify.verify_error(result),
            "entropy": rec.get("entropy")}
        if list(fresh.items()) != list(body.items()):
            records[index] = fresh
            rewritten += 1
    metrics = compute_metrics(records)
    meta = read_meta(path)
    meta.update(summary=metrics, rescored={"verdicts_changed": changed, "environment": environment()})
    if rewritten:
        writer = ResumableWriter(path, "samples")
        writer.write(records)
        writer.finalize([r["key"] for r in records], meta)
    else:
        write_meta(path, meta)
    write_meta(out_dir / METRICS, metrics)
    return metrics


# ---------------------------------------------------------------- CLI


CONFIGS = (EvalConfig,)
REQUIRED = ("model", "benchmarks", "out")  # unless --rescore DIR


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rescore", metavar="DIR", default=None,
                   help="recompute every metric of an earlier run from DIR/samples.jsonl (no decoding; then "
                        "--model, --benchmarks and --out are not needed)")
    for action in p._actions:  # required unless --rescore: checked in ``run``
        if action.dest in REQUIRED:
            action.required = False


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return from_args(EvalConfig, args)


def run(args: argparse.Namespace) -> int:
    if args.rescore:
        metrics = rescore(args.rescore)
        print_table(metrics, title=f"rescored {args.rescore}")
        print(f"wrote {Path(args.rescore) / METRICS}")
        return 0
    missing = [f"--{name.replace('_', '-')}" for name in REQUIRED if not getattr(args, name)]
    if missing:
        raise UsageError(f"{', '.join(missing)} required (or --rescore DIR)")
    cfg = config_from_args(args)
    metrics = evaluate(cfg)
    print_table(metrics, title=f"{cfg.model}")
    print_stop_audit(read_meta(Path(cfg.out) / SAMPLES).get("stop_audit"), "greedy responses")
    print(f"wrote {Path(cfg.out) / METRICS} and {Path(cfg.out) / SAMPLES}")
    return 0
