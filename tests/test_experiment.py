"""`cft experiment`: config handling (sections are the stage configs), the statistics against hand-computed
values, a tiny grid on the testbed model end to end, and resuming (a finished run trains and decodes nothing;
an interrupted one redoes only what is missing)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from cft import experiment
from cft.experiment import cell_dir, run_experiment
from cft.experiment_config import ExperimentConfig, ExperimentError, build_config, config_dict, load_config
from cft.stats import T975, aggregate, paired, paired_bootstrap, summarize, t_quantile

TINY = {
    "models": ["testbed"],
    "generate": {"data": "testbed:train", "limit": 16},
    "benchmarks": ["testbed:test", "testbed:test_ood"],
    "methods": ["sft", "cft", "attn"],
    "seeds": [0, 1],
    "train_args": {"max_steps": 2, "lr": 3e-4, "batch_size": 4},
    "eval": {"limit": 4, "n_samples": 2, "temperature": 1.0, "max_new_tokens": 96, "batch_size": 16,
             "stop_at_answer": True},
    "grpo_from": ["sft", "cft"],
    "grpo_seeds": [0],
    "grpo": {"limit": 8},
    "grpo_args": {"max_steps": 2, "prompts_per_step": 2, "num_generations": 2, "max_completion_length": 16},
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
    for df in T975:
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


def test_paired_bootstrap_known_cases():
    # one seed, problems [1, 0, 0] vs all wrong: a resample's mean is k/3 with k ~ Binomial(3, 1/3)
    a, b = {0: {"p1": 1, "p2": 0, "p3": 0}}, {0: {"p1": 0, "p2": 0, "p3": 0}}
    r = paired_bootstrap(a, b, resamples=20_000, seed=1)
    assert r["mean"] == pytest.approx(1 / 3) and r["n_problems"] == 3 and r["n_seeds"] == 1
    # P(mean = 0) = 8/27 > 2.5% and P(mean = 1) = 1/27 > 2.5%: the 95% percentile interval is [0, 1]
    assert r["ci"] == [0.0, 1.0] and r["excludes_zero"] is False
    # the bootstrap variance of a mean of n resampled values is the plug-in variance / n = (2/9) / 3
    assert r["std"] == pytest.approx(math.sqrt(2 / 27), rel=0.03)
    # the same difference on every problem and seed: every resample gives it
    same = paired_bootstrap({s: {p: 1 for p in "abcd"} for s in (0, 1)}, {s: {p: 0 for p in "abcd"} for s in (0, 1)})
    assert same["mean"] == 1.0 and same["ci"] == [1.0, 1.0] and same["excludes_zero"] is True


def test_paired_bootstrap_resamples_seeds_and_pairs_the_methods():
    # a pure seed effect: seed 0 favours a on both problems, seed 1 neither; resampling problems cannot move it
    a = {0: {"x": 1, "y": 1}, 1: {"x": 0, "y": 0}}
    b = {0: {"x": 0, "y": 0}, 1: {"x": 0, "y": 0}}
    fixed = paired_bootstrap(a, b, resample_seeds=False, resamples=2000)
    assert fixed["ci"] == [0.5, 0.5] and fixed["std"] == 0.0
    # over seeds the mean is 1 (1/4), 0.5 (1/2) or 0 (1/4): sd sqrt(1/8), interval [0, 1]
    both = paired_bootstrap(a, b, resamples=20_000, seed=3)
    assert both["ci"] == [0.0, 1.0] and both["std"] == pytest.approx(math.sqrt(1 / 8), rel=0.03)
    # pairing: a method against itself plus a constant has no spread at all, however noisy the problems are
    noisy = {s: {f"p{i}": (i * 7 + s) % 3 / 2 for i in range(30)} for s in range(3)}
    shifted = {s: {p: v - 0.25 for p, v in rows.items()} for s, rows in noisy.items()}
    d = paired_bootstrap(noisy, shifted, resamples=500)
    assert d["ci"] == pytest.approx([0.25, 0.25]) and d["std"] == pytest.approx(0.0, abs=1e-12)
    assert paired_bootstrap(a, b, seed=5) == paired_bootstrap(a, b, seed=5)  # deterministic for its seed
    with pytest.raises(ValueError, match="problems differ"):
        paired_bootstrap(a, {0: {"x": 0}, 1: {"x": 0, "y": 0}})


# ---------------------------------------------------------------- config


def test_config_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("out: a\nmodels: [testbed]\nmethods: [sft, cft]\ntrain_args: {lr: 1e-4, num_train_epochs: 2}\n"
                    "grpo_from: [cft]\ngenerate: {limit: 9, decode: {max_new_tokens: 64}}\n")
    cfg = load_config(path, ["seeds=[3, 4]", "train_args.learning_rate=2e-4", "eval.limit=7", "out=b"])
    assert cfg.models == ["testbed"] and cfg.seeds == [3, 4] and cfg.out == "b"
    assert cfg.train_args == {"learning_rate": 2e-4, "num_train_epochs": 2}
    assert cfg.eval.limit == 7 and cfg.grpo_from == ["cft"]
    assert cfg.generate.limit == 9 and cfg.generate.decode.max_new_tokens == 64
    assert cfg.train.dtype == cfg.eval.dtype == "float32" and cfg.eval.benchmarks == cfg.benchmarks  # shared fields
    saved = config_dict(cfg)
    assert saved["train_args"] == {"learning_rate": 2e-4, "num_train_epochs": 2.0}
    assert saved["generate"]["decode"] == {"max_new_tokens": 64}
    again = tmp_path / "again.yaml"
    again.write_text(json.dumps(saved))
    assert config_dict(load_config(again)) == saved  # the saved config loads back to itself


def test_config_errors_name_file_line_and_key(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("out: a\ntrain:\n  lora: true\n  lrr: 2\n")
    with pytest.raises(ExperimentError, match=rf"{path}, line 4, key 'train.lrr': not a field of TrainConfig"):
        load_config(path)
    path.write_text("out: a\n")
    with pytest.raises(ExperimentError, match=r"override 'eval.limit=0': must be >= 1, got 0"):
        load_config(path, ["eval.limit=0"])


@pytest.mark.parametrize("raw, message", [
    ({"out": "a", "methods": ["sft", "magic"]}, "unknown method"),
    ({"out": "a", "colour": 1}, "'colour': not a field of ExperimentConfig"),
    ({"methods": ["sft"]}, "needs an output folder"),
    ({"out": "a", "train": {"seed": 3}}, "'train.seed': set by the experiment for each cell"),
    ({"out": "a", "eval": {"dtype": "bfloat16"}}, "'eval.dtype': set at the top level"),
    ({"out": "a", "eval": {"limt": 3}}, "'eval.limt': not a field of EvalConfig"),
    ({"out": "a", "train_args": {"lr": -1}}, "'train_args.lr': must be > 0"),
    ({"out": "a", "train": {"lr": 1e-4}}, "'train.lr': not a field of TrainConfig; TRL's training arguments"),
    ({"out": "a", "identify": {"engine": "slow"}}, "'identify.engine': invalid choice"),
    ({"out": "a", "generate": {"decode": {"temprature": 1}}}, "'generate.decode.temprature': not a field"),
    ({"out": "a", "methods": ["cft"], "grpo_from": ["sft"]}, "not in methods"),
    ({"out": "a", "grpo_args": {"max_steps": 3}}, "without grpo_from"),
    ({"out": "a", "methods": ["sft", "rho1"], "rho1_reference": "cft"}, "not in methods"),
])
def test_config_errors_name_the_problem(raw, message):
    with pytest.raises(ExperimentError, match=message):
        build_config(raw)


def test_cells_are_the_sections_with_the_cell_fields_replaced(tmp_path, monkeypatch):
    """Any field of a stage config reaches the cell from YAML; the runner sets only the cell's own fields."""
    from dataclasses import replace

    cfg = build_config({"out": str(tmp_path), "methods": ["sft", "rho1"], "seeds": [3], "dtype": "bfloat16",
                        "train": {"lora_targets": ["q_proj"]}, "train_args": {"weight_decay": 0.1, "warmup": 2}})
    seen = []

    def fake_train(tcfg, targs):
        seen.append((tcfg, targs))
        return {"tokens": {}, "log_history": [], "global_step": 0, "train_loss": 0.0, "final_loss": 0.0,
                "seconds": 0.0}

    monkeypatch.setattr(experiment, "train", fake_train)
    experiment.Runner(cfg).train_cell("testbed", "rho1", 3, tmp_path / "t")
    labels = experiment.shared_paths(cfg, "testbed")[1]
    (tcfg, targs), = seen
    assert tcfg == replace(cfg.train, model="testbed", input=str(labels), method="rho1", out=str(tmp_path / "t"),
                           resume=True, reference=str(cell_dir(cfg, "testbed", "sft", 3) / "train"))
    assert (targs.weight_decay, tcfg.lora_targets, targs.warmup_steps, tcfg.dtype, targs.seed) == (
        0.1, ["q_proj"], 2.0, "bfloat16", 3)


