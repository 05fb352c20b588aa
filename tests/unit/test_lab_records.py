"""LabRecords journal and pid helpers (no root needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from vmferry.lab.records import LabRecords, pid_matches, pid_start_time, pid_state


def test_round_trip(tmp_path: Path) -> None:
    rec = LabRecords(tmp_path / "lab")
    assert rec.entries() == []
    rec.add("netns", name="vflabcd-h1")
    rec.add("link", name="vflabcdm", netns="")
    rec.add("pid", pid=123, start_time=456, what="agent h1")
    rec.add("dir", path="/tmp/x")
    assert rec.entries() == [
        {"kind": "netns", "name": "vflabcd-h1"},
        {"kind": "link", "name": "vflabcdm", "netns": ""},
        {"kind": "pid", "pid": 123, "start_time": 456, "what": "agent h1"},
        {"kind": "dir", "path": "/tmp/x"},
    ]
    # A fresh object (e.g. after a crash) sees the same journal.
    assert LabRecords(tmp_path / "lab").entries() == rec.entries()
    assert (tmp_path / "lab" / "records.jsonl").is_file()


def test_torn_last_line_is_skipped(tmp_path: Path) -> None:
    rec = LabRecords(tmp_path)
    rec.add("netns", name="a")
    with open(rec.path, "a") as f:
        f.write('{"kind": "netns", "na')
    assert rec.entries() == [{"kind": "netns", "name": "a"}]


def test_clear(tmp_path: Path) -> None:
    rec = LabRecords(tmp_path)
    rec.add("dir", path="/x")
    rec.clear()
    assert rec.entries() == []
    rec.clear()  # idempotent
    rec.add("dir", path="/y")
    assert rec.entries() == [{"kind": "dir", "path": "/y"}]


def test_pid_helpers() -> None:
    me = os.getpid()
    start = pid_start_time(me)
    assert start is not None and start > 0
    assert pid_matches(me, start)
    assert not pid_matches(me, start + 1)
    assert pid_state(me) in ("R", "S")
    assert pid_start_time(0) is None
    assert pid_start_time(2**22 + 12345) is None  # above pid_max
    assert not pid_matches(2**22 + 12345, 1)


def test_pid_start_time_with_odd_comm(tmp_path: Path) -> None:
    # A comm containing spaces and ')' must not shift the fields.
    exe = tmp_path / "a b) c"
    exe.symlink_to("/bin/sleep")
    proc = subprocess.Popen([str(exe), "5"])
    try:
        start = pid_start_time(proc.pid)
        assert start is not None
        assert pid_state(proc.pid) in ("R", "S")
        assert start >= (pid_start_time(os.getpid()) or 0)
    finally:
        proc.kill()
        proc.wait()
