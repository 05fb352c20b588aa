"""Live moves between two lab hosts, measured from the guest's side."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    LabHandle,
    cleanup_vms,
    move,
    needs_lab,
    serial_lines,
    start_stuck_move,
    vm_names,
    wait_for,
    wait_job,
)

from vmferry.lab import net
from vmferry.lab.lab import start_probe
from vmferry.procinfo import pid_state

pytestmark = needs_lab


def _alive(pid: int) -> bool:
    """True while the process runs (a zombie waiting to be reaped does not count)."""
    return pid_state(pid) not in (None, "Z", "X")


def _shared(lab: LabHandle, name: str) -> str:
    return str(lab.lab.shared_dir / name)


def _make(lab: LabHandle, host: str, name: str, shared: bool = False, **kw: object) -> str:
    ip = lab.guest_ip()
    roles = str(kw.pop("roles", "heartbeat,udpecho,tcpecho"))
    if "dirty" in kw:
        roles += ",dirty"
    spec: dict[str, object] = {
        "name": name,
        "memory_mib": kw.pop("memory", 256),
        "disks": [{"size_mib": kw.pop("disk_mib", 64)}],
        "nics": [{"switch": kw.pop("switch", "external")}],
        "probe": {"ip": f"{ip}/24",
                  "roles": roles.split(","),
                  **({"dirty": kw.pop("dirty")} if "dirty" in kw else {})},
    }  # fmt: skip
    if shared:
        spec["storage_dir"] = _shared(lab, name)
    with lab.client(host) as c:
        c.create_vm(spec)
        c.action(name, "start")
    lab.wait_guest(ip)
    return ip


def test_shared_storage_move_keeps_tcp_session(lab: LabHandle) -> None:
    ip = _make(lab, "h1", "live1", shared=True)
    try:
        with lab.client("h1") as c:
            src = c.vm("live1")
        session = start_probe(lab.lab, "session", ip, duration=60)
        before = lab.stat(ip)
        job = move(lab, "h1", "live1", "h2")
        assert job["state"] == "completed", job["error"]
        assert job["mode"] == "shared"
        assert [p["phase"] for p in job["phases"]] == [
            "queued", "checks", "setup", "precopy", "switchover", "resume", "announce", "cleanup",
        ]  # fmt: skip
        after = lab.stat(ip)
        assert after["hb"] >= before["hb"], "the guest rebooted"
        result = session.stop()
        assert result["ok"] and not result["reset"], result
        assert result["lines"] > 10
        # The VM runs exactly once: on h2; the source QEMU is gone, the files stay (shared).
        assert vm_names(lab, "h1") == [] and vm_names(lab, "h2") == ["live1"]
        assert not _alive(src["pid"])
        assert Path(_shared(lab, "live1"), "disk0.qcow2").exists()
    finally:
        cleanup_vms(lab, "live1")


def test_shared_nothing_move_with_disk_writer(lab: LabHandle) -> None:
    ip = _make(lab, "h1", "sn1", roles="heartbeat,udpecho,tcpecho,disk", disk_mib=128)
    try:
        with lab.client("h1") as c:
            src = c.vm("sn1")
        src_dir = Path(src["storage_dir"])
        wait_for(lambda: lab.stat(ip)["disk_ack"] > 200, 60, "disk writes")
        session = start_probe(lab.lab, "session", ip, duration=60)
        job = move(lab, "h1", "sn1", "h2")
        assert job["state"] == "completed", job["error"]
        assert job["mode"] == "shared-nothing"
        assert "mirror" in [p["phase"] for p in job["phases"]]
        acked = lab.stat(ip)["disk_ack"]
        assert session.stop()["ok"]
        assert not src_dir.exists(), "source files were not deleted"
        assert not _alive(src["pid"])
        with lab.client("h2") as c:
            moved = c.vm("sn1")
            assert moved["state"] == "running"
            assert Path(moved["storage_dir"]).is_relative_to(lab.lab.host_dir("h2"))
            c.action("sn1", "stop")
            c.action("sn1", "start")
        lab.wait_guest(ip)
        line = wait_for(lambda: serial_lines(lab, "h2", "sn1", "FERRY-DISK-VERIFY"), 30, "verify")
        m = re.search(r"last=(\d+) gaps=(\d+) corrupt=(\d+)", line[-1])
        assert m, line
        assert int(m.group(1)) >= acked and m.group(2) == "0" and m.group(3) == "0", line[-1]
    finally:
        cleanup_vms(lab, "sn1")


@pytest.mark.slow
def test_twenty_round_trips_one_session(lab: LabHandle) -> None:
    ip = _make(lab, "h1", "pingpong", shared=True)
    try:
        session = start_probe(lab.lab, "session", ip, duration=600)
        here, there = "h1", "h2"
        for i in range(20):
            job = move(lab, here, "pingpong", there)
            assert job["state"] == "completed", (i, job["error"])
            here, there = there, here
        result = session.stop()
        assert result["ok"] and not result["reset"], result
        assert vm_names(lab, here) == ["pingpong"] and vm_names(lab, there) == []
    finally:
        cleanup_vms(lab, "pingpong")


def _assert_back_on_source(lab: LabHandle, name: str, ip: str, src_pid: int) -> None:
    # The same QEMU process runs the VM on the source. After a cut link its monitor may need
    # a moment to answer again (QEMU's stream was blocked), hence the bounded waits.
    def running() -> dict[str, Any] | None:
        with lab.client("h1") as c:
            vm = c.vm(name)
        return vm if vm["state"] == "running" else None

    vm = wait_for(running, 30, f"{name} to run on h1 again")
    assert vm["pid"] == src_pid, "the source VM was restarted, not kept"
    wait_for(lambda: lab.probe("tcp", ip, count=3)["echoed"] == 3, 30, "the guest to answer")
    # The source asks the destination to drop its skeleton VM; when that first request fails
    # (an agent busy with a dying QEMU), it asks again every 2 s (engine._abort_later).
    wait_for(lambda: name not in vm_names(lab, "h2"), 20, "the destination to drop the VM")
    leftovers = list((lab.lab.host_dir("h2") / "storage").glob(f"{name}*"))
    assert leftovers == [], leftovers


def test_cancel_during_precopy(lab: LabHandle) -> None:
    ip = _make(lab, "h1", "cancel1", dirty="64M@0:full")
    try:
        pid, job = start_stuck_move(lab, "cancel1")
        with lab.client("h1") as c:
            c.cancel_migration(job["id"])
        done = wait_job(lab, "h1", job["id"])
        assert done["state"] == "cancelled", done
        _assert_back_on_source(lab, "cancel1", ip, pid)
    finally:
        cleanup_vms(lab, "cancel1")


def _fill_disk(lab: LabHandle, host: str, name: str, mib: int) -> None:
    with lab.client(host) as c:
        vm = c.vm(name)
    path = Path(vm["storage_dir"], vm["disks"][0]["file"])
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {mib}M", str(path)],
                   check=True, capture_output=True, timeout=120)  # fmt: skip


def test_cancel_during_mirror(lab: LabHandle) -> None:
    ip = lab.guest_ip()
    with lab.client("h1") as c:
        c.create_vm({"name": "cancel2", "memory_mib": 128, "disks": [{"size_mib": 256}],
                     "nics": [{"switch": "external"}], "probe": {"ip": f"{ip}/24"}})  # fmt: skip
    try:
        _fill_disk(lab, "h1", "cancel2", 128)
        with lab.client("h1") as c:
            pid = c.action("cancel2", "start")["pid"]
        lab.wait_guest(ip)
        net.set_link_rate(lab.topo, "h1", "50mbit")
        try:
            job = move(lab, "h1", "cancel2", "h2", wait=False)
            with lab.client("h1") as c:
                wait_for(lambda: c.migration(job["id"])["phase"] == "mirror", 60, "mirror")
                c.cancel_migration(job["id"])
            done = wait_job(lab, "h1", job["id"])
        finally:
            net.set_link_rate(lab.topo, "h1", None)
        assert done["state"] == "cancelled", done
        _assert_back_on_source(lab, "cancel2", ip, pid)
    finally:
        cleanup_vms(lab, "cancel2")


def test_destination_qemu_killed(lab: LabHandle) -> None:
    ip = _make(lab, "h1", "victim", dirty="64M@0:full")
    try:
        pid, job = start_stuck_move(lab, "victim")
        with lab.client("h2") as c:
            dest_pid = c.vm("victim")["pid"]
        assert dest_pid and dest_pid != pid
        os.kill(dest_pid, 9)
        done = wait_job(lab, "h1", job["id"])
        assert done["state"] == "failed" and done["error"]["phase"] == "precopy", done
        _assert_back_on_source(lab, "victim", ip, pid)
    finally:
        cleanup_vms(lab, "victim")


def test_migration_link_cut(lab: LabHandle) -> None:
    ip = _make(lab, "h1", "cut1", dirty="64M@0:full")
    h2 = lab.topo.host("h2")
    try:
        pid, job = start_stuck_move(lab, "cut1", stall_timeout_s=5)
        subprocess.run(["ip", "-n", h2.netns, "link", "set", h2.migration_if, "down"], check=True)
        try:
            done = wait_job(lab, "h1", job["id"], timeout=120)
        finally:
            subprocess.run(["ip", "-n", h2.netns, "link", "set", h2.migration_if, "up"],
                           check=True)  # fmt: skip
        assert done["state"] == "failed", done
        assert "no progress" in done["error"]["message"] or "failed" in done["error"]["message"]
        _assert_back_on_source(lab, "cut1", ip, pid)
    finally:
        cleanup_vms(lab, "cut1")
