"""Process helpers in the root namespace (netns=None; no root needed)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from vmferry.lab.procs import run_in_netns, spawn_in_netns, stop_pid
from vmferry.lab.records import LabRecords, pid_matches, pid_start_time


def test_spawn_records_and_stop(tmp_path: Path) -> None:
    rec = LabRecords(tmp_path)
    log = tmp_path / "logs" / "sleeper.log"
    pid = spawn_in_netns(rec, None, ["sh", "-c", "echo started; exec sleep 30"], log, "sleeper")
    try:
        [entry] = rec.entries()
        assert entry["kind"] == "pid" and entry["pid"] == pid and entry["what"] == "sleeper"
        assert entry["start_time"] == pid_start_time(pid)
        deadline = time.monotonic() + 5
        while "started" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "started" in log.read_text()
        # A wrong start time (a "recycled" pid) is never signalled.
        assert stop_pid(pid, entry["start_time"] + 1) is False
        assert stop_pid(pid, None) is False
        assert pid_matches(pid, entry["start_time"])
        assert stop_pid(pid, entry["start_time"], timeout=5) is True
        assert not pid_matches(pid, entry["start_time"])
        assert stop_pid(pid, entry["start_time"]) is False
    finally:
        stop_pid(pid, pid_start_time(pid))


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    rec = LabRecords(tmp_path)
    pid = spawn_in_netns(
        rec, None, ["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"], tmp_path / "l", "x"
    )
    start = rec.entries()[0]["start_time"]
    time.sleep(0.2)  # let the shell install its trap
    t0 = time.monotonic()
    assert stop_pid(pid, start, timeout=0.5) is True
    assert time.monotonic() - t0 < 5


def test_run_in_netns_rejects_bad_names() -> None:
    for bad in ("", "-n", "a/b"):
        with pytest.raises(ValueError):
            run_in_netns(bad, ["true"], timeout=5)
