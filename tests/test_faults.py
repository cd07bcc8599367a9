"""Faults users meet: two runs writing one output, a full disk, SIGKILL during eval and train.

Each test injects the fault for real where it can (a second process, SIGKILL) and at the single write
call otherwise (ENOSPC), then checks the outcome a user sees and that the rerun finishes the same work.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cft.artifacts as artifacts
from cft.artifacts import ArtifactLockedError, DiskFullError, ResumableWriter, load_records, read_meta
from cft.cli import main
from tests.test_reliability import cli_env, complete_lines

RECORDS = [{"key": f"k{i}", "value": i} for i in range(6)]


def hold_lock(out: Path) -> subprocess.Popen:
    """Another process that opens a writer on ``out`` and waits; returns once it holds the lock."""
    code = textwrap.dedent(f"""
        import sys, time
        from cft.artifacts import ResumableWriter
        w = ResumableWriter({str(out)!r}, "samples")
        print("ready", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=cli_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def finish(out: Path, records=RECORDS) -> bytes:
    w = ResumableWriter(out, "samples")
    w.write([dict(r) for r in records if r["key"] not in w.done])
    w.finalize([r["key"] for r in records], {"n": len(records)})
    return out.read_bytes()


# ---------------------------------------------------------------- two writers, one output


def test_a_second_writer_is_refused_naming_the_holder_then_a_killed_holder_is_taken_over(tmp_path, capsys):
    out = tmp_path / "S.jsonl"
    holder = hold_lock(out)
    try:
        with pytest.raises(ArtifactLockedError, match=rf"pid {holder.pid}\b.*is writing this file"):
            ResumableWriter(out, "samples")
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "S.jsonl.lock").exists()  # SIGKILL left the lock file; the kernel dropped the flock
    w = ResumableWriter(out, "samples")
    assert w.lock.took_over == holder.pid
    assert f"pid {holder.pid}" in capsys.readouterr().err
    w.write([dict(r) for r in RECORDS])
    w.finalize([r["key"] for r in RECORDS], {})
    assert not (tmp_path / "S.jsonl.lock").exists() and not (tmp_path / "S.jsonl.partial").exists()
    assert [r["key"] for r in load_records(out, "samples")] == [r["key"] for r in RECORDS]


def test_the_cli_refuses_a_second_run_on_the_same_out_at_once(tmp_path):
    """``cft generate --out G.jsonl`` while another process writes G.jsonl: exit 2, one line naming the pid."""
    out = tmp_path / "G.jsonl"
    w = ResumableWriter(out, "generations")  # this test process is the first run
    done = subprocess.run([sys.executable, "-m", "cft", "generate", "--model", "testbed", "--device", "cpu",
                           "--data", "testbed:train", "--limit", "2", "--out", str(out)],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"cft generate: error: {out}: another cft run (pid {os.getpid()} ")
    assert "Traceback" not in done.stderr and not out.exists()
    w.close()
    assert not Path(str(out) + ".lock").exists()


def test_a_writer_abandoned_in_this_process_passes_its_lock_on(tmp_path):
    """A stage that raised before finalizing (its writer never closed) must not block the rerun in-process."""
    out = tmp_path / "S.jsonl"
    ResumableWriter(out, "samples").write([dict(RECORDS[0])])
    assert finish(out) == finish(tmp_path / "ref.jsonl")


# ---------------------------------------------------------------- a full disk