def test_plan_trains_the_rho1_reference_first_and_grpo_after_its_start():
    cfg = build_config({"out": "a", "methods": ["rho1", "cft", "sft"], "seeds": [0, 1], "grpo_from": ["cft"],
                        "grpo_seeds": [1]})
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


def _run_grid(tmp_path_factory, raw: dict) -> tuple:
    cfg = build_config({**raw, "out": str(tmp_path_factory.mktemp("experiment") / "run")})
    result, counts = run_experiment(cfg, log=lambda msg: None)
    return cfg, result, counts


def _rerun_does_nothing(grid, monkeypatch, cells: int) -> None:
    """A second run of a finished grid calls no stage, rewrites no file and returns the same aggregate."""
    cfg, result, _ = grid
    before = _snapshot(Path(cfg.out))
    calls = _forbid_work(monkeypatch)
    again, counts = run_experiment(cfg, log=lambda msg: None)
    assert calls == {name: 0 for _, name in STAGES}
    assert counts == {"trained": 0, "grpo": 0, "evaluated": 0, "skipped": cells}
    assert again == result and _snapshot(Path(cfg.out)) == before


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return _run_grid(tmp_path_factory, TINY)


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
        path = cell_dir(cfg, "testbed", "sft", s) / "eval" / "chat" / "all" / "samples.jsonl"
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        samples.append([r["response_ids"] for r in sorted(recs, key=lambda r: (r["id"], r["sample"]))
                        if r["kind"] == "sample"])
    assert samples[0] != samples[1]


