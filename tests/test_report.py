"""`cft report`: report.md and a self-contained report.html with every plot, from experiment folders built
by hand (no model is run): a grid over seeds, and a one-seed run as `cft demo` leaves it."""

from __future__ import annotations

import json
import re

import pytest

from cft.experiment import Runner
from cft.experiment_config import build_config, load_config
from cft.report import grpo_series, load_run, report
from cft.stats import paired_bootstrap, summarize

KINDS = {"digit": {"critical": 5, "tokens": 10, "fraction": 0.5},
         "other": {"critical": 1, "tokens": 20, "fraction": 0.05}}


def _cell(method: str, seed: int, acc: float, ood: float) -> dict:
    def bench(a: float) -> dict:
        return {"accuracy": a, "n": 10, "entropy": 0.1 + a / 10,
                "pass_at_k": {"1": a / 2, "2": a, "4": min(1, 1.5 * a)}, "maj_at_k": {"1": a / 2, "2": a / 2, "4": a}}

    cell = {"model": "testbed", "method": method, "seed": seed, "status": "finished", "seconds": {"eval": 1.0},
            "metrics": {"testbed:test": bench(acc), "testbed:test_ood": bench(ood)}}
    if method.startswith("grpo:"):
        cell["grpo"] = {"global_step": 3, "log": [{"step": s, "reward": acc * s / 3, "entropy": 0.2 - s / 100}
                                                  for s in (1, 2, 3)]}
    elif method != "base":
        cell["train"] = {"global_step": 3, "loss_curve": [[1, 1.0 + seed], [2, 0.5], [3, 0.25]],
                         "tokens": {"method": method}}
    return cell


@pytest.fixture
def experiment_dir(tmp_path):
    """An experiment folder as `cft experiment` leaves it, from hand-made cells."""
    cfg = build_config({"out": str(tmp_path / "run"), "methods": ["sft", "cft"], "seeds": [0, 1, 2],
                        "grpo_from": ["sft", "cft"], "grpo_seeds": [0], "train_args": {"lr": 3e-4}})
    cells = [_cell("base", 0, 0.3, 0.05)]
    for seed, (s, c) in enumerate([(0.50, 0.55), (0.52, 0.60), (0.48, 0.50)]):
        cells += [_cell("sft", seed, s, s / 5), _cell("cft", seed, c, c / 4)]
    cells += [_cell("grpo:sft", 0, 0.6, 0.1), _cell("grpo:cft", 0, 0.7, 0.2), _cell("cft", 3, 0.1, 0.1)]
    cells[-1]["status"] = "training"  # an unfinished cell: listed, not counted
    shared = {"testbed": {"generate": {"correct": 40, "n": 100},
                          "identify": {"critical_fraction": 0.2, "critical_by_kind": KINDS}, "seconds": {}}}
    (tmp_path / "run").mkdir()
    Runner(cfg).write_aggregate(cells, shared)
    return tmp_path / "run"


def _assert_self_contained(page: str, n_images: int) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', page)) == n_images
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched: no links, scripts or files
    assert "<script" not in page and "<link" not in page and "@import" not in page


def test_experiment_report(experiment_dir):
    md, page = report(experiment_dir)
    plots = sorted(p.name for p in (experiment_dir / "report").glob("*.png"))
    assert plots == ["accuracy.png", "accuracy_diff.png", "critical_by_kind.png", "entropy.png", "grpo.png",
                     "maj_at_k.png", "pass_at_k.png", "train_loss.png"]
    text = md.read_text()
    for png in plots:
        assert f"(report/{png})" in text
    assert "## Results on testbed:test_ood" in text and "Δ accuracy vs sft" in text
    # cft: 55, 60, 50 -> sd 5, half-width 4.303 * 5 / sqrt(3) = 12.4; cft - sft: +5, +8, +2 -> sd 3, half-width 7.45
    assert "| cft | 3 | 55.0 ± 12.4 | +5.0 [-2.5, +12.5] |" in text
    # columns pass@1, pass@4, maj@4 (= accuracy in these cells), Δ pass@4, Δ maj@4 (= Δ accuracy)
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    assert header.index("pass@4 (%)") < header.index("maj@4 (%)") < header.index("Δ pass@4") < header.index("Δ maj@4")
    assert ("| cft | 3 | 55.0 ± 12.4 | +5.0 [-2.5, +12.5] | 27.5 ± 6.2 | 82.5 ± 18.6 | 55.0 ± 12.4 "
            "| +7.5 [-3.7, +18.7] | +5.0 [-2.5, +12.5] |") in text
    assert "| grpo:cft | 1 | 70.0 | +10.0 |" in text
    assert "GRPO from sft, cft, seeds [0]" in text  # grpo_seeds, not the grid's seeds
    assert "Not finished" not in text  # the unfinished cell (seed 3) is outside the grid
    for optional in ("Hyperparameter tuning", "Learning curves", "Paired bootstrap", "Ablations"):
        assert optional not in text  # an aggregate without those keys shows none of their sections
    _assert_self_contained(page.read_text(), len(plots))


