"""Progress in a log file: a timed plain line (done/total, tokens/s, elapsed, ETA), never a bar or a raw dict."""

from __future__ import annotations

import re
import time

import pytest

from cft import progress as progress_mod
from cft.progress import Progress, progress_seconds

LINE = re.compile(r"eval: (\d+)/10 resp \(\d+%\), \d+ tok/s, elapsed \d\d:\d\d, (ETA \d\d:\d\d|done)")


def test_a_log_gets_timed_lines_with_rate_and_eta(capsys):
    with Progress("eval", total=10, unit="resp", bar=False, seconds=0.01) as p:
        p.advance(4, tokens=400)
        deadline = time.time() + 30
        while p.lines < 2 and time.time() < deadline:
            time.sleep(0.01)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 3 and all(LINE.fullmatch(line) for line in lines), lines
    assert lines[0].startswith("eval: 4/10") and "ETA" in lines[0] and "?" not in lines[0]
    assert lines[-1].startswith("eval: 4/10")  # the closing line


def test_eta_is_the_pace_of_this_run_and_resumed_items_do_not_count(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(progress_mod.time, "time", lambda: now[0])
    p = Progress("train", total=10, unit="step", bar=False, seconds=3600, initial=4)
    assert p.line() == "train: 4/10 step (40%), elapsed 00:00, ETA ?"
    now[0] += 60
    p.advance(2, tokens=600)  # 2 steps in 60 s: the 4 left take 2 minutes
    assert p.line() == "train: 6/10 step (60%), 10 tok/s, elapsed 01:00, ETA 02:00"
    p.advance(4)
    assert p.line().endswith("done")
    p.close()


def test_before_any_item_is_done_the_eta_is_the_token_budget_bound(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(progress_mod.time, "time", lambda: now[0])
    p = Progress("eval", total=48, unit="resp", bar=False, seconds=3600, max_tokens=48 * 256)
    assert p.line() == "eval: 0/48 resp (0%), 0 tok/s, elapsed 00:00, ETA ?"
    now[0] += 30
    p.advance(0, tokens=3000)  # 100 tok/s; at most 12288 - 3000 tokens left
    assert p.line() == "eval: 0/48 resp (0%), 100 tok/s, elapsed 00:30, ETA <= 01:32"
    p.advance(12)  # then the items' own pace: 12 in 30 s, 36 left
    assert p.line() == "eval: 12/48 resp (25%), 100 tok/s, elapsed 00:30, ETA 01:30"
    now[0] += 600
    p.advance(1)  # 13 in 10:30: the pace says 28:16 for the 35 left; their budget at 5 tok/s, 31:22 at most
    assert p.line() == "eval: 13/48 resp (27%), 5 tok/s, elapsed 10:30, ETA 28:16"
    p.close()


def test_a_short_job_prints_nothing_in_a_log(capsys):
    with Progress("generate", total=3, bar=False, seconds=3600) as p:
        p.advance(3)
    assert capsys.readouterr().err == ""


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("CFT_PROGRESS_SECONDS", "12.5")
    assert progress_seconds() == 12.5
    monkeypatch.setenv("CFT_PROGRESS_SECONDS", "0")
    with pytest.raises(ValueError, match="CFT_PROGRESS_SECONDS must be a positive number of seconds, not '0'"):
        progress_seconds()