def test_eval_problems_are_the_same_for_every_seed(tiny_run):
    cfg, _, _ = tiny_run
    ids = []
    for s in (0, 1):
        path = cell_dir(cfg, "testbed", "cft", s) / "eval" / "chat" / "all" / "samples.jsonl"
        recs = [json.loads(line) for line in path.read_text().splitlines()]
        ids.append({r["id"] for r in recs if Path(r["benchmark"]).name.startswith("testbed-test_ood-")})
    assert ids[0] == ids[1] and len(ids[0]) == 4


def test_rerun_of_a_finished_grid_does_nothing(tiny_run, monkeypatch):
    _rerun_does_nothing(tiny_run, monkeypatch, cells=9)


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
    changed = build_config({**TINY, "out": cfg.out, "train_args": {**TINY["train_args"], "lr": 1e-3}})
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


def test_smollm2_study_preset_plans_its_cells(tmp_path, capsys):
    """The SmolLM2 study (issue #26): arith data, float32 with a crosscheck, four methods tuned then 3 seeds,
    GRPO from sft and cft on seeds 0 and 1; every cell todo on a fresh folder, and the arith splits written as
    evaluated."""
    from cft.cli import main
    from cft.data import load_problems

    path = Path(__file__).resolve().parent.parent / "configs/experiment/smollm2_study.yaml"
    cfg = load_config(path, [f"out={tmp_path / 'study'}"])
    assert cfg.models == ["smollm2"] and cfg.dtype == "float32" and cfg.identify.crosscheck is not None
    assert cfg.generate.data == "arith:train" and cfg.benchmarks[0] == "arith:test"
    assert {"arith:test_ood", "mawps:addsub", "mawps:singleop"} <= set(cfg.benchmarks)
    assert cfg.eval.limit >= 300 and cfg.eval.n_samples >= 4 and cfg.sampled >= 100
    assert cfg.tune.benchmark == "arith:val"
    assert main(["experiment", str(path), f"out={tmp_path / 'study'}", "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("todo", "done"))]
    methods, grid, seeds = ["sft", "cft", "random", "dft"], cfg.tune.grid["learning_rate"], [0, 1, 2]
    tune = [f"todo  smollm2  tune {m} learning_rate-{lr:g}" for m in methods for lr in grid]
    cells = ["todo  smollm2  base  seed 0"] + [
        f"todo  smollm2  {m}  seed {seed}" for seed in seeds
        for m in [*methods, *(["grpo:sft", "grpo:cft"] if seed in (0, 1) else [])]]
    assert lines == tune + cells
    spec, template = experiment.benchmark_input(cfg, "arith:test", 300)
    written = [json.loads(line) for line in Path(spec).read_text().splitlines()]
    assert template == "chat" and [(r["question"], r["answer"]) for r in written] == [
        (p.question, p.answer) for p in load_problems("arith:test", seed=cfg.eval_data_seed, limit=300)]
    assert experiment.benchmark_input(cfg, "mawps:addsub", 300) == ("mawps:addsub", "chat")


# ---------------------------------------------------------------- tuning, curves, bootstrap and ablations


STUDY = {**{k: v for k, v in TINY.items() if not k.startswith("grpo")}, "methods": ["sft", "cft"],
         "tune": {"grid": {"lr": [1e-4, 1e-3]}, "limit": 4, "methods": ["cft"], "share": {"cft_mix": "cft"}},
         "curves": {"points": 2, "methods": ["cft"], "benchmarks": ["testbed:test"], "limit": 3, "n_samples": 2,
                    "sample_limit": 2},
         "compare": ["cft vs sft"],
         "ablations": {"k2": {"identify": {"k": 2}, "methods": ["cft_mix"], "seeds": [0, 1],
                              "train": {"mix_lambda": 0.5}}}}


def test_grid_points_and_study_config_errors():
    from cft.experiment_config import grid_points

    cfg = build_config({"out": "a", "tune": {"grid": {"lr": [1e-4, 1e-3], "epochs": [1, 3]}}})
    assert grid_points(cfg.tune) == [{"learning_rate": 1e-4, "num_train_epochs": 1.0},
                                     {"learning_rate": 1e-4, "num_train_epochs": 3.0},
                                     {"learning_rate": 1e-3, "num_train_epochs": 1.0},
                                     {"learning_rate": 1e-3, "num_train_epochs": 3.0}]
    sub = build_config({"out": "a", "seeds": [0, 1], "ablations": {"k5": {"identify": {"k": 5}, "seeds": [1]}}})
    k5 = sub.ablations["k5"]
    assert k5.identify.k == 5 and k5.seeds == [1] and k5.out == str(Path("a") / "ablations" / "k5")
    assert not k5.evaluate_base and sub.identify.k == 3
    assert config_dict(sub)["ablations"] == {"k5": {"identify": {"k": 5}, "seeds": [1]}}
    for raw, message in [
        ({"tune": {"grid": {"lrr": [1]}}}, "'tune.grid.lrr': not a field of CFTSFTConfig"),
        ({"tune": {"grid": {"lr": [-1.0]}}}, "'tune.grid.lr': must be > 0"),
        ({"tune": {"grid": {"lr": []}}}, "'tune.grid.lr': a grid entry is a non-empty list"),
        ({"tune": {"grid": {}}}, "tune needs a grid"),
        ({"tune": {"grid": {"lr": [1e-4]}, "limt": 3}}, "'tune.limt': not a field of TuneConfig"),
        ({"tune": {"grid": {"lr": [1e-4]}, "share": {"cft_mix": "dft"}}}, "not in methods"),
        ({"curves": {"points": "three"}}, "'curves.points': expected int"),
        ({"ablations": {"a/b": {"seeds": [0]}}}, "a folder name"),
        ({"ablations": {"k2": {"identify": {"kk": 2}}}}, "'ablations.k2.identify.kk': not a field of IdentifyConfig"),
        ({"compare": ["cft against sft"]}, "is not 'A vs B'"),
    ]:
        with pytest.raises(ExperimentError, match=message):
            build_config({"out": "a", **raw})


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    return _run_grid(tmp_path_factory, STUDY)


def test_study_tunes_each_method_and_trains_at_its_choice(study_run):
    cfg, result, counts = study_run
    # 2 tuning + 4 grid + 2 ablation runs; 9 cell evaluations + 5 curve points (base; cft: 2 seeds x 2)
    assert counts == {"trained": 8, "grpo": 0, "evaluated": 14, "skipped": 0}
    tuning = result["tuning"]["testbed"]
    assert set(tuning) == {"cft", "cft_mix"}  # tune.methods: sft trains at train_args' lr
    runs = tuning["cft"]["runs"]
    assert [r["setting"]["learning_rate"] for r in runs] == [1e-4, 1e-3] and all(r["n"] == 4 for r in runs)
    best = max(runs, key=lambda r: r["accuracy"])  # the first of equals
    assert tuning["cft"]["chosen"] == best["setting"]
    for method, lr in (("cft", best["setting"]["learning_rate"]), ("sft", TINY["train_args"]["lr"])):
        for seed in (0, 1):
            summary = json.loads((cell_dir(cfg, "testbed", method, seed) / "train" / "train_summary.json").read_text())
            assert summary["training_args"]["learning_rate"] == lr
    assert tuning["cft_mix"]["from"] == "cft" and tuning["cft_mix"]["chosen"] == best["setting"]
    mix = cell_dir(cfg.ablations["k2"], "testbed", "cft_mix", 0) / "train" / "train_summary.json"
    assert json.loads(mix.read_text())["training_args"]["learning_rate"] == tuning["cft"]["chosen"]["learning_rate"]
    # tuning runs are scored on the validation split only
    tune_cell = json.loads((cell_dir(cfg, "testbed", "cft", 0, {"learning_rate": 1e-4}) / "cell.json").read_text())
    assert set(tune_cell["metrics"]) == {"testbed:val"}


def test_study_curves_bootstrap_and_ablation(study_run):
    cfg, result, _ = study_run
    cell = json.loads((cell_dir(cfg, "testbed", "cft", 1) / "cell.json").read_text())
    assert [p["step"] for p in cell["curve"]] == [1, 2] and [p["fraction"] for p in cell["curve"]] == [0.5, 1.0]
    assert (cell_dir(cfg, "testbed", "cft", 1) / "train" / "checkpoint-1").is_dir()
    assert "curve" not in json.loads((cell_dir(cfg, "testbed", "sft", 1) / "cell.json").read_text())
    points = result["curves"]["testbed"]["cft"]["points"]
    assert [p["fraction"] for p in points] == [0.0, 0.5, 1.0] and points[0]["step"] == 0  # the base model first
    assert points[2]["metrics"]["testbed:test"]["accuracy"]["n"] == 2
    boot = result["bootstrap"]["testbed"]["testbed:test"]["cft vs sft"]
    assert set(boot) == {"accuracy", "pass@1", "pass@2"}
    assert boot["accuracy"]["n_seeds"] == 2 and boot["accuracy"]["n_problems"] == 4
    rows = result["results"]["testbed"]["testbed:test"]
    observed = rows["cft"]["metrics"]["accuracy"]["mean"] - rows["sft"]["metrics"]["accuracy"]["mean"]
    assert boot["accuracy"]["mean"] == pytest.approx(observed)
    lo, hi = boot["accuracy"]["ci"]
    assert lo <= boot["accuracy"]["mean"] <= hi
    k2 = result["ablations"]["k2"]
    assert k2["overrides"]["identify"] == {"k": 2} and k2["finished_cells"] == k2["planned_cells"] == 2
    assert k2["shared"]["testbed"]["critical_fraction"] >= result["shared"]["testbed"]["critical_fraction"]
    assert set(k2["results"]["testbed"]["testbed:test"]) == {"cft_mix"} and "bootstrap" not in k2  # compare: main only


def test_study_rerun_does_nothing(study_run, monkeypatch):
    _rerun_does_nothing(study_run, monkeypatch, cells=9)


LEAN = {**{k: v for k, v in TINY.items() if not k.startswith("grpo")}, "methods": ["sft"], "seeds": [0, 1],
        "tune": {"grid": {"lr": [1e-4, 1e-3]}, "limit": 4},
        "sample_benchmarks": ["testbed:test"], "sample_limit": 2, "eval_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def lean_run(tmp_path_factory):
    return _run_grid(tmp_path_factory, LEAN)


def test_the_tuning_run_is_reused_for_its_seed(lean_run):
    """The grid cell of the tuning seed at the chosen setting is that tuning run (equal training hashes): its
    trained model is linked, not trained again; the other seed trains."""
    cfg, result, counts = lean_run
    assert counts == {"trained": 3, "grpo": 0, "evaluated": 5, "skipped": 0}  # 2 tuning runs + seed 1
    chosen = result["tuning"]["testbed"]["sft"]["chosen"]
    twin = cell_dir(cfg, "testbed", "sft", 0, chosen)
    cell = json.loads((cell_dir(cfg, "testbed", "sft", 0) / "cell.json").read_text())
    assert cell["trained_by"] == str(twin.relative_to(cfg.out))
    assert cell["train"] == json.loads((twin / "cell.json").read_text())["train"]
    weights = [p.relative_to(twin / "train") for p in (twin / "train").rglob("*.safetensors")]
    assert weights and all((cell_dir(cfg, "testbed", "sft", 0) / "train" / w).read_bytes()
                           == (twin / "train" / w).read_bytes() for w in weights)
    other = json.loads((cell_dir(cfg, "testbed", "sft", 1) / "cell.json").read_text())
    assert "trained_by" not in other and other["train"]["global_step"] == 2


def test_sample_benchmarks_and_eval_dtype(lean_run):
    cfg, result, _ = lean_run
    metrics = json.loads((cell_dir(cfg, "testbed", "sft", 1) / "cell.json").read_text())["metrics"]
    assert metrics["testbed:test"]["n_sampled"] == 2 and metrics["testbed:test"]["pass_at_k"]
    assert metrics["testbed:test_ood"]["n_sampled"] == 0 and not metrics["testbed:test_ood"]["pass_at_k"]
    assert metrics["testbed:test_ood"]["n"] == 4
    rows = result["results"]["testbed"]
    assert "pass@2" in rows["testbed:test"]["sft"]["metrics"]
    assert "pass@2" not in rows["testbed:test_ood"]["sft"]["metrics"]
    for sub, benchmarks in (("greedy", 2), ("sampled", 1)):
        meta = (cell_dir(cfg, "testbed", "base", 0) / "eval" / "chat" / sub / "samples.jsonl.meta.json").read_text()
        config = json.loads(meta)["config"]
        assert config["dtype"] == "bfloat16" and len(config["benchmarks"]) == benchmarks
    with pytest.raises(ExperimentError, match="not in benchmarks: gsm8k"):
        build_config({"out": "a", "sample_benchmarks": ["gsm8k"]})
    plain = build_config({**LEAN, "out": cfg.out, "sample_benchmarks": None, "eval_dtype": None})
    from cft.grid import Grid

    assert Grid(plain).cell_hash("testbed", "sft", 1) != Grid(cfg).cell_hash("testbed", "sft", 1)
    assert Grid(plain).train_hash("testbed", "sft", 1) == Grid(cfg).train_hash("testbed", "sft", 1)


def test_lean_rerun_does_nothing(lean_run, monkeypatch):
    _rerun_does_nothing(lean_run, monkeypatch, cells=5)  # the tuning runs are cells too


def test_every_settable_field_has_a_frozen_default():
    """``cell_defaults.BASELINE`` must name every field a config can set (a new field goes in with the value old
    runs implicitly used), or a later change of its default could not change the hashes of runs that relied on
    it."""
    import dataclasses

    from cft.cell_defaults import BASELINE
    from cft.experiment_config import SECTIONS, VALUE_SECTIONS, _default, _settable, stage_class

    missing = []

    def walk(cls, section, own_only=False):
        own = set(cls.__dict__.get("__annotations__", {}))
        for name, f in _settable(cls, section).items():
            default = _default(f)
            if dataclasses.is_dataclass(default):
                walk(type(default), None)
            elif (default is not dataclasses.MISSING and (not own_only or name in own)
                  and name not in BASELINE.get(cls.__name__, {})):
                missing.append(f"{cls.__name__}.{name}")

    for section in SECTIONS:
        walk(stage_class(section), section, own_only=section in VALUE_SECTIONS)
    assert not missing, f"add to cft/cell_defaults.py: {missing}"


def test_a_changed_default_changes_the_hash_of_the_cells_that_used_it(monkeypatch):
    """Run with every default, then change ``cft grpo``'s problem count and TRL max_steps default (as a release
    would): the GRPO cells' hashes change, the others' do not."""
    import dataclasses

    from cft import grpo
    from cft.grid import Grid

    cfg = build_config({"out": "x", "grpo_from": ["sft"], "methods": ["sft"], "seeds": [0]})
    before = Grid(cfg)
    old = (before.train_hash("testbed", "sft", 0), before.train_hash("testbed", "grpo:sft", 0))
    for cls, name, value in ((grpo.GRPORunConfig, "limit", 64), (grpo.CFTGRPOConfig, "max_steps", 48)):
        field = {f.name: f for f in dataclasses.fields(cls)}[name]
        monkeypatch.setattr(field, "default", value)
    after = build_config({"out": "x", "grpo_from": ["sft"], "methods": ["sft"], "seeds": [0]})
    after.grpo = dataclasses.replace(after.grpo, limit=64)  # what the changed default would construct
    new = Grid(after)
    assert new.train_hash("testbed", "sft", 0) == old[0]
    assert new.train_hash("testbed", "grpo:sft", 0) != old[1]


def test_problem_scores_cover_every_greedy_problem_and_old_records_are_rescored(lean_run, monkeypatch):
    """The bootstrap's per-problem scores: greedy accuracy of every problem, pass@k of the sampled ones (the
    sampled part's own greedy decode covers only those). A cell scored by version 1 (accuracy of the sampled
    problems only) is scored again from its sample files on a rerun, decoding nothing."""
    cfg, result, _ = lean_run
    path = cell_dir(cfg, "testbed", "sft", 1) / "cell.json"
    rec = json.loads(path.read_text())
    scores, metrics = rec["problems"]["testbed:test"], rec["metrics"]["testbed:test"]
    assert rec["scores"] == experiment.SCORES
    assert len(scores["accuracy"]) == metrics["n"] == 4
    assert sum(scores["accuracy"].values()) / 4 == pytest.approx(metrics["accuracy"])
    assert len(scores["pass@2"]) == metrics["n_sampled"] == 2 and set(scores["pass@2"]) < set(scores["accuracy"])
    sampled_only = {k: v for k, v in scores["accuracy"].items() if k in scores["pass@2"]}
    old = {k: v for k, v in rec.items() if k != "scores"}
    old["problems"] = {**rec["problems"], "testbed:test": {**scores, "accuracy": sampled_only}}
    path.write_text(json.dumps(old, indent=2) + "\n")
    calls = _forbid_work(monkeypatch)
    again, counts = run_experiment(cfg, log=lambda msg: None)
    assert calls == {name: 0 for _, name in STAGES} and counts["evaluated"] == counts["trained"] == 0
    assert json.loads(path.read_text()) == rec and again == result
