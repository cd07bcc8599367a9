"""`cft report`: report.md and a self-contained report.html with every plot, from experiment folders built
by hand (no model is run): a grid over seeds, and a one-seed run as `cft demo` leaves it."""

from __future__ import annotations

import json
import re

import pytest

from cft.experiment import Runner
from cft.experiment_config import build_config, load_config
from cft.report import load_run, report

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
    assert "Not finished" not in text  # the unfinished cell (seed 3) is outside the grid
    _assert_self_contained(page.read_text(), len(plots))


def test_unfinished_cells_are_named(experiment_dir):
    agg = json.loads((experiment_dir / "aggregate.json").read_text())
    assert agg["missing_cells"] == [] and agg["finished_cells"] == agg["planned_cells"] == 9
    agg["missing_cells"] = [["testbed", "cft", 2]]
    (experiment_dir / "aggregate.json").write_text(json.dumps(agg))
    assert load_run(experiment_dir).missing == ["cft seed 2"]
    md, _ = report(experiment_dir)
    assert "Not finished (not in the statistics): cft seed 2." in md.read_text()


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
