"""`cft experiment`: config handling, the statistics against hand-computed values, a tiny grid on the testbed
model end to end, and resuming (a finished run trains and decodes nothing; an interrupted one redoes only
what is missing)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cft import experiment
from cft.experiment import (
    ExperimentConfig,
    ExperimentError,
    aggregate,
    build_config,
    cell_dir,
    load_config,
    paired,
    run_experiment,
    summarize,
    t_quantile,
)

TINY = {
    "model": "testbed",
    "train_data": {"spec": "testbed:train", "limit": 16},
    "benchmarks": ["testbed:test", "testbed:test_ood"],
    "methods": ["sft", "cft", "attn"],
    "seeds": [0, 1],
    "train": {"max_steps": 2, "lr": 3e-4, "batch_size": 4},
    "eval": {"limit": 4, "n_samples": 2, "temperature": 1.0, "max_new_tokens": 96, "batch_size": 16},
    "grpo": {"from": ["sft", "cft"], "seeds": [0], "max_steps": 2, "prompts_per_step": 2, "num_generations": 2,
             "max_completion_length": 16, "limit": 8},
}
STAGES = [("cft.train", "train"), ("cft.evaluate", "evaluate"), ("cft.generate", "generate"),
          ("cft.identify", "identify"), ("cft.grpo", "grpo")]


# ---------------------------------------------------------------- statistics


def test_summarize_matches_hand_computed_t_interval():
    s = summarize([0.5, 0.6, 0.7])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)
    half = 4.303 * 0.1 / math.sqrt(3)  # t(0.975, df=2) = 4.303
    assert s["half_width"] == pytest.approx(half)
    assert s["ci95"] == pytest.approx([0.6 - half, 0.6 + half])
    one = summarize([0.4])
    assert one["mean"] == 0.4 and one["std"] is None and one["ci95"] is None
    assert summarize([])["mean"] is None


def test_t_quantiles():
    assert t_quantile(1) == 12.706 and t_quantile(4) == 2.776 and t_quantile(30) == 2.042
    assert t_quantile(35) == 2.042  # between tabulated df: the smaller df (a slightly wider interval)
    assert t_quantile(10_000) == 1.960
    with pytest.raises(ValueError):
        t_quantile(0)


def test_t_table_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in experiment.T975:
        assert t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4)


def test_paired_difference_uses_common_seeds_only():
    cft = {0: 0.60, 1: 0.62, 2: 0.74}
    sft = {0: 0.50, 1: 0.50, 2: 0.60, 3: 0.90}  # seed 3 has no CFT cell: left out
    d = paired(cft, sft)
    assert d["seeds"] == [0, 1, 2]
    assert d["values"] == pytest.approx([0.10, 0.12, 0.14])
    assert d["mean"] == pytest.approx(0.12) and d["std"] == pytest.approx(0.02)
    half = 4.303 * 0.02 / math.sqrt(3)
    assert d["ci95"] == pytest.approx([0.12 - half, 0.12 + half])
    assert d["excludes_zero"] is True
    noisy = paired({0: 0.6, 1: 0.4}, {0: 0.5, 1: 0.5})
    assert noisy["mean"] == pytest.approx(0.0) and noisy["excludes_zero"] is False


def _cell(method: str, seed: int, acc: float, entropy: float = 0.1) -> dict:
    return {"model": "m", "method": method, "seed": seed, "status": "finished",
            "metrics": {"b": {"accuracy": acc, "entropy": entropy, "pass_at_k": {"1": acc / 2, "2": acc}}}}


def test_aggregate_by_method_with_paired_differences():
    cells = [_cell("sft", 0, 0.5), _cell("sft", 1, 0.7), _cell("cft", 0, 0.6), _cell("cft", 1, 0.9),
             _cell("grpo:sft", 0, 0.55), _cell("grpo:cft", 0, 0.65), _cell("base", 0, 0.3)]
    rows = aggregate(cells, "sft")["m"]["b"]
    assert rows["sft"]["metrics"]["accuracy"]["mean"] == pytest.approx(0.6)
    assert rows["sft"]["paired"] == {} and rows["sft"]["compared_with"] is None
    d = rows["cft"]["paired"]["accuracy"]
    assert d["values"] == pytest.approx([0.1, 0.2]) and d["mean"] == pytest.approx(0.15)
    assert d["half_width"] == pytest.approx(12.706 * statistics_stdev([0.1, 0.2]) / math.sqrt(2))
    assert set(rows["cft"]["metrics"]) == {"accuracy", "entropy", "pass@1", "pass@2"}
    assert rows["grpo:cft"]["compared_with"] == "grpo:sft"  # GRPO rows against GRPO from the baseline
    assert rows["grpo:cft"]["paired"]["accuracy"]["mean"] == pytest.approx(0.10)
    assert rows["base"]["compared_with"] == "sft" and rows["base"]["paired"]["accuracy"]["seeds"] == [0]


def statistics_stdev(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# ---------------------------------------------------------------- config


def test_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("out: a\nmodel: testbed\nmethods: [sft, cft]\ntrain: {lr: 1e-4, epochs: 2}\ngrpo: {from: [cft]}\n")
    cfg = load_config(path, ["seeds=[3, 4]", "train.lr=2e-4", "eval.limit=7", "out=b"])
    assert cfg.models == ["testbed"] and cfg.seeds == [3, 4] and cfg.out == "b"
    assert cfg.train == {"lr": 2e-4, "epochs": 2} and cfg.eval.limit == 7 and cfg.grpo.from_methods == ["cft"]
    assert experiment.config_dict(cfg)["grpo"]["from"] == ["cft"]


@pytest.mark.parametrize("raw, message", [
    ({"out": "a", "methods": ["sft", "magic"]}, "unknown method"),
    ({"out": "a", "colour": 1}, "unknown config key"),
    ({"methods": ["sft"]}, "needs an output folder"),
    ({"out": "a", "train": {"seed": 3}}, "unknown or fixed"),
    ({"out": "a", "eval": {"limt": 3}}, "unknown or fixed"),
    ({"out": "a", "methods": ["cft"], "grpo": {"from": ["sft"]}}, "not in methods"),
    ({"out": "a", "methods": ["sft", "rho1"], "rho1_reference": "cft"}, "not in methods"),
])
def test_config_errors_name_the_problem(raw, message):
    with pytest.raises(ExperimentError, match=message):
        build_config(raw)


def test_plan_trains_the_rho1_reference_first_and_grpo_after_its_start():
    cfg = build_config({"out": "a", "methods": ["rho1", "cft", "sft"], "seeds": [0, 1],
                        "grpo": {"from": ["cft"], "seeds": [1]}})
    plan = [(m, s) for _, m, s in experiment.Runner(cfg).plan()]
    assert plan == [("base", 0), ("sft", 0), ("rho1", 0), ("cft", 0), ("sft", 1), ("rho1", 1), ("cft", 1),
                    ("grpo:cft", 1)]


# ---------------------------------------------------------------- a tiny grid, end to end


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _forbid_work(monkeypatch) -> dict[str, int]:
    """Replace every stage entry point by a counter, so a test sees exactly what a run did."""
    import importlib

    calls = {name: 0 for _, name in STAGES}
    for module, name in STAGES:
        mod = importlib.import_module(module)
        original = getattr(mod, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(mod, name, counted)
    return calls


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment") / "run"
    cfg = build_config({**TINY, "out": str(out)})
    result, counts = run_experiment(cfg, log=lambda msg: None)
    return cfg, result, counts


def test_tiny_grid_outputs(tiny_run):
    cfg, result, counts = tiny_run
    out = Path(cfg.out)
    assert counts == {"trained": 6, "grpo": 2, "evaluated": 9, "skipped": 0}
    assert (out / "experiment.yaml").exists() and (out / "aggregate.json").exists()
    assert json.loads((out / "aggregate.json").read_text())["results"] == result["results"]
    rows = result["results"]["testbed"]["testbed:test"]
    assert set(rows) == {"base", "sft", "cft", "attn", "grpo:sft", "grpo:cft"}
    for method in ("sft", "cft", "attn"):
        assert rows[method]["seeds"] == [0, 1]
        acc = rows[method]["metrics"]["accuracy"]
        assert acc["n"] == 2 and acc["ci95"] is not None and 0 <= acc["mean"] <= 1
        assert set(rows[method]["metrics"]) >= {"accuracy", "entropy", "pass@1", "pass@2", "maj@1", "maj@2"}
        maj = rows[method]["metrics"]["maj@2"]
        assert maj["n"] == 2 and maj["ci95"] is not None and 0 <= maj["mean"] <= 1
        assert rows[method]["metrics"]["maj@1"]["values"] == rows[method]["metrics"]["pass@1"]["values"]
    assert rows["cft"]["paired"]["accuracy"]["seeds"] == [0, 1] and rows["attn"]["paired"]["maj@2"]["seeds"] == [0, 1]
    assert rows["grpo:cft"]["compared_with"] == "grpo:sft"
    shared = result["shared"]["testbed"]
    assert 0 < shared["critical_fraction"] < 1 and set(shared["critical_by_kind"]) <= {"digit", "operator", "other"}
    cell = json.loads((cell_dir(cfg, "testbed", "cft", 1) / "cell.json").read_text())
    assert cell["status"] == "finished" and cell["train"]["global_step"] == 2 and cell["train"]["loss_curve"]
    assert cell["train"]["tokens"]["method"] == "cft"
    attn = json.loads((cell_dir(cfg, "testbed", "attn", 0) / "cell.json").read_text())["train"]["tokens"]
    assert attn["method"] == "attn" and attn["trained_tokens"] == attn["critical_tokens"]  # CFT's budget
    grpo = json.loads((cell_dir(cfg, "testbed", "grpo:sft", 0) / "cell.json").read_text())
    assert [r["step"] for r in grpo["grpo"]["log"]] == [1, 2]


def test_seeds_change_training_and_sampling(tiny_run):
    cfg, _, _ = tiny_run
    cells = [json.loads((cell_dir(cfg, "testbed", "sft", s) / "cell.json").read_text()) for s in (0, 1)]
    assert cells[0]["train"]["loss_curve"] != cells[1]["train"]["loss_curve"]  # data order
    samples = []
    for s in (0, 1):
        path = cell_dir(cfg, "testbed", "sft", s) / "eval" / "testbed-test" / "all" / "samples.jsonl"
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        samples.append([r["response_ids"] for r in sorted(recs, key=lambda r: (r["id"], r["sample"]))
                        if r["kind"] == "sample"])
    assert samples[0] != samples[1]


def test_eval_problems_are_the_same_for_every_seed(tiny_run):
    cfg, _, _ = tiny_run
    ids = []
    for s in (0, 1):
        path = cell_dir(cfg, "testbed", "cft", s) / "eval" / "testbed-test_ood" / "all" / "samples.jsonl"
        ids.append({json.loads(line)["id"] for line in path.read_text().splitlines()})
    assert ids[0] == ids[1] and len(ids[0]) == 4


def test_rerun_of_a_finished_grid_does_nothing(tiny_run, monkeypatch):
    cfg, result, _ = tiny_run
    before = _snapshot(Path(cfg.out))
    calls = _forbid_work(monkeypatch)
    again, counts = run_experiment(cfg, log=lambda msg: None)
    assert calls == {name: 0 for _, name in STAGES}
    assert counts == {"trained": 0, "grpo": 0, "evaluated": 0, "skipped": 9}
    assert again["results"] == result["results"]
    assert _snapshot(Path(cfg.out)) == before  # not a single file rewritten


def test_interrupted_evaluation_resumes_without_training(tiny_run, monkeypatch):
    cfg, result, _ = tiny_run
    folder = cell_dir(cfg, "testbed", "cft", 0)
    cell = json.loads((folder / "cell.json").read_text())
    (folder / "cell.json").write_text(json.dumps({**cell, "status": "trained"}))  # as if killed during eval
    calls = _forbid_work(monkeypatch)
    again, counts = run_experiment(cfg, log=lambda msg: None)
    assert calls["train"] == 0 and calls["generate"] == 0 and calls["identify"] == 0
    assert counts["evaluated"] == 1 and counts["skipped"] == 8
    assert again["results"] == result["results"]  # the evaluation reused its samples


def test_changed_training_config_is_refused(tiny_run):
    cfg, _, _ = tiny_run
    changed = build_config({**TINY, "out": cfg.out, "train": {**TINY["train"], "lr": 1e-3}})
    with pytest.raises(ExperimentError, match="another config"):
        run_experiment(changed, log=lambda msg: None)


def test_cli_dry_run_lists_cells(tiny_run, tmp_path, capsys):
    from cft.cli import main

    cfg, _, _ = tiny_run
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps({**TINY, "out": cfg.out}))  # JSON is YAML
    assert main(["experiment", str(path), "seeds=[0,1,2]", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "done  testbed  cft  seed 1" in lines and "todo  testbed  cft  seed 2" in lines
    assert main(["experiment", str(path), "methods=[sft,nope]"]) == 2
    aggregate_path = Path(cfg.out) / "aggregate.json"
    before = json.loads(aggregate_path.read_text())
    aggregate_path.unlink()
    assert main(["experiment", "--aggregate-only", str(path), "seeds=[0,1,2]"]) == 0  # seed 2: not run, missing
    after = json.loads(aggregate_path.read_text())
    assert after["results"] == before["results"] and after["finished_cells"] == 9
    assert ["testbed", "cft", 2] in after["missing_cells"] and after["planned_cells"] == 12
    assert "cells finished" in capsys.readouterr().out


def test_default_config_is_valid():
    assert isinstance(build_config({"out": "x"}), ExperimentConfig)
    for path in sorted(Path(__file__).resolve().parent.parent.glob("configs/experiment/*.yaml")):
        load_config(path)
