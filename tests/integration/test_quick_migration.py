"""Quick migration and ``vm import`` between two lab hosts sharing a volume, with real guests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import (
    LabHandle,
    cleanup_vms,
    move,
    needs_lab,
    serial_lines,
    vm_names,
    wait_for,
)

from vmferry.client import FerryError
from vmferry.lab.lab import start_probe
from vmferry.lab.probe import outages
from vmferry.procinfo import pid_state

pytestmark = needs_lab

QUICK_PHASES = ["queued", "checks", "switchover", "resume", "cleanup"]


def _alive(pid: int) -> bool:
    return pid_state(pid) not in (None, "Z", "X")


def ferry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", *args],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )  # fmt: skip


def _shared_vm(lab: LabHandle, name: str, start: bool = True, memory: int = 256) -> str:
    """A probe VM on h1 with every file on the lab's shared volume; returns its address."""
    ip = lab.guest_ip()
    spec: dict[str, Any] = {
        "name": name, "memory_mib": memory, "disks": [{"size_mib": 32}],
        "nics": [{"switch": "external"}], "storage_dir": str(lab.lab.shared_dir / name),
        "probe": {"ip": f"{ip}/24", "roles": ["heartbeat", "udpecho", "tcpecho"]},
    }  # fmt: skip
    with lab.client("h1") as c:
        c.create_vm(spec)
        if start:
            c.action(name, "start")
    if start:
        lab.wait_guest(ip)
    return ip


