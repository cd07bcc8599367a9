"""``cft identify --predict``: the band, the quality measures, the probe, the features, and end-to-end runs
(labels format, exact positions equal the exact run's, resume, shards, crosscheck) on the testbed model."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from cft import predict as P
from cft.artifacts import InputError, load_records, read_meta
from cft.cli import main
from cft.decoding.api import DecodeConfig
from cft.generate import GenerateConfig, generate
from cft.identify import IdentifyConfig, identify, merge_shards, token_kind, without_margins
from cft.models import load_model
from cft.selection import read_labels
from cft.view import render_view, response_view

# ---------------------------------------------------------------- quality measures and the band


def test_auc_by_hand():
    assert P.auc([(0.1, 0, 1), (0.9, 1, 1)]) == 1.0
    assert P.auc([(0.9, 0, 1), (0.1, 1, 1)]) == 0.0
    assert P.auc([(0.5, 0, 1), (0.5, 1, 1)]) == 0.5  # a tie counts half
    # positives at 0.2, 0.8; negatives at 0.1, 0.5: 3 of 4 pairs ordered right
    assert P.auc([(0.2, 1, 1), (0.8, 1, 1), (0.1, 0, 1), (0.5, 0, 1)]) == 0.75
    assert P.auc([(0.2, 1, 1)]) is None


def test_confusion_decodes_the_band_and_predicts_outside_it():
    pairs = [(0.05, 0, 1.0), (0.05, 1, 2.0), (0.5, 1, 4.0), (0.5, 0, 8.0), (0.95, 1, 16.0), (0.95, 0, 32.0)]
    c = P.confusion(pairs, (0.1, 0.9))
    # below: one false negative; inside: exact (one tp, cost 12); above: one tp, one fp
    assert (c["tp"], c["fp"], c["fn"], c["decoded_positions"], c["cost"], c["exact_cost"]) == (2, 1, 1, 2, 12, 63)
    s = P.scores(c)
    assert (s["precision"], s["recall"], s["cost_fraction"]) == (2 / 3, 2 / 3, 12 / 63)
    assert P.scores(P.confusion(pairs, (0.0, 1.1)))["precision"] == 1.0  # everything decoded: exact


def _brute_force(pairs, recall, precision):
    probs = sorted({p for p, _, _ in pairs})
    cuts = [0.0] + [(a + b) / 2 for a, b in itertools.pairwise(probs)] + [1.1]
    best = None
    for lo, hi in itertools.combinations_with_replacement(cuts, 2):
        s = P.scores(P.confusion(pairs, (lo, hi)))
        if s["recall"] >= recall and s["precision"] >= precision:
            cost = P.confusion(pairs, (lo, hi))["cost"]
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_choose_band_reaches_the_targets_at_the_least_cost(seed):
    rng = random.Random(seed)
    pairs = []
    for _ in range(rng.randint(5, 30)):
        y = rng.random() < 0.4
        p = round(min(max(rng.gauss(0.65 if y else 0.35, 0.25), 0), 1), 2)  # rounding makes ties
        pairs.append((p, int(y), float(rng.randint(1, 20))))
    recall, precision = rng.choice([0.8, 0.9, 1.0]), rng.choice([0.8, 0.9, 1.0])
    band = P.choose_band(pairs, recall, precision)
    s = P.scores(P.confusion(pairs, band))
    assert s["recall"] >= recall and s["precision"] >= precision
    assert P.confusion(pairs, band)["cost"] == _brute_force(pairs, recall, precision)


def test_roles_are_a_seeded_sample_of_every_key():
    keys = [f"k{i}" for i in range(100)]
    r = P.roles(keys, 0.2, 0.4, seed=3)
    assert sum(v == "train" for v in r.values()) == 12 and sum(v == "heldout" for v in r.values()) == 8
    assert r == P.roles(keys, 0.2, 0.4, seed=3)
    assert r != P.roles(keys, 0.2, 0.4, seed=4)
    few = P.roles(keys[:3], 0.2, 0.4, seed=0)  # fewer than 4 responses: all exact
    assert "predicted" not in few.values()


# ---------------------------------------------------------------- the probe


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_probe_learns_a_separable_rule_and_is_seeded(kind):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=gen)
    y = (x[:, 0] - 0.5 * x[:, 3] > 0.3).float()
    probe = P.Probe(kind, seed=1).fit(x[:300], y[:300])
    probs = probe.predict(x[300:])
    assert P.auc(list(zip(probs, y[300:].int().tolist(), [1.0] * 100))) > 0.97
    assert probs == P.Probe(kind, seed=1).fit(x[:300], y[:300]).predict(x[300:])


def test_probe_refuses_one_class():
    with pytest.raises(InputError, match="one class"):
        P.Probe("logistic", 0).fit(torch.randn(10, 3), torch.zeros(10))


# ---------------------------------------------------------------- features and end to end on the testbed


@pytest.fixture(scope="module")
def testbed():
    return load_model("testbed")


@pytest.fixture(scope="module")
def gen(testbed, tmp_path_factory):
    """Testbed generations: 48 problems of an unused seed, short responses."""
    model, tok = testbed
    out = tmp_path_factory.mktemp("predict") / "gen.jsonl"
    generate(GenerateConfig(model="testbed", data="testbed:train", out=str(out), seed=31, limit=48,
                            decode=DecodeConfig(max_new_tokens=96)), model=model, tok=tok)
    return out


def test_features_one_row_per_position_with_the_logit_facts(testbed):
    model, tok = testbed
    prompt, response = [1, 5, 9, 12], [20, 21, 22]
    x = P.features(model, prompt, response, lambda y: token_kind(tok.decode([y])), None, 3)
    hidden = model.config.hidden_size
    assert x.shape == (3, 4 * hidden + 3 * hidden + 16 + 9 + 2)
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0, 3:6].float()
    top1 = torch.softmax(logits, -1).max(-1).values
    assert torch.allclose(x[:, 7 * hidden], top1, atol=1e-5)  # the first logit feature: top-1 probability
    assert torch.equal(x[:, -2], torch.tensor([0, 1 / 3, 2 / 3]))  # relative position
    with pytest.raises(InputError, match="layer 99"):
        P.features(model, prompt, response, lambda y: "other", (99,), 3)


def _run(gen, out, testbed, **kw):
    model, tok = testbed
    cfg = IdentifyConfig(model="testbed", input=str(gen), out=str(out), **kw)
    return identify(cfg, model=model, tok=tok)


PREDICT = {"predict": True, "predict_fraction": 0.5, "predict_heldout": 0.4}


@pytest.fixture(scope="module")
def runs(gen, testbed, tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    exact_s = _run(gen, d / "exact.jsonl", testbed)
    pred_s = _run(gen, d / "pred.jsonl", testbed, **PREDICT)
    return d, exact_s, pred_s


def test_predict_labels_exact_positions_like_the_exact_run(runs):
    d, exact_s, pred_s = runs
    exact, pred = load_records(d / "exact.jsonl", "labels"), load_records(d / "pred.jsonl", "labels")
    assert [r["id"] for r in exact] == [r["id"] for r in pred]
    assert all(r["predict_role"] == "" and set(r["label_source"]) == {"exact"} and set(r["probe_prob"]) == {None}
               for r in exact)
    roles = [r["predict_role"] for r in pred]
    assert {"train", "heldout", "predicted"} <= set(roles)
    decoded = predicted = 0
    for e, p in zip(exact, pred):
        assert p["eligible"] == e["eligible"]
        for t, src in enumerate(p["label_source"]):
            if src == "exact":
                assert p["critical"][t] == e["critical"][t]  # a decoded label is the exact label
                decoded += p["predict_role"] == "predicted" and bool(e["eligible"][t])
            else:
                assert p["predict_role"] == "predicted" and p["branches"][t] == []
                lo, hi = pred_s["predict"]["band"]
                assert not lo <= p["probe_prob"][t] < hi and p["critical"][t] == int(p["probe_prob"][t] >= hi)
                predicted += 1
            assert (p["probe_prob"][t] is None) == (not e["eligible"][t])
    assert predicted > 0
    s = pred_s["predict"]
    assert s["predicted_positions"] == predicted and s["decoded_positions_of_predicted"] == decoded
    assert pred_s["decoded_tokens"] < exact_s["decoded_tokens"]
    assert 0 <= s["probe"]["auc"] <= 1 and s["heldout_positions"] > 0
    assert read_meta(d / "pred.jsonl")["summary"]["predict"] == s
    assert read_meta(d / "pred.jsonl")["label_params"]["predict_fraction"] == 0.5


def test_predict_labels_are_read_by_training_and_the_viewer(runs, testbed, tmp_path):
    d, _, _ = runs
    records = load_records(d / "pred.jsonl", "labels")
    labels = read_labels(str(d / "pred.jsonl"))
    assert [r.critical for r in labels] == [r["critical"] for r in records]
    page = render_view(d / "pred.jsonl", tmp_path / "view.html", tokenizer=testbed[1])
    assert str(records[0]["id"]) in page.read_text()
    rec = next(r for r in records if "predicted" in r["label_source"])
    shown = response_view(rec, testbed[1], 0)["pp"]  # the page marks predicted positions with their probability
    assert shown == {str(t): p for t, (s, p) in enumerate(zip(rec["label_source"], rec["probe_prob"]))
                     if s == "predicted"} and shown


def test_resumed_predict_run_gives_the_same_labels(runs, gen, testbed, tmp_path):
    d, _, pred_s = runs
    want = load_records(d / "pred.jsonl", "labels")
    out = tmp_path / "resumed.jsonl"
    # a run killed after the exact subset and two predicted responses: its partial file holds them as written
    # then (subset records without the probe's probabilities, which the rerun fills in)
    kept = [dict(r, probe_prob=[None] * len(r["probe_prob"])) if r["predict_role"] != "predicted" else r
            for r in want]
    kept = [r for r in kept if r["predict_role"] != "predicted"] + [r for r in kept
                                                                   if r["predict_role"] == "predicted"][:2]
    (tmp_path / "resumed.jsonl.partial").write_text("".join(json.dumps(r) + "\n" for r in kept))
    s = _run(gen, out, testbed, **PREDICT)
    got = load_records(out, "labels")
    assert [without_margins(r) for r in got] == [without_margins(r) for r in want]
    assert s["decoded_tokens"] < pred_s["decoded_tokens"]
    assert s["predict"]["band"] == pred_s["predict"]["band"]


def test_predict_shards_merge(runs, gen, testbed, tmp_path):
    d, _, _ = runs
    out = tmp_path / "sharded.jsonl"
    for i in range(2):
        _run(gen, out, testbed, num_shards=2, shard_index=i, **PREDICT)
    merge_shards(str(out), 2)
    merged, single = load_records(out, "labels"), load_records(d / "pred.jsonl", "labels")
    exact = {r["id"]: r for r in load_records(d / "exact.jsonl", "labels")}
    assert [r["predict_role"] for r in merged] == [r["predict_role"] for r in single]  # roles: one sample of all
    for r in merged:
        decoded = [t for t, s in enumerate(r["label_source"]) if s == "exact"]
        assert [r["critical"][t] for t in decoded] == [exact[r["id"]]["critical"][t] for t in decoded]
    s = read_meta(out)["summary"]["predict"]
    assert len(s["bands_by_shard"]) == 2 and s["band"] is None
    assert sum(s["responses"].values()) == len(merged)


def test_predict_with_crosscheck_and_cli_prints_quality(gen, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    code = main(["identify", "--model", "testbed", "--input", str(gen), "--out", str(out), "--predict",
                 "--predict-fraction", "0.5", "--predict-band", "0.2", "0.8", "--crosscheck", "3"])
    assert code == 0
    text = capsys.readouterr().out
    assert "held-out quality (exact labels): probe at 0.5 precision" in text and "AUC" in text
    assert "band [0.200, 0.800) (given" in text
    s = read_meta(out)["summary"]
    assert s["crosschecked"] >= 3 and s["disagreements"] == s["disagreements_near_tie"]
    assert s["predict"]["band"] == [0.2, 0.8]


def test_bad_predict_options_are_one_line_errors(gen, tmp_path, capsys):
    code = main(["identify", "--model", "testbed", "--input", str(gen), "--out", str(tmp_path / "x.jsonl"),
                 "--predict", "--predict-fraction", "1.5"])
    assert code == 2
    assert "--predict-fraction" in capsys.readouterr().err


def _benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "predict_quality.py"
    spec = importlib.util.spec_from_file_location("predict_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_agreement_by_hand():
    bench = _benchmark()
    exact = [{"id": "a", "response_ids": [1, 2, 3, 4], "critical": [1, 1, 0, 0]}]
    other = [{"id": "a", "response_ids": [1, 2, 3, 4], "critical": [1, 0, 1, 0]}]
    assert bench.agreement(exact, other) == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    with pytest.raises(SystemExit, match="same generations"):
        bench.agreement(exact, [dict(other[0], response_ids=[1, 2, 3, 5])])


def test_benchmark_curve_costs_what_the_run_decoded(runs):
    """At the run's own target the curve picks the run's band, and its cost (read from the exact run's
    branches) is the run's decoded tokens: the band's branches are the exact run's branches."""
    d, exact_s, pred_s = runs
    bench = _benchmark()
    exact, pred = load_records(d / "exact.jsonl", "labels"), load_records(d / "pred.jsonl", "labels")
    target = pred_s["predict"]["target"]["recall"]
    rows = bench.curve(exact, pred, (0.5, target, 1.0, bench.parse_target(f"{target}:{target}")))
    assert {**rows[3], "target": target} == rows[1]  # "R:P" with R = P is the single target
    assert list(rows[1]["band"]) == pred_s["predict"]["band"]
    assert rows[1]["fraction"] == pytest.approx(pred_s["decoded_tokens"] / exact_s["decoded_tokens"], rel=0.01)
    assert rows[0]["fraction"] <= rows[1]["fraction"] <= rows[2]["fraction"]
    q = bench.agreement(exact, pred)
    assert (rows[1]["precision"], rows[1]["recall"]) == (pytest.approx(q["precision"]), pytest.approx(q["recall"]))
    assert rows[2]["recall"] >= rows[0]["recall"] and rows[2]["precision"] >= rows[0]["precision"]