def test_unfinished_cells_are_named(experiment_dir):
    agg = json.loads((experiment_dir / "aggregate.json").read_text())
    assert agg["missing_cells"] == [] and agg["finished_cells"] == agg["planned_cells"] == 9
    agg["missing_cells"] = [["testbed", "cft", 2]]
    (experiment_dir / "aggregate.json").write_text(json.dumps(agg))
    assert load_run(experiment_dir).missing == ["cft seed 2"]
    md, _ = report(experiment_dir)
    assert "Not finished (not in the statistics): cft seed 2." in md.read_text()


def test_setup_names_the_sampled_benchmarks(experiment_dir):
    agg = json.loads((experiment_dir / "aggregate.json").read_text())
    agg["config"].update(sample_limit=5, sample_benchmarks=["testbed:test"])
    (experiment_dir / "aggregate.json").write_text(json.dumps(agg))
    md, _ = report(experiment_dir)
    assert "pass@k, maj@k and entropy on the first 5 problems of testbed:test\n" in md.read_text()


def test_demo_folder_report(tmp_path):
    """`cft demo` is the experiment runner on one seed: the report has no intervals, single-seed differences."""
    from cft.demo import PRESET

    cfg = load_config(PRESET, [f"out={tmp_path / 'demo'}"])
    cells = [_cell(name, 0, a, a / 4) for name, a in (("base", 0.4), ("sft", 0.5), ("cft", 0.55))]
    shared = {"testbed": {"generate": {"correct": 40, "n": 300},
                          "identify": {"critical_fraction": 0.2, "critical_by_kind": KINDS}, "seconds": {}}}
    (tmp_path / "demo").mkdir()
    Runner(cfg).write_aggregate(cells, shared)
    md, page = report(tmp_path / "demo")
    text = md.read_text()
    assert "| cft | 1 | 55.0 | +5.0 |" in text and " ± " not in text.split("## Results")[1]  # one seed: no intervals
    assert "train_args: num_train_epochs=3.0, learning_rate=0.0003, per_device_train_batch_size=16" in text
    assert "D_correct = 40 of 300" in text
    plots = list((tmp_path / "demo" / "report").glob("*.png"))
    assert {p.name for p in plots} == {"accuracy.png", "pass_at_k.png", "maj_at_k.png", "entropy.png",
                                       "critical_by_kind.png", "train_loss.png"}
    _assert_self_contained(page.read_text(), len(plots))


def test_cli_report_errors_on_a_folder_without_results(tmp_path, capsys):
    from cft.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert "holds no aggregate.json" in capsys.readouterr().err


def _boot(delta: float) -> dict:
    """A real paired bootstrap of two methods on 2 seeds x 20 problems, the first ahead by about ``delta``."""
    a = {s: {p: float(p < 10 + delta * 20) for p in range(20)} for s in (0, 1)}
    b = {s: {p: float(p < 10) for p in range(20)} for s in (0, 1)}
    return paired_bootstrap(a, b, resamples=500)


