"""Faults users meet: two runs writing one output, a full disk, SIGKILL during eval and train.

Each test injects the fault for real where it can (a second process, SIGKILL) and at the single write
call otherwise (ENOSPC), then checks the outcome a user sees and that the rerun finishes the same work.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import cft.artifacts as artifacts
from cft.artifacts import ArtifactLockedError, DiskFullError, ResumableWriter, load_records
from cft.cli import main
from tests.test_reliability import REPO, cli_env, complete_lines

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
    assert f"pid {holder.pid}" in capsys.readouterr().out
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
    """``cft generate`` (in-process) hits ENOSPC on its second batch; the same command then completes."""
    argv = ["generate", "--model", "testbed", "--device", "cpu", "--data", "testbed:train", "--limit", "6",
            "--batch-size", "2", "--max-new-tokens", "24"]
    assert main([*argv, "--out", str(tmp_path / "ref.jsonl")]) == 0
    fill_disk_after(monkeypatch, good_calls=1)
    out = tmp_path / "G.jsonl"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"cft generate: error: {out}: no space left on device; 2 finished records")
    assert complete_lines(Path(str(out) + ".partial")) == 2
    monkeypatch.setattr(artifacts, "_raw_write", os.write)
    assert main([*argv, "--out", str(out)]) == 0
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