def test_dry_run_with_predict_says_what_its_estimate_covers(gen, tmp_path, capsys):
    """``--dry-run`` estimates exact labelling; with ``--predict`` it says so and names the subset it decodes
    exactly, instead of printing an exact run's cost as the predicted run's."""
    argv = ["identify", "--model", "testbed", "--input", str(gen), "--out", str(tmp_path / "L.jsonl"), "--dry-run"]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--predict", "--predict-fraction", "0.25"]) == 0
    out = capsys.readouterr().out
    assert "with --predict" not in plain and "with --predict" in out and "25% of the responses" in out
    assert not (tmp_path / "L.jsonl").exists()


def test_ceiling_replay_reproduces_the_predict_run(runs, testbed):
    """benchmarks/predict_ceiling.py replays ``--predict`` on exact labels alone: at the run's own fraction,
    held-out share, seed and target it picks the run's band, costs what the run decoded and labels as it did."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "predict_ceiling.py"
    spec = importlib.util.spec_from_file_location("predict_ceiling", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    d, exact_s, pred_s = runs
    model, tok = testbed
    exact = load_records(d / "exact.jsonl", "labels")
    rows = bench.table(model, tok, exact, None, read_meta(d / "exact.jsonl")["label_params"]["k"])
    s = pred_s["predict"]
    assert s["target"]["recall"] == s["target"]["precision"]
    r = bench.replay(rows, PREDICT["predict_fraction"], PREDICT["predict_heldout"], s["target"]["recall"],
                     s["probe_kind"], s["seed"])
    assert r["responses"] == (s["responses"]["train"], s["responses"]["heldout"], s["responses"]["predicted"])
    assert list(r["band"]) == pytest.approx(s["band"])
    assert r["cost_fraction"] == pytest.approx(pred_s["decoded_tokens"] / exact_s["decoded_tokens"], rel=0.01)
    q = _benchmark().agreement(exact, load_records(d / "pred.jsonl", "labels"))
    assert (r["precision"], r["recall"]) == (pytest.approx(q["precision"]), pytest.approx(q["recall"]))
    assert r["heldout_auc"] == pytest.approx(s["probe"]["auc"])
    curve = bench.learning_curve(rows, [4, 8, 1000], 0.3, "logistic", 0)
    assert [n for n, _ in curve] == [4, 8] and all(0 <= a <= 1 for _, a in curve)  # sizes beyond the pool drop
