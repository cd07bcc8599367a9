"""Stage D: the pass@k estimator, metrics from samples alone, rescoring, resuming, and a tiny end-to-end run."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction

import pytest
import torch
from transformers import LlamaForCausalLM

from cft import evaluate as ev
from cft import verify
from cft.artifacts import InputError, load_records, read_meta
from cft.decoding.api import DecodeConfig, decode
from cft.errors import UsageError
from cft.testbed.pretrain import PretrainConfig, build_model
from cft.testbed.tokenizer import build_tokenizer
from tests.conftest import write_jsonl


def brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Share of all k-subsets of n samples (the first c correct) that hold a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_equals_enumeration_over_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert ev.pass_at_k(n, c, k) == float(brute_pass_at_k(n, c, k)), (n, c, k)


def test_pass_at_k_is_stable_for_large_n_and_checks_its_arguments():
    assert ev.pass_at_k(1000, 1, 1) == 0.001
    assert ev.pass_at_k(1000, 0, 500) == 0.0
    assert ev.pass_at_k(1000, 1000, 1000) == 1.0
    values = [ev.pass_at_k(1000, 3, k) for k in (1, 10, 100, 997, 998)]
    assert values == sorted(values) and values[-1] == 1.0 and 0 < values[0] < 1
    for bad in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)]:
        with pytest.raises(ValueError):
            ev.pass_at_k(*bad)


def test_k_values_are_powers_of_two_then_n():
    assert ev.k_values(0) == []
    assert ev.k_values(1) == [1]
    assert ev.k_values(4) == [1, 2, 4]
    assert ev.k_values(6) == [1, 2, 4, 6]
    assert ev.k_values(16) == [1, 2, 4, 8, 16]


def brute_majority(clusters: list[int | None], correct: list[bool], k: int) -> Fraction:
    """Share of all k-subsets whose plurality cluster (ties: the lowest cluster number) is right."""
    subsets = list(itertools.combinations(clusters, k))
    right = 0
    for s in subsets:
        votes = [c for c in s if c is not None]
        if votes:
            right += correct[max(set(votes), key=lambda c: (votes.count(c), -c))]
    return Fraction(right, len(subsets))


@pytest.mark.parametrize(("clusters", "correct"), [
    ([0, 1, 0, 1], [False, True]),  # ties at k=2 and k=4 go to cluster 0
    ([0, 1, 1, 2, 2, 0, None, 1], [True, False, False]),
    ([None, 0, None, 1, 2, 3, 1, 0], [False, False, True, False]),
    ([None, None, 0], [True]),  # most subsets hold no answer at all: wrong
    ([0, 1, 2, 3, 4, 5, 6], [False, False, False, True, False, False, False]),  # all distinct: every k-tie
    ([0, 0, 0, 1, 1, 2, 2, 2, 3, None], [False, True, True, False]),
])
def test_maj_at_k_equals_enumeration_over_all_subsets(clusters, correct):
    ks = list(range(1, len(clusters) + 1))
    got = ev.majority_at_k(clusters, correct, ks)
    assert got == {k: brute_majority(clusters, correct, k) for k in ks}


def test_maj_at_k_random_cases_against_enumeration():
    import random

    rng = random.Random(0)
    for _ in range(40):
        n, m = rng.randint(1, 9), rng.randint(1, 4)
        clusters = [rng.choice([*range(m), None]) for _ in range(n)]
        order = {c: i for i, c in enumerate(dict.fromkeys(c for c in clusters if c is not None))}
        clusters = [None if c is None else order[c] for c in clusters]
        correct = [rng.random() < 0.5 for _ in order]
        ks = ev.k_values(n)
        assert ev.majority_at_k(clusters, correct, ks) == {k: brute_majority(clusters, correct, k) for k in ks}


def test_maj_at_k_checks_its_arguments():
    with pytest.raises(ValueError, match="1 <= k <= n"):
        ev.majority_at_k([0, 0], [True], [3])
    with pytest.raises(ValueError, match="numbered"):
        ev.majority_at_k([0, 2], [True, False], [1])


def test_answers_are_grouped_by_the_graders_equivalence():
    preds = ["0.5", "1/2", "2", None, "\\frac{1}{2}", "2.0", "", "x+1", "1+x"]
    assert ev.answer_clusters(preds) == [0, 0, 1, None, 0, 1, None, 2, 2]


def test_right_answers_form_one_cluster_given_the_verdicts():
    preds = ["7", "0.5", "1/2", "7.0", None, "x", "\\frac{1}{2}"]
    correct = [False, True, True, False, False, False, True]
    assert ev.answer_clusters(preds, correct) == [0, 1, 1, 0, None, 2, 1]
    assert ev.answer_clusters(preds) == [0, 1, 1, 0, None, 2, 1]  # the same grouping by comparison


def test_problem_majority_votes_equivalent_answers_together():
    """Three samples say one half in three spellings, two say 3: the half wins, not the most frequent string."""
    texts = ["\\boxed{0.5}", "\\boxed{1/2}", "\\boxed{\\frac{1}{2}}", "\\boxed{3}", "\\boxed{3}", "no answer",
             "\\boxed{7}"]
    recs = [sample("A", "p", "sample", i, t, "1/2", verify.grade(t, "1/2")[1], 1, 0.0) for i, t in enumerate(texts)]
    clusters, correct = [0, 0, 0, 1, 1, None, 2], [True, False, False]
    ks = ev.k_values(len(recs))
    assert ev.problem_majority(recs[::-1], ks) == {k: brute_majority(clusters, correct, k) for k in ks}
    assert ev.problem_majority(recs, ks)[7] == 1  # string voting would have said "3"


def sample(bench: str, pid: str, kind: str, index: int, text: str, gold: str, correct: bool,
           n_tokens: int, entropy: float | None, finish: str = "eos") -> dict:
    return {"schema": "cft.samples/1", "key": f"{bench}-{pid}-{kind}-{index}", "benchmark": bench, "id": pid,
            "question": "q", "gold": gold, "kind": kind, "sample": index, "prompt_ids": [1, 2],
            "response_ids": list(range(n_tokens)), "response": text, "finish": finish,
            "prediction": verify.extract_answer(text), "correct": correct, "entropy": entropy}


def hand_made_samples() -> list[dict]:
    """Two benchmarks; the stored verdicts are those of the current verifier except where noted."""
    return [
        # bench A, p1: greedy right; samples 1 of 2 right
        sample("A", "p1", "greedy", 0, "The answer is 3.", "3", True, 5, None),
        sample("A", "p1", "sample", 0, "The answer is 3.", "3", True, 4, 1.0),
        sample("A", "p1", "sample", 1, "The answer is 4.", "3", False, 6, 2.0),
        # bench A, p2: greedy wrong (hit the length cap); samples 0 of 2 right
        sample("A", "p2", "greedy", 0, "I think", "5", False, 8, None, finish="length"),
        sample("A", "p2", "sample", 0, "\\boxed{6}", "5", False, 2, 0.5),
        sample("A", "p2", "sample", 1, "\\boxed{7}", "5", False, 8, 0.25),
        # bench B, p1: everything right
        sample("B", "p1", "greedy", 0, "#### 10", "10", True, 3, None),
        sample("B", "p1", "sample", 0, "#### 10", "10", True, 3, 0.0),
        sample("B", "p1", "sample", 1, "\\boxed{10}", "10", True, 1, 3.0),
    ]


EXPECTED = {
    "A": {"accuracy": 0.5, "n": 2, "n_samples": 2, "pass_at_k": {"1": 0.25, "2": 0.5},
          "maj_at_k": {"1": 0.25, "2": 0.5},  # p1: "3" and "4" tie at k=2, the first ("3", right) wins
          "entropy": (1.0 * 4 + 2.0 * 6 + 0.5 * 2 + 0.25 * 8) / 20, "truncated": 0.5},
    "B": {"accuracy": 1.0, "n": 1, "n_samples": 2, "pass_at_k": {"1": 1.0, "2": 1.0}, "maj_at_k": {"1": 1.0, "2": 1.0},
          "entropy": (0.0 * 3 + 3.0 * 1) / 4, "truncated": 0.0},
}


def test_metrics_of_a_hand_made_samples_file():
    assert ev.compute_metrics(hand_made_samples()) == EXPECTED


def test_rescore_regrades_with_the_current_verifier_and_rewrites_metrics(tmp_path):
    records = hand_made_samples()
    records[2]["correct"] = True  # a stale verdict: "4" is not "3"
    write_jsonl(tmp_path / ev.SAMPLES, records)
    metrics = ev.rescore(tmp_path)
    assert metrics == EXPECTED
    assert json.loads((tmp_path / ev.METRICS).read_text()) == EXPECTED
    assert read_meta(tmp_path / ev.SAMPLES)["rescored"]["verdicts_changed"] == 1
    fixed = load_records(tmp_path / ev.SAMPLES, "samples")
    assert [r["key"] for r in fixed] == [r["key"] for r in records]
    assert fixed[2]["correct"] is False and fixed[2]["prediction"] == "4"
    assert ev.rescore(tmp_path) == EXPECTED
    assert read_meta(tmp_path / ev.SAMPLES)["rescored"]["verdicts_changed"] == 0


def test_rescore_refuses_an_unfinished_run(tmp_path):
    write_jsonl(tmp_path / ev.SAMPLES, hand_made_samples())
    (tmp_path / (ev.SAMPLES + ".partial")).write_text("")
    with pytest.raises(InputError, match="unfinished"):
        ev.rescore(tmp_path)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, testbed_tokenizer):
    torch.manual_seed(0)
    model = build_model(testbed_tokenizer, PretrainConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64))
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    testbed_tokenizer.save_pretrained(path)
    return path


def cli(*argv: str) -> int:
    """``cft eval`` through its real parser (``CONFIGS``), without the provenance stamp of ``cli.main``."""
    from cft.cli import parse

    args, _ = parse(["eval", *argv])
    return ev.run(args)


def test_end_to_end_on_a_tiny_model_then_rescore(tmp_path, tiny_model_dir, capsys):
    questions = tmp_path / "qs.jsonl"
    write_jsonl(questions, [{"id": f"q{i}", "problem": f"What is {i} + 1?", "solution": str(i + 1)} for i in range(3)])
    out = tmp_path / "eval"
    rc = cli("--model", str(tiny_model_dir), "--benchmarks", f"testbed:test,{questions}", "--limit", "4",
             "--n-samples", "3", "--max-new-tokens", "12", "--batch-size", "8", "--question-field", "problem",
             "--answer-field", "solution", "--out", str(out))
    assert rc == 0
    metrics = json.loads((out / ev.METRICS).read_text())
    assert list(metrics) == ["testbed:test", str(questions)]
    assert [m["n"] for m in metrics.values()] == [4, 3]
    for m in metrics.values():
        assert set(m) >= {"accuracy", "n", "pass_at_k", "entropy"}
        assert list(m["pass_at_k"]) == ["1", "2", "3"]
        assert m["entropy"] > 0
    records = load_records(out / ev.SAMPLES, "samples")
    assert len(records) == (4 + 3) * (1 + 3)
    assert [r["kind"] for r in records[:4]] == ["greedy", "sample", "sample", "sample"]
    assert [r["sample"] for r in records[:4]] == [0, 0, 1, 2]
    for r in records:
        assert (r["entropy"] is None) == (r["kind"] == "greedy")
        assert 1 <= len(r["response_ids"]) <= 12 and r["finish"] in ("eos", "answer", "length")
    meta = read_meta(out / ev.SAMPLES)
    assert meta["summary"] == metrics
    assert meta["prompt_templates"]["testbed:test"]["template"] == "chat"
    assert meta["prompt_templates"][str(questions)]["template"] == "qwen25-math-cot"
    assert meta["decoding"]["sample"]["temperature"] == 0.6
    assert "testbed:test" in capsys.readouterr().out  # the table

    before = (out / ev.METRICS).read_text()
    assert cli("--rescore", str(out)) == 0
    assert (out / ev.METRICS).read_text() == before
    assert ev.rescore(out) == metrics
    assert all(r["verify_error"] == "" for r in records)  # a string on every record: one schema for datasets

    # a file written before verify_error existed: rescoring adds the key where new files have it
    lines = (out / ev.SAMPLES).read_text().splitlines()
    older = [{k: v for k, v in json.loads(line).items() if k != "verify_error"} for line in lines]
    (out / ev.SAMPLES).write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in older))
    assert ev.rescore(out) == metrics
    assert (out / ev.SAMPLES).read_text().splitlines() == lines


def test_an_interrupted_run_resumes_to_the_same_samples(tmp_path, tiny_model_dir):
    from cft.models import load_model

    model, tok = load_model(str(tiny_model_dir), device="cpu")
    cfg = ev.EvalConfig(model="tiny", benchmarks=["testbed:test"], out=str(tmp_path / "a"), limit=5, n_samples=2,
                        max_new_tokens=10, batch_size=4)
    full = ev.evaluate(cfg, model, tok)
    lines = (tmp_path / "a" / ev.SAMPLES).read_bytes().splitlines(keepends=True)
    resumed = tmp_path / "b"
    resumed.mkdir()
    # a killed run: some records done (out of order, as responses end), the last line torn mid-write
    (resumed / (ev.SAMPLES + ".partial")).write_bytes(b"".join(lines[7:9] + lines[:3]) + lines[3][:20])
    again = ev.evaluate(ev.EvalConfig(**{**cfg.__dict__, "out": str(resumed)}), model, tok)
    assert_same_results(again, full, (resumed / ev.SAMPLES).read_bytes().splitlines(keepends=True), lines)
    assert not (resumed / (ev.SAMPLES + ".partial")).exists()


def assert_same_results(metrics: dict, reference: dict, lines: list[bytes], reference_lines: list[bytes]) -> None:
    """The same records and metrics. A resumed engine run decodes only the missing responses, so the rows around
    a sampled one differ: the same token ids, but its mean entropy (a float over batched logits) only to about
    1e-7; every other field and metric is exact."""
    def split(lines, metrics):
        records = [json.loads(line) for line in lines]
        return ([{**r, "entropy": None} for r in records], [r["entropy"] for r in records],
                {b: {**m, "entropy": None} for b, m in metrics.items()}, [m["entropy"] for m in metrics.values()])

    got, want = split(lines, metrics), split(reference_lines, reference)
    assert got[0] == want[0] and got[2] == want[2]
    for a, b in zip(got[1] + got[3], want[1] + want[3], strict=True):
        assert (a is None and b is None) or a == pytest.approx(b, rel=1e-6)


def test_a_finished_run_is_reused_not_decoded_again(tmp_path, tiny_model_dir, monkeypatch):
    from cft.models import load_model

    model, tok = load_model(str(tiny_model_dir), device="cpu")
    cfg = ev.EvalConfig(model="tiny", benchmarks=["testbed:test"], out=str(tmp_path), limit=3, n_samples=2,
                        max_new_tokens=8, batch_size=4)
    first = ev.evaluate(cfg, model, tok)
    monkeypatch.setattr(ev, "decode_outputs",
                        lambda model, tok, groups, progress=None, skip=None: groups and pytest.fail("again"))
    assert ev.evaluate(cfg, model, tok) == first


def test_config_errors():
    with pytest.raises(ValueError, match="temperature"):
        ev.EvalConfig(model="m", benchmarks=["testbed:test"], out="x", temperature=0.0)
    assert ev.EvalConfig(model="m", benchmarks=["a", "b", "a"], out="x").benchmarks == ["a", "b"]
    assert ev.EvalConfig(model="m", benchmarks=["gsm8k"], out="x").template_for("gsm8k") == "qwen25-math-cot"
    with pytest.raises(UsageError, match="--model, --benchmarks required"):  # cft.cli prints it, exit 2
        cli("--out", "x")


class Scripted(LlamaForCausalLM):
    """Follows a fixed next-token table keyed by each row's last token, whatever its weights say (greedy
    follows the table): rows keep their script wherever a decoder puts them in its batch."""

    table: dict[int, int] = {}

    def forward(self, *args, input_ids=None, **kwargs):
        out = super().forward(*args, input_ids=input_ids, **kwargs)
        logits = torch.full_like(out.logits, -1e4)
        for row, last in enumerate(input_ids[:, -1].tolist()):
            logits[row, -1, self.table[last]] = 0.0
        out.logits = logits
        return out


@pytest.mark.parametrize("backend", ["hf", "engine"])
def test_answer_stop_adds_no_eos_when_padding_is_the_eos_token(backend):
    """SmolLM2 pads with its EOS: a row stopped at its answer must not gain the padding as an 'EOS'."""
    tok = build_tokenizer()
    tok.pad_token = tok.eos_token
    model = Scripted(build_model(tok, PretrainConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32)).config)
    answer = tok(" so \\boxed{7}", add_special_tokens=False).input_ids
    more = tok(" more", add_special_tokens=False).input_ids
    prompts = [tok(q, add_special_tokens=False).input_ids for q in ("Question: x\nAnswer:", "Question: x?")]
    assert len(set(answer + more)) == len(answer) + 1 and prompts[0][-1] != prompts[1][-1]
    # prompt 0 (ends in ":") -> the answer, then " more"; prompt 1 (ends in "?") and padding -> " more" forever
    model.table = {prompts[0][-1]: answer[0], **dict(zip(answer, answer[1:] + more)), prompts[1][-1]: more[0],
                   more[0]: more[0], tok.pad_token_id: more[0]}
    filler = more * 20
    cfg = DecodeConfig(max_new_tokens=len(answer) + 4, stop_at_answer=True, backend=backend)
    first, second = decode(model.eval(), tok, prompts, cfg)
    assert first[0].ids == answer and first[0].finish == "answer"
    assert second[0].ids == filler[: len(answer) + 4] and second[0].finish == "length"


def test_testbed_eval_prints_maj_at_k_beside_pass_at_k_and_rescore_reproduces_it(tmp_path, capsys, monkeypatch):
    from cft.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "eval"
    assert main(["eval", "--model", "testbed", "--benchmarks", "testbed:test_ood", "--limit", "3", "--n-samples", "8",
                 "--temperature", "1.0", "--max-new-tokens", "64", "--out", str(out)]) == 0
    first = capsys.readouterr().out
    metrics = json.loads((out / ev.METRICS).read_text())["testbed:test_ood"]
    assert list(metrics["maj_at_k"]) == list(metrics["pass_at_k"]) == ["1", "2", "4", "8"]
    header = next(line for line in first.splitlines() if "pass@8" in line)
    assert header.index("pass@8") < header.index("maj@2") < header.index("maj@8") < header.index("entropy")
    # the stored samples alone give the same maj@k by enumeration over all subsets
    records = [r for r in load_records(out / ev.SAMPLES, "samples") if r["kind"] == "sample"]
    by_problem = {}
    for r in sorted(records, key=lambda r: r["sample"]):
        by_problem.setdefault(r["id"], []).append(r)
    for k in (2, 4, 8):
        brute = []
        for rs in by_problem.values():
            clusters = ev.answer_clusters([r["prediction"] for r in rs])
            correct = {c: r["correct"] for c, r in reversed(list(zip(clusters, rs, strict=True))) if c is not None}
            brute.append(brute_majority(clusters, [correct[c] for c in range(len(correct))], k))
        assert metrics["maj_at_k"][str(k)] == pytest.approx(float(sum(brute) / len(brute)), abs=1e-12)
    row = next(line for line in first.splitlines() if "test_ood" in line and "│" in line)
    assert main(["eval", "--rescore", str(out)]) == 0
    again = capsys.readouterr().out
    assert json.loads((out / ev.METRICS).read_text())["testbed:test_ood"] == metrics
    assert row in again.splitlines()  # the same printed row, maj@k included


def paired_z(a: list[list[float]], b: list[list[float]]) -> float:
    """|mean difference| / its standard error, the unit being a problem (the mean of its samples on each side)."""
    diffs = [sum(x) / len(x) - sum(y) / len(y) for x, y in zip(a, b, strict=True)]
    mean = sum(diffs) / len(diffs)
    se = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
    return abs(mean) / se if se else 0.0


def test_engine_samples_agree_with_generate_within_sampling_noise():
    """The backends draw different random numbers, so sampled outputs differ; their metrics must not, beyond noise.

    24 testbed problems x 8 samples at T=1 on each backend; per problem the accuracy of its samples and their mean
    entropy; the paired difference over problems must be under 4 standard errors (t with 23 df: a false alarm has
    probability ~5e-4, and the seeds are fixed, so the verdict is too). The test has power: the engine at T=0.7
    against generate at T=1 is rejected.
    """
    from cft.models import load_model
    from cft.prompts import render_ids
    from cft.testbed.problems import generate_split

    model, tok = load_model("testbed", device="cpu")
    problems = generate_split("test", 24)
    prompts = [render_ids(tok, p.question) for p in problems]

    def metrics(backend: str, temperature: float) -> tuple[list[list[float]], list[list[float]]]:
        cfg = DecodeConfig(max_new_tokens=96, temperature=temperature, n=8, batch_size=64, seed=5, backend=backend)
        outs = decode(model, tok, prompts, cfg)
        acc = [[float(verify.grade(o.text, p.answer)[1]) for o in os] for p, os in zip(problems, outs)]
        return acc, [[o.entropy for o in os] for os in outs]

    hf_acc, hf_ent = metrics("hf", 1.0)
    eng_acc, eng_ent = metrics("engine", 1.0)
    assert paired_z(eng_acc, hf_acc) < 4 and paired_z(eng_ent, hf_ent) < 4
    assert 0 < sum(map(sum, hf_acc)) < 24 * 8  # neither metric is degenerate
    cold_acc, cold_ent = metrics("engine", 0.7)
    assert paired_z(cold_ent, hf_ent) > 4