def _point(fraction: float, accs: list[float]) -> dict:
    return {"fraction": fraction, "step": int(12 * fraction), "epoch": 3 * fraction,
            "metrics": {bench: {"accuracy": summarize([a * k for a in accs]),
                                "entropy": summarize([0.3 - a / 10 for a in accs])}
                        for bench, k in (("testbed:test", 1.0), ("testbed:test_ood", 0.5))}}


def test_report_of_the_optional_sections(experiment_dir):
    """tuning, curves, bootstrap and ablations of aggregate.json: their tables, the learning-curve figure."""
    agg = json.loads((experiment_dir / "aggregate.json").read_text())
    grid = [{"learning_rate": lr, "num_train_epochs": ep} for lr in (1e-4, 3e-4) for ep in (1.0, 3.0)]
    agg["tuning"] = {"testbed": {
        "sft": {"benchmark": "testbed:val", "seed": 0, "metric": "accuracy", "from": None, "chosen": grid[3],
                "runs": [{"setting": g, "accuracy": acc, "n": 200} for g, acc in zip(grid, (0.41, 0.43, 0.44, 0.5))]},
        "cft": {"benchmark": "testbed:val", "seed": 0, "metric": "accuracy", "from": "sft", "chosen": grid[3],
                "runs": []}}}
    agg["curves"] = {"testbed": {
        "sft": {"points": [_point(0.0, [0.3, 0.3]), _point(0.5, [0.4, 0.5]), _point(1.0, [0.5, 0.52])], "seeds": {}},
        "cft": {"points": [_point(0.0, [0.3, 0.3]), _point(0.5, [0.45]), _point(1.0, [0.55, 0.6])], "seeds": {}}}}
    boots = {"testbed:test": {"cft vs sft": {"accuracy": _boot(0.25), "pass@4": _boot(0.0)},
                              "grpo:cft vs grpo:sft": {"accuracy": _boot(0.1)}}}
    agg["bootstrap"] = {"testbed": boots}
    results, shared = agg["results"], agg["shared"]
    small = {"testbed": {**shared["testbed"], "d_correct": 30, "critical_fraction": 0.125}}
    agg["ablations"] = {"k2": {"overrides": {"identify": {"k": 2}}, "description": "k = 2", "results": results,
                               "shared": small, "bootstrap": {"testbed": boots}, "finished_cells": 8,
                               "planned_cells": 9}}
    (experiment_dir / "aggregate.json").write_text(json.dumps(agg))
    md, page = report(experiment_dir)
    text = md.read_text()

    assert "## Hyperparameter tuning" in text and "accuracy on testbed:val, seed 0 (200 problems)" in text
    assert "| method | lr 1e-4 · 1 ep | lr 1e-4 · 3 ep | lr 3e-4 · 1 ep | lr 3e-4 · 3 ep | chosen |" in text
    assert "| sft | 41.0 | 43.0 | 44.0 | **50.0** | lr 3e-4 · 3 ep |" in text
    assert "| cft | - | - | - | - | lr 3e-4 · 3 ep (setting of sft) |" in text
    assert "<td><b>50.0</b></td>" in page.read_text()
    assert "(report/tuning.png)" in text  # the heatmap of the one method with runs

    # curves: sft at 0.5 is 40, 50 -> mean 45, half-width 12.706 * 7.07 / sqrt(2) = 63.5; one seed: no interval
    assert "| sft | 0.50 | 6 | 1.5 | 2 | 45.0 ± 63.5 | 22.5 ± 31.8 |" in text
    assert "| cft | 0.50 | 6 | 1.5 | 1 | 45.0 | 22.5 |" in text
    assert "(report/learning_curves.png)" in text

    # bootstrap: 5 more problems of 20 right in every seed -> exactly +25 points, an interval that excludes 0;
    # beside it the seed-only t interval of the results table (cft - sft: +5.0 [-2.5, +12.5])
    assert "## Paired bootstrap over problems and seeds: testbed:test\n" in text
    assert ("| comparison | Δ accuracy (bootstrap) | Δ accuracy (seed-only t CI) | Δ pass@4 (bootstrap) "
            "| Δ pass@4 (seed-only t CI) |") in text
    row = next(line for line in text.splitlines() if line.startswith("| cft vs sft |")).split(" | ")
    assert row[1].startswith("+25.0 [+") and row[1].endswith("]*") and row[2] == "+5.0 [-2.5, +12.5]"
    assert row[3] == "+0.0 [+0.0, +0.0]"
    grpo_row = next(line for line in text.splitlines() if line.startswith("| grpo:cft vs grpo:sft |"))
    # one GRPO seed: a seed-level difference without a t interval; no pass@4 bootstrap, so no pass@4 beside it
    assert grpo_row.endswith("] | +10.0 | - | - |")

    assert "## Ablations" in text
    main_row = next(line for line in text.splitlines() if line.startswith("| (main) |"))
    assert main_row.startswith("| (main) | the experiment above |  | 9/9 | base | 40 | 20.0 | 30.0 |")
    k2 = next(line for line in text.splitlines() if line.startswith("| k2 |"))
    assert k2.startswith("| k2 | identify.k=2 | k = 2 | 8/9 | base | 30 | 12.5 | 30.0 | - |")
    cft_k2 = [line for line in text.splitlines() if line.startswith("|  |  |  |  | cft |")][-1]
    assert "| 55.0 ± 12.4 | +25.0 [+" in cft_k2
    assert "vs grpo:sft" in next(line for line in text.splitlines() if line.startswith("|  |  |  |  | grpo:cft |"))
    _assert_self_contained(page.read_text(), len(list((experiment_dir / "report").glob("*.png"))))