def fill_disk_after(monkeypatch, good_calls: int) -> None:
    """The first ``good_calls`` writes succeed; the next writes half its bytes, then reports ENOSPC."""
    real, calls = os.write, []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) <= good_calls:
            return real(fd, data)
        real(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(artifacts, "_raw_write", write)


def test_disk_full_mid_write_keeps_the_complete_records_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "S.jsonl"
    fill_disk_after(monkeypatch, good_calls=1)
    w = ResumableWriter(out, "samples")
    w.write([dict(r) for r in RECORDS[:2]])
    with pytest.raises(DiskFullError) as err:
        w.write([dict(r) for r in RECORDS[2:4]])
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{out}: no space left on device; 2 finished records")
    partial = Path(str(out) + ".partial")
    assert [r["key"] for r in map(__import__("json").loads, partial.read_text().splitlines())] == ["k0", "k1"]
    assert partial.read_bytes().endswith(b"\n")  # the torn half-record was cut off
    assert not Path(str(out) + ".lock").exists()  # released: the rerun is not refused

    monkeypatch.setattr(artifacts, "_raw_write", os.write)  # space is back
    assert finish(out) == finish(tmp_path / "ref.jsonl")


def test_every_sitting_of_a_resumed_output_is_recorded(tmp_path):
    """A job resumed in several sittings records each one (records written, seconds) in its metadata: an
    interrupted sitting up to its last sync, and the sittings of a finished file that a later run extends."""
    out = tmp_path / "S.jsonl"
    w = ResumableWriter(out, "samples")
    w.write([dict(r) for r in RECORDS[:3]])
    w.close()  # as if the process stopped here after a sync
    w = ResumableWriter(out, "samples")
    assert [s["records"] for s in w.earlier] == [3]
    w.write([dict(r) for r in RECORDS[3:5] if r["key"] not in w.done])
    w.finalize([r["key"] for r in RECORDS[:5]], {"n": 5})
    sittings = read_meta(out)["sittings"]
    assert [s["records"] for s in sittings] == [3, 2] and all(s["seconds"] >= 0 and s["started"] for s in sittings)
    assert not Path(str(out) + ".partial.sittings").exists()  # finished: the metadata holds them
    finish(out)  # a later run adds the sixth record to the finished file
    assert [s["records"] for s in read_meta(out)["sittings"]] == [3, 2, 1]


def test_disk_full_while_finalizing_keeps_the_partial(tmp_path, monkeypatch):
    out = tmp_path / "S.jsonl"
    w = ResumableWriter(out, "samples")
    w.write([dict(r) for r in RECORDS])
    fill_disk_after(monkeypatch, good_calls=0)
    with pytest.raises(DiskFullError, match="6 finished records are kept"):
        w.finalize([r["key"] for r in RECORDS], {})
    assert not out.exists() and not Path(str(out) + ".tmp").exists()
    assert complete_lines(Path(str(out) + ".partial")) == 6
    monkeypatch.setattr(artifacts, "_raw_write", os.write)
    assert finish(out) == finish(tmp_path / "ref.jsonl")


def test_the_cli_reports_a_full_disk_in_one_line_and_the_rerun_finishes(tmp_path, monkeypatch, capsys):
    """``cft generate`` (in-process) hits ENOSPC on its third response (each is appended as it ends); the same
    command then completes."""
    argv = ["generate", "--model", "testbed", "--device", "cpu", "--data", "testbed:train", "--limit", "6",
            "--batch-size", "2", "--max-new-tokens", "24"]
    assert main([*argv, "--out", str(tmp_path / "ref.jsonl")]) == 0
    fill_disk_after(monkeypatch, good_calls=2)
    out = tmp_path / "G.jsonl"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"cft generate: error: {out}: no space left on device; 2 finished records")
    assert complete_lines(Path(str(out) + ".partial")) == 2
    monkeypatch.setattr(artifacts, "_raw_write", os.write)
    assert main([*argv, "--out", str(out)]) == 0
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


# ---------------------------------------------------------------- SIGKILL during eval and train