def _files(folder: Path) -> dict[str, bytes]:
    """Every file in a VM folder with its bytes (for nothing-changed assertions)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _owner(folder: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "owner.json").read_text())
    return data


def _hb(lines: list[str]) -> list[int]:
    return [int(ln.split()[1]) for ln in lines]


def test_quick_move_of_a_running_vm(lab: LabHandle) -> None:
    ip = _shared_vm(lab, "quick1")
    folder = lab.lab.shared_dir / "quick1"
    try:
        with lab.client("h1") as c:
            src = c.vm("quick1")
        assert len(serial_lines(lab, "h1", "quick1", "FERRY-READY")) == 1
        before = lab.stat(ip)
        session = start_probe(lab.lab, "session", ip, duration=90)
        blackout = start_probe(lab.lab, "blackout", ip, duration=90, interval_ms=1)
        r = ferry("--host", "h1", "move", "quick1", "--to", "h2", "--quick", "--output", "json")
        assert r.returncode == 0, r.stderr
        job = json.loads(r.stdout)
        time.sleep(2)  # the echo stream sees the guest answer again
        bo = blackout.stop()
        tcp = session.stop()
        after = wait_for(lambda: lab.stat(ip), 30, "the guest to answer on h2")
        assert job["state"] == "completed", job["error"]
        assert job["kind"] == "quick" and job["vm_state"] == "running"
        assert [p["phase"] for p in job["phases"]] == QUICK_PHASES
        assert job["qemu_downtime_ms"] is None and job["downtime_ms"] > 0
        assert job["bytes_sent"] > 0  # the state file
        # The guest resumed where it was: its counter went on, it did not boot again on h2.
        assert after["hb"] > before["hb"], (before, after)
        hb_h2 = _hb(serial_lines(lab, "h2", "quick1", "FERRY-HB"))
        assert hb_h2 and hb_h2[0] > before["hb"], (before, hb_h2[:3])
        assert serial_lines(lab, "h2", "quick1", "FERRY-READY") == []
        # One outage (gaps over 100 ms less than 250 ms apart count as one), about as long as
        # the job reports (the guest also waits for the switch to learn its new port).
        assert bo["ok"], bo
        found = outages(bo["gaps"])
        assert len(found) == 1, bo["gaps"]
        gap, downtime = found[0][1], job["downtime_ms"]
        assert 0.5 * downtime <= gap <= downtime + 1500, (gap, downtime)
        # The TCP session lived through it.
        assert tcp["ok"] and not tcp["reset"], tcp
        # The VM runs once: on h2; the source QEMU is gone, the state file consumed.
        assert vm_names(lab, "h1") == [] and vm_names(lab, "h2") == ["quick1"]
        with lab.client("h2") as c:
            moved = c.vm("quick1")
        assert moved["state"] == "running" and moved["uuid"] == src["uuid"]
        assert not _alive(src["pid"])
        assert not (folder / "saved.vmstate").exists()
        assert _owner(folder)["host"] == "h2" and not _owner(folder)["released"]
        with lab.client("h1") as c:
            listed = [j for j in c.migrations() if j["id"] == job["id"]]
        assert listed and listed[0]["kind"] == "quick" and listed[0]["downtime_ms"] == downtime
    finally:
        cleanup_vms(lab, "quick1")


def test_quick_move_of_a_paused_vm_stays_paused(lab: LabHandle) -> None:
    ip = _shared_vm(lab, "quick2")
    try:
        before = lab.stat(ip)
        with lab.client("h1") as c:
            assert c.action("quick2", "pause")["state"] == "paused"
        r = ferry("--host", "h1", "move", "quick2", "--to", "h2", "--quick")
        assert r.returncode == 0, r.stderr
        text = " ".join(r.stdout.split())
        assert "quick move" in text and "no guest outage (the VM was paused)" in text, text
        with lab.client("h1") as c:
            job = c.migrations()[0]
        assert job["kind"] == "quick" and job["downtime_ms"] is None
        with lab.client("h2") as c:
            assert c.vm("quick2")["state"] == "paused"
            assert "error" in lab.probe("stat", ip, count=1, timeout=0.5), "a paused guest answered"
            assert c.action("quick2", "resume")["state"] == "running"
        after = wait_for(lambda: lab.stat(ip), 30, "the resumed guest")
        assert after["hb"] >= before["hb"], (before, after)
        assert serial_lines(lab, "h2", "quick2", "FERRY-READY") == []
    finally:
        cleanup_vms(lab, "quick2")


def test_quick_move_of_an_off_vm_changes_owner(lab: LabHandle) -> None:
    _shared_vm(lab, "quick3", start=False)
    folder = lab.lab.shared_dir / "quick3"
    try:
        disk = (folder / "disk0.qcow2").read_bytes()
        job = move(lab, "h1", "quick3", "h2", quick=True)
        assert job["state"] == "completed", job["error"]
        assert job["downtime_ms"] is None and job["bytes_sent"] == 0
        assert [p["phase"] for p in job["phases"]] == QUICK_PHASES
        assert vm_names(lab, "h1") == [] and vm_names(lab, "h2") == ["quick3"]
        with lab.client("h2") as c:
            assert c.vm("quick3")["state"] == "off"
        assert (folder / "disk0.qcow2").read_bytes() == disk
        assert _owner(folder)["host"] == "h2"
    finally:
        cleanup_vms(lab, "quick3")


def test_quick_move_refused_for_local_storage(lab: LabHandle) -> None:
    with lab.client("h1") as c:
        c.create_vm({"name": "quick4", "memory_mib": 64, "disks": [{"size_mib": 8}]})
    try:
        with lab.client("h1") as c:
            folder = Path(c.vm("quick4")["storage_dir"])
        before = _files(folder)
        job = move(lab, "h1", "quick4", "h2", quick=True)
        assert job["state"] == "failed" and job["error"]["phase"] == "checks", job
        assert "disk disk0" in job["error"]["message"], job["error"]
        assert "both hosts see" in job["error"]["fix"]
        assert vm_names(lab, "h1") == ["quick4"] and vm_names(lab, "h2") == []
        assert _files(folder) == before
    finally:
        cleanup_vms(lab, "quick4")


def test_import_refuses_a_vm_running_elsewhere(lab: LabHandle) -> None:
    ip = _shared_vm(lab, "imp1")
    folder = lab.lab.shared_dir / "imp1"
    try:
        with lab.client("h1") as c:
            pid = c.vm("imp1")["pid"]
        before = _files(folder)
        # Through the CLI: it passes the client config's hosts, so h2 asks the owner h1.
        r = ferry("--host", "h2", "vm", "import", str(folder))
        assert r.returncode == 1, r.stdout
        text = " ".join(r.stderr.split())  # rich wraps long lines
        assert "VM 'imp1' is running on h1" in text, text
        assert "field: path" in text and "--quick" in text
        # Without peers h2 cannot ask h1: QEMU's image lock refuses it.
        with lab.client("h2") as c:
            try:
                c.import_vm(str(folder))
                raise AssertionError("import of a running VM was accepted")
            except FerryError as exc:
                assert "image locked" in exc.message and "disk0" in exc.message, exc
                assert exc.field == "path"
        # Nothing changed: h2 has no VM, h1's guest runs on with the same QEMU, same files.
        assert vm_names(lab, "h2") == []
        with lab.client("h1") as c:
            vm = c.vm("imp1")
        assert vm["state"] == "running" and vm["pid"] == pid
        assert lab.probe("udp", ip, count=3)["received"] == 3
        assert _files(folder) == before
    finally:
        cleanup_vms(lab, "imp1")


def test_import_refuses_paths_outside_the_storage_roots(lab: LabHandle, tmp_path: Path) -> None:
    outside = tmp_path / "vm9"
    outside.mkdir()
    (outside / "vm.json").write_text("{}")
    for path in (str(outside), "/etc"):
        r = ferry("--host", "h2", "vm", "import", path, "--output", "json")
        assert r.returncode == 1
        text = " ".join(r.stderr.split())
        assert "outside this host's storage roots" in text and "field: path" in text, text
    assert vm_names(lab, "h2") == []
    assert sorted(p.name for p in outside.iterdir()) == ["vm.json"]


def test_quick_move_of_a_saved_vm_keeps_its_state(lab: LabHandle) -> None:
    """A saved VM changes owner with its state; started on the destination, it restores."""
    ip = _shared_vm(lab, "imp2")
    folder = lab.lab.shared_dir / "imp2"
    try:
        before = lab.stat(ip)
        with lab.client("h1") as c:
            assert c.action("imp2", "save")["state"] == "saved"
        job = move(lab, "h1", "imp2", "h2", quick=True)
        assert job["state"] == "completed", job["error"]
        with lab.client("h2") as c:
            assert c.vm("imp2")["state"] == "saved"
            assert (folder / "saved.vmstate").exists()
            assert c.action("imp2", "start")["state"] == "running"
        after = wait_for(lambda: lab.stat(ip), 30, "the restored guest")
        assert after["hb"] >= before["hb"]
    finally:
        cleanup_vms(lab, "imp2")