def test_grpo_series_is_a_band_over_seeds():
    """Each seed is smoothed first, then summarized per step; a step only one seed reached has no interval."""
    logs = [[{"step": s, "reward": r} for s, r in ((1, 0.2), (2, 0.4))],
            [{"step": s, "reward": r} for s, r in ((1, 0.4), (2, 0.6), (3, 0.8))]]
    steps, stats = grpo_series(logs, "reward")
    assert steps == [1, 2, 3]
    # moving averages: seed 0 -> 0.2, 0.3; seed 1 -> 0.4, 0.5, 0.6
    assert [round(s["mean"], 6) for s in stats] == [0.3, 0.4, 0.6]
    assert stats[0]["ci95"] is not None and stats[2]["n"] == 1 and stats[2]["ci95"] is None
    assert grpo_series([[{"step": 1, "reward": None}]], "reward") == ([], [])


def test_costs_table_from_what_the_runs_recorded(tmp_path):
    """Seconds, runs and decoded tokens per stage, as the cells and the shared stages recorded them; a cell trained
    by its tuning run is not counted as training again; the machine the cells ran on is named."""
    cfg = build_config({"out": str(tmp_path / "run"), "methods": ["sft", "cft"], "seeds": [0, 1],
                        "grpo_from": ["sft"], "grpo_seeds": [0]})
    machine = {"cpu": "Test CPU", "cores": 2, "capability": "AVX2", "native_bf16": False, "threads": 2}
    cells = [_cell("base", 0, 0.3, 0.05)]
    for seed in (0, 1):
        cells += [_cell("sft", seed, 0.5, 0.1), _cell("cft", seed, 0.5, 0.1)]
    cells.append(_cell("grpo:sft", 0, 0.6, 0.1))
    for c in cells:
        c.update(seconds={"train": 100.0 if c["method"].startswith("grpo") else 10.0, "eval": 5.0},
                 eval_decoded={"seconds": 4.0, "decoded_tokens": 400}, machine=machine)
    cells[0]["seconds"].pop("train")
    cells[2].update(trained_by="testbed/tune/cft/learning_rate-0.0001/seed0")  # cft seed 0
    shared = {"testbed": {"generate": {"correct": 40, "n": 100}, "seconds": {"generate": 30.0, "identify": 5.0},
                          "sittings": {"identify": [{"seconds": 45.0, "records": 7}, {"seconds": 15.0, "records": 0}]},
                          "identify": {"critical_fraction": 0.2, "critical_by_kind": KINDS, "decoded_tokens": 6000}}}
    (tmp_path / "run").mkdir()
    Runner(cfg).write_aggregate(cells, shared)
    text = report(tmp_path / "run")[0].read_text()
    table = text.split("## Costs")[1].split("## Plots")[0]
    assert "machine: capability AVX2" in table.replace("cpu Test CPU, cores 2, ", "")
    assert "| testbed: A (generate), last sitting | 1 | 30 | 30 |  |  |" in table  # a record without sittings
    assert "| testbed: B (identify), sittings | 2 | 60 | 30 | 6,000 | 100 |" in table
    assert "| training (C) | 3 | 30 | 10 |  |  |" in table  # sft 0, sft 1, cft 1: cft 0 was the tuning run's
    assert "| GRPO | 1 | 100 | 100 |  |  |" in table
    assert "| evaluation (D) | 6 | 24 | 4 | 2,400 | 100 |" in table


