"""`ferry lab down` removes everything the lab made, also after a killed `ferry lab up`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import needs_lab, wait_for
from pyroute2 import IPRoute, netns

from vmferry.lab import Lab
from vmferry.lab.records import LabRecords, pid_matches, pid_state
from vmferry.qemu.process import QemuProcess

pytestmark = needs_lab

FERRY = [sys.executable, "-m", "vmferry.cli.main"]


def _records(lab_dir: Path) -> list[dict[str, Any]]:
    return LabRecords(lab_dir).entries() if lab_dir.exists() else []


def _assert_gone(entries: list[dict[str, Any]], qemus: list[QemuProcess]) -> None:
    present = set(netns.listnetns())
    with IPRoute() as ipr:
        for e in entries:
            if e["kind"] == "netns":
                assert e["name"] not in present, f"namespace {e['name']} left behind"
            elif e["kind"] == "link" and not e.get("netns"):
                assert not ipr.link_lookup(ifname=e["name"]), f"link {e['name']} left behind"
            elif e["kind"] == "pid" and e.get("start_time"):
                pid, start = int(e["pid"]), int(e["start_time"])
                # A zombie waiting for its (re)parent to reap it is not running.
                assert not pid_matches(pid, start) or pid_state(pid) in ("Z", "X"), e
    for q in qemus:
        assert not q.alive(), f"QEMU {q.pid} left running"


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "FERRY_CONFIG": str(tmp_path / "client.json")}


def test_down_after_killed_up(tmp_path: Path) -> None:
    lab_dir = tmp_path / "lab"
    up = subprocess.Popen(
        [*FERRY, "lab", "up", "--hosts", "2", "--dir", str(lab_dir)],
        env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # Kill it in the middle: after the first agent was spawned, before the lab is up.
        wait_for(lambda: any(e["kind"] == "pid" for e in _records(lab_dir)), 60, "an agent spawn")
    finally:
        up.send_signal(signal.SIGKILL)
        up.wait(10)
    entries = _records(lab_dir)
    assert any(e["kind"] == "netns" for e in entries)
    down = subprocess.run(
        [*FERRY, "lab", "down", "--dir", str(lab_dir)],
        env=_env(tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert down.returncode == 0, down.stderr
    _assert_gone(entries, [])


def test_down_after_agent_crash_kills_vms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Scoped to this test: the session lab's tests read FERRY_CONFIG too.
    monkeypatch.setenv("FERRY_CONFIG", str(tmp_path / "client.json"))
    lab = Lab(tmp_path / "lab")
    lab.up(1)
    try:
        topo = lab.topology()
        with lab.client("h1") as c:
            c.create_vm(
                {"name": "orphan", "memory_mib": 128, "nics": [{"switch": "external"}],
                 "probe": {"ip": f"{topo.guest_ip(1)}/24"}}
            )  # fmt: skip
            vm = c.action("orphan", "start")
        qemu = QemuProcess(
            vm["pid"],
            int(Path(f"/proc/{vm['pid']}/stat").read_text().rsplit(")", 1)[1].split()[19]),
        )
        assert qemu.alive()
        lab.kill_agent("h1")
        entries = _records(lab.dir)
    finally:
        removed = lab.down()
    assert any(r.startswith("qemu ") for r in removed)
    wait_for(lambda: not qemu.alive(), 10, "QEMU to be gone")
    _assert_gone(entries, [qemu])
    assert not (lab.dir / "lab.json").exists()
