"""Sharded identification: torchrun ranks, their devices, and a merge that trusts no shard file blindly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cft.identify as ident
from cft.artifacts import InputError, load_records, read_meta
from cft.cli import main
from cft.decoding.api import DecodeConfig
from cft.generate import GenerateConfig, generate
from cft.identify import IdentifyConfig, identify, merge_shards, without_margins
from cft.models import load_model

REPO = Path(__file__).resolve().parent.parent
MAX_NEW = 80
FAST = {"k": 2, "continuation_cap": 6}  # few, short branches: these tests are about shards, not labels


@pytest.fixture(scope="module")
def testbed():
    return load_model("testbed", device="cpu")


@pytest.fixture(scope="module")
def generations(tmp_path_factory, testbed):
    """Stage A on 10 testbed problems, with its metadata (identify inherits max_new_tokens from it)."""
    path = tmp_path_factory.mktemp("dist") / "G.jsonl"
    s = generate(GenerateConfig(model="testbed", data="testbed:train", out=str(path), limit=10, device="cpu",
                                decode=DecodeConfig(max_new_tokens=MAX_NEW)), *testbed)
    assert s["correct"] >= 3
    return path


def single(tmp_path, generations, testbed) -> list[dict]:
    out = tmp_path / "single.jsonl"
    identify(IdentifyConfig(model="testbed", input=str(generations), out=str(out), **FAST), *testbed)
    return load_records(out, "labels")


def shards(out: Path, generations, testbed, count=2, indices=None, **kw) -> None:
    for i in range(count) if indices is None else indices:
        identify(IdentifyConfig(model="testbed", input=str(generations), out=str(out), num_shards=count,
                                shard_index=i, **{**FAST, **kw}), *testbed)


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory, generations, testbed):
    """Shard files 0 and 1 of 2 from one run; each test copies them."""
    out = tmp_path_factory.mktemp("shards") / "L.jsonl"
    shards(out, generations, testbed)
    return out


def copy_shards(src: Path, dst_dir: Path) -> Path:
    for f in src.parent.iterdir():
        shutil.copy(f, dst_dir / f.name)
    return dst_dir / src.name


@pytest.mark.slow  # two interpreters importing torch: about half a minute on a loaded machine
def test_torchrun_two_ranks_then_merge_equals_one_process(tmp_path, generations, testbed):
    out = tmp_path / "L.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cft",
         "identify", "--model", "testbed", "--input", str(generations), "--out", str(out), "--merge-timeout", "120",
         "-k", "2", "--continuation-cap", "6"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "merged 2 shards" in done.stdout
    merged = load_records(out, "labels")
    want = single(tmp_path, generations, testbed)
    assert [without_margins(r) for r in merged] == [without_margins(r) for r in want]
    meta = read_meta(out)
    assert meta["summary"]["responses"] == len(want) and len(meta["merged_from"]) == 2
    assert meta["config"]["max_new_tokens"] == MAX_NEW  # inherited from Stage A by every rank


def test_merge_refuses_a_stale_shard_from_another_run(tmp_path, generations, testbed, two_shards):
    out = copy_shards(two_shards, tmp_path)  # an earlier run with k = 2
    shards(out, generations, testbed, indices=[0], k=3)  # this run (k = 3) rewrote shard 0 only
    with pytest.raises(InputError, match=r"shard1of2.*another run than shard 0 \(k differ; stale file\?\)"):
        merge_shards(str(out), 2)
    (tmp_path / "ok").mkdir()
    merged = copy_shards(two_shards, tmp_path / "ok")  # both shards of one run merge
    merge_shards(str(merged), 2)
    assert read_meta(merged)["summary"]["responses"] == len(load_records(merged, "labels")) >= 3


def test_merge_refuses_a_shard_that_does_not_hold_its_keys(tmp_path, two_shards):
    out = copy_shards(two_shards, tmp_path)
    path = Path(ident.shard_path(str(out), 1, 2))
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # a record lost (an edited or truncated file)
    with pytest.raises(InputError, match="do not hold exactly the responses their indices imply"):
        merge_shards(str(out), 2)


def test_merge_of_a_wrong_shard_count_is_refused(tmp_path, two_shards):
    out = copy_shards(two_shards, tmp_path)
    with pytest.raises(InputError, match="shard0of3.jsonl.*missing"):
        merge_shards(str(out), 3)


def test_merge_waits_then_times_out_naming_the_missing_shard(tmp_path, two_shards):
    out = copy_shards(two_shards, tmp_path)
    Path(ident.shard_path(str(out), 1, 2)).unlink()  # rank 1 never finished
    with pytest.raises(InputError, match=r"shard1of2.jsonl: cannot merge: shard file missing after waiting \d+s"):
        merge_shards(str(out), 2, wait=True, poll_seconds=0.1, timeout=0.3)


def test_shard_index_is_bounds_checked(tmp_path, generations, capsys):
    code = main(["identify", "--model", "testbed", "--device", "cpu", "--input", str(generations), "--out",
                 str(tmp_path / "L.jsonl"), "--num-shards", "2", "--shard-index", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--shard-index" in err and "--num-shards" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(InputError, match="out of range"):
        ident.shard_of(IdentifyConfig(model="m", input="i", out="o", num_shards=3, shard_index=-1))


def test_each_rank_loads_on_its_own_gpu(tmp_path, generations, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = []

    def fake_load(name, dtype, device, attn_implementation=None):
        seen.append(device)
        raise RuntimeError("stop here")

    monkeypatch.setattr(ident, "load_model", fake_load)
    with pytest.raises(RuntimeError, match="stop here"):
        identify(IdentifyConfig(model="testbed", input=str(generations), out=str(tmp_path / "L.jsonl")))
    assert seen == ["cuda:1"]
    monkeypatch.delenv("LOCAL_RANK")
    assert ident.rank_device() is None


def test_merge_sums_the_shards_engine_counts_and_stop_audits(tmp_path, generations, testbed):
    """The merged metadata reports the whole run: the shards' engine counts and stop audits summed (it kept the
    first shard's, or none), and labels byte-equal to one process's, margins included."""
    out = tmp_path / "L.jsonl"
    shards(out, generations, testbed, stop_at_answer=True, stop_audit=4)
    metas = [read_meta(Path(f"{out}.shard{i}of2.jsonl")) for i in range(2)]
    merge_shards(str(out), 2)
    summary = read_meta(out)["summary"]
    assert summary["engine"]["tokens"] == sum(m["summary"]["engine"]["tokens"] for m in metas) > 0
    assert summary["engine"]["forwards"] == sum(m["summary"]["engine"]["forwards"] for m in metas)
    assert summary["stop_audit"]["stopped"] == sum(m["summary"]["stop_audit"]["stopped"] for m in metas)
    assert summary["stop_audit"]["sample"] == sum(m["summary"]["stop_audit"]["sample"] for m in metas)
    one = tmp_path / "one.jsonl"
    identify(IdentifyConfig(model="testbed", input=str(generations), out=str(one), stop_at_answer=True,
                            stop_audit=4, **FAST), *testbed)
    assert load_records(out, "labels") == load_records(one, "labels")