def test_a_sitting_that_decoded_nothing_has_no_rate():
    """A stage B record that only finished the labels (and crosschecked them) decoded 0 tokens: no 0 tok/s."""
    from cft.report import cost_rows

    rows = cost_rows({"shared": {"m": {"seconds": {"identify": 10.0}, "decoded_tokens": {"identify": 0}}},
                      "cells": []})
    assert rows[1] == ["m: B (identify), last sitting", "1", "10", "10", "0", ""]


def test_grpo_pass_table_compares_whole_passes(tmp_path):
    """Per pass over the training problems: the mean reward over seeds, and the last complete pass minus the one
    before, per seed, with its t interval; a partial last pass is left out; cells without steps_per_pass have
    no row."""
    cfg = build_config({"out": str(tmp_path / "run"), "methods": ["sft", "cft"], "seeds": [0, 1],
                        "grpo_from": ["sft", "cft"], "grpo_seeds": [0, 1]})
    cells = [_cell("base", 0, 0.3, 0.05)]
    for seed in (0, 1):
        cells += [_cell("sft", seed, 0.5, 0.1), _cell("cft", seed, 0.5, 0.1)]
    # 2 steps per pass; 7 steps: passes (1, 2), (3, 4), (5, 6), and step 7 left out
    rewards = {0: [0.1, 0.3, 0.4, 0.4, 0.5, 0.6, 0.0], 1: [0.2, 0.2, 0.3, 0.5, 0.4, 0.4, 1.0]}
    for seed in (0, 1):
        for method in ("grpo:sft", "grpo:cft"):
            cell = _cell(method, seed, 0.6, 0.1)
            cell["grpo"] = {"global_step": 7, "steps_per_pass": 2 if method == "grpo:sft" else None,
                            "log": [{"step": i + 1, "reward": r, "entropy": 0.3 - i / 100}
                                    for i, r in enumerate(rewards[seed])]}
            cells.append(cell)
    (tmp_path / "run").mkdir()
    Runner(cfg).write_aggregate(cells, shared={})
    text = report(tmp_path / "run")[0].read_text()
    table = text.split("## GRPO reward per pass over the training problems")[1].split("## ")[0]
    row = next(line for line in table.splitlines() if line.startswith("| grpo:sft |"))
    # pass means: seed 0 -> 0.2, 0.4, 0.55; seed 1 -> 0.2, 0.4, 0.4; last - before: 0.15 and 0.0
    cells_ = [c.strip() for c in row.strip("|").split("|")]
    assert cells_[:3] == ["grpo:sft", "2", "2"]
    assert cells_[3] == "0.200 ± 0.000" and cells_[4] == "0.400 ± 0.000" and cells_[5].startswith("0.475 ± ")
    half = 12.706 * 0.075 / 2 ** 0.5 * 2 ** 0.5  # t(1) x sd of (0.15, 0.0) / sqrt(2)
    assert cells_[6] == f"+0.075 [{0.075 - half:+.3f}, {0.075 + half:+.3f}]"
    assert "| grpo:cft |" not in table
    assert "## GRPO entropy per pass over the training problems" in text


def test_pass_means_drop_a_partial_pass():
    from cft.stats import pass_means

    assert pass_means([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.5, 3.5]
    assert pass_means([1.0], 2) == [] and pass_means([1.0, 2.0], 0) == []