@pytest.mark.slow
def test_eval_killed_resumes_to_the_same_records(tmp_path, monkeypatch):
    """``cft eval`` SIGKILLed three times once it has written samples, then rerun: the same samples and metrics.

    Byte for byte on the ``hf`` backend, which decodes chunk by chunk. The ``engine`` backend batches every
    pending chunk together, so a resumed run shares rows differently: the same token ids and verdicts, but a
    sampled response's mean entropy can differ in the 7th decimal (batch-dependent float rounding).
    """
    from tests.test_reliability import kill_and_resume

    argv = ["eval", "--model", "testbed", "--device", "cpu", "--benchmarks", "testbed:test", "--limit", "12",
            "--n-samples", "2", "--batch-size", "4", "--max-new-tokens", "48", "--out", "E", "--backend", "hf"]
    for run in ("killed", "reference"):
        (tmp_path / run).mkdir()
    # the reference runs as its own process too: nothing of this test process's state leaks into it
    done = subprocess.run([sys.executable, "-m", "cft", *argv], cwd=tmp_path / "reference", env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    # seconds between two writes: 3 greedy chunks of 4 problems + 3 sampled chunks of 2 problems x 2 samples
    pace = read_meta(tmp_path / "reference" / "E" / "samples.jsonl")["timing"]["seconds"] / 6
    counts = kill_and_resume(argv, tmp_path / "killed", tmp_path / "killed" / "E" / "samples.jsonl.partial",
                             seed=3, pace=pace)
    assert counts[0] > 0 and counts[-1] < 36, counts
    for name in ("samples.jsonl", "metrics.json"):
        assert (tmp_path / "killed" / "E" / name).read_bytes() == (tmp_path / "reference" / "E" / name).read_bytes()
    assert not (tmp_path / "killed" / "E" / "samples.jsonl.lock").exists()


@pytest.mark.slow
def test_eval_killed_inside_its_first_chunk_keeps_finished_responses_and_resumes_to_the_same_metrics(tmp_path):
    """``cft eval`` on the engine backend decodes its one chunk of 24 problems as one continuous batch; a SIGKILL
    before that chunk completes still leaves every response that had ended (each is appended as it ends, with
    the default flushing), and the rerun decodes only the missing ones into the samples and metrics of an
    uninterrupted run, byte for byte (greedy: the same tokens whatever rows surround them)."""
    from tests.test_reliability import kill_and_resume

    argv = ["eval", "--model", "testbed", "--device", "cpu", "--benchmarks", "testbed:test", "--limit", "24",
            "--n-samples", "0", "--batch-size", "64", "--max-new-tokens", "64", "--out", "E"]
    env = {k: v for k, v in cli_env().items() if k != "CFT_FLUSH_EVERY"}
    for run in ("killed", "reference"):
        (tmp_path / run).mkdir()
    done = subprocess.run([sys.executable, "-m", "cft", *argv], cwd=tmp_path / "reference", env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    reference = read_meta(tmp_path / "reference" / "E" / "samples.jsonl")["timing"]
    counts = kill_and_resume(argv, tmp_path / "killed", tmp_path / "killed" / "E" / "samples.jsonl.partial",
                             seed=5, pace=reference["seconds"] / 24, kills=2, env=env)
    assert 0 < counts[0] < 24, counts  # killed inside the only chunk, with finished responses kept
    for name in ("samples.jsonl", "metrics.json"):
        assert (tmp_path / "killed" / "E" / name).read_bytes() == (tmp_path / "reference" / "E" / name).read_bytes()
    resumed = read_meta(tmp_path / "killed" / "E" / "samples.jsonl")["timing"]
    assert resumed["decoded_tokens"] < reference["decoded_tokens"]  # the kept responses were not decoded again


def test_train_killed_resumes_from_its_last_checkpoint_to_the_same_weights(tmp_path, testbed_tokenizer):
    """``cft train`` SIGKILLed once its step-2 checkpoint is complete, then ``--resume``: the final weights equal an
    uninterrupted run's on the same seed. A checkpoint folder cut short by the kill is skipped, not loaded."""
    import torch
    from safetensors.torch import load_file

    from tests.test_train import make_tiny_model, write_labels

    model = make_tiny_model(tmp_path / "model", testbed_tokenizer)
    labels = write_labels(tmp_path / "labels.jsonl", testbed_tokenizer, 8)
    argv = [sys.executable, "-m", "cft", "train", "--model", str(model), "--input", str(labels), "--method", "cft",
            "--max-steps", "8", "--batch-size", "2", "--lr", "1e-3", "--warmup", "0", "--save-steps", "2"]
    env = cli_env()
    whole = subprocess.run([*argv, "--out", str(tmp_path / "whole")], env=env, capture_output=True, text=True,
                           timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]

    cut = tmp_path / "cut"
    proc = subprocess.Popen([*argv, "--out", str(cut)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (cut / "checkpoint-2" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (cut / "model.safetensors").exists(), "the run finished before the kill; give it more steps"
    # whatever the kill interrupted, also leave a checkpoint folder that a save did not finish
    (cut / "checkpoint-99").mkdir()
    (cut / "checkpoint-99" / "model.safetensors").write_bytes(b"torn")

    resumed = subprocess.run([*argv, "--out", str(cut), "--resume"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "checkpoint-99 is incomplete" in resumed.stderr
    summary = __import__("json").loads((cut / "train_summary.json").read_text())
    assert summary["global_step"] == 8 and "checkpoint-" in summary["resumed_from"]
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(cut / "model.safetensors")
    start = load_file(model / "model.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], start[k]) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("stage", ["train", "grpo"])
def test_train_and_grpo_refuse_an_out_another_run_is_writing(tmp_path, testbed_tokenizer, stage):
    from cft.grpo import grpo, grpo_configs
    from cft.train import train, train_configs
    from tests.test_train import make_tiny_model, write_labels

    model = str(make_tiny_model(tmp_path / "model", testbed_tokenizer))
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        with pytest.raises(ArtifactLockedError, match=rf"pid {holder.pid}\b"):
            if stage == "train":
                train(*train_configs(model=model, input=str(write_labels(tmp_path / "l.jsonl", testbed_tokenizer, 2)),
                                     out=str(out), max_steps=1))
            else:
                grpo(*grpo_configs(init=model, out=str(out), max_steps=1))
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()  # refused before anything was written


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=1, max_value=6))
def test_resume_from_any_truncation_point_gives_the_same_bytes(tmp_path_factory, cut, batch):
    """A kill can stop the partial file at any byte; whatever survives, the resumed artifact is the same."""
    tmp = tmp_path_factory.mktemp("cut")
    reference = finish(tmp / "ref.jsonl")
    out = tmp / "S.jsonl"
    w = ResumableWriter(out, "samples")
    for s in range(0, len(RECORDS), batch):
        w.write([dict(r) for r in RECORDS[s : s + batch]])
    w.close()
    partial = Path(str(out) + ".partial")
    partial.write_bytes(partial.read_bytes()[: cut % (partial.stat().st_size + 1)])
    assert finish(out) == reference
    assert not partial.exists()


def test_a_rerun_reuses_the_finished_output_and_decodes_only_what_is_new(tmp_path):
    """An experiment killed in stage B reruns stage A on the same out: the finished generations must count as done
    (they did not, and 1100 SmolLM2 responses were about to be decoded again)."""
    out = tmp_path / "S.jsonl"
    first = finish(out, RECORDS[:4])
    w = ResumableWriter(out, "samples")
    assert sorted(w.done) == ["k0", "k1", "k2", "k3"]
    new = [dict(r) for r in RECORDS if r["key"] not in w.done]
    assert [r["key"] for r in new] == ["k4", "k5"]
    w.write(new)
    w.finalize([r["key"] for r in RECORDS], {"n": len(RECORDS)})
    assert out.read_bytes() == finish(tmp_path / "ref.jsonl")
    assert out.read_bytes().startswith(first)


def test_generate_rerun_on_its_own_output_decodes_nothing(tmp_path, monkeypatch):
    import cft.generate as generate_mod
    out = tmp_path / "g.jsonl"
    assert main(["generate", "--model", "testbed", "--data", "testbed:train", "--limit", "6", "--out", str(out)]) == 0
    before = out.read_bytes()
    calls = []
    real = generate_mod.decode_outputs
    monkeypatch.setattr(generate_mod, "decode_outputs", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert main(["generate", "--model", "testbed", "--data", "testbed:train", "--limit", "6", "--out", str(out)]) == 0
    assert out.read_bytes() == before
    assert all(not groups for _, _, groups, *_ in calls)


def test_a_partial_of_another_schema_is_kept_aside_not_cut(tmp_path, capsys):
    """A partial file written by another version of cft (another schema) used to be truncated to its last record
    of this schema, silently: 194 labelled SmolLM2 responses (two hours) were lost that way. Its bytes are kept."""
    out = tmp_path / "S.jsonl"
    partial = Path(str(out) + ".partial")
    old = [json.dumps({"schema": "cft.samples/0", "key": f"o{i}"}) + "\n" for i in range(3)]
    mine = json.dumps({"schema": artifacts.SCHEMAS["samples"], "key": "k0", "value": 0}) + "\n"
    partial.write_text(mine + "".join(old))
    w = ResumableWriter(out, "samples")
    assert list(w.done) == ["k0"]
    w.close()
    kept = list(tmp_path.glob("S.jsonl.partial.stale-*"))
    assert len(kept) == 1 and kept[0].read_text() == mine + "".join(old)
    assert "cft.samples/0" in capsys.readouterr().err
