"""Storage moves on one lab host, measured from the guest's side and from QEMU's block graph."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import LabHandle, files_under, needs_lab, serial_lines, wait_for, wait_job

from vmferry.client import FerryError
from vmferry.host.vms import socket_dir
from vmferry.lab.lab import start_probe
from vmferry.qemu.qmp import qmp_session

pytestmark = needs_lab
HOST = "h1"


def _root(lab: LabHandle) -> Path:
    return lab.lab.host_dir(HOST) / "storage"


def _make(lab: LabHandle, name: str, disk_mib: int = 128, fill_mib: int = 0,
          roles: str = "heartbeat,udpecho,tcpecho,disk", start: bool = True) -> str:  # fmt: skip
    ip = lab.guest_ip()
    with lab.client(HOST) as c:
        vm = c.create_vm({"name": name, "memory_mib": 192, "disks": [{"size_mib": disk_mib}],
                          "nics": [{"switch": "external"}],
                          "probe": {"ip": f"{ip}/24", "roles": roles.split(",")}})  # fmt: skip
        if fill_mib:
            disk = Path(vm["storage_dir"], vm["disks"][0]["file"])
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 64M {fill_mib}M",
                            str(disk)], check=True, capture_output=True, timeout=120)  # fmt: skip
        if start:
            c.action(name, "start")
    if start:
        lab.wait_guest(ip)
    return ip


def _remove(lab: LabHandle, name: str) -> None:
    with lab.client(HOST) as c:
        for j in c.migrations():
            if j["vm"] == name and j["state"] in ("queued", "running"):
                with contextlib.suppress(FerryError):
                    c.cancel_migration(j["id"])
                wait_job(lab, HOST, j["id"])
        if any(v["name"] == name for v in c.vms()):
            lab.remove_vm(HOST, name)


def _vm(lab: LabHandle, name: str) -> dict[str, Any]:
    with lab.client(HOST) as c:
        return c.vm(name)


def _disk_path(vm: dict[str, Any]) -> str:
    return os.path.normpath(Path(vm["storage_dir"], vm["disks"][0]["file"]))


def _graph_files(lab: LabHandle, vm: dict[str, Any]) -> set[str]:
    """Every file QEMU's block graph has open (through the free diagnostics QMP socket)."""
    sock = socket_dir(lab.lab.host_dir(HOST) / "state", vm["uuid"])

    async def query() -> set[str]:
        async with qmp_session(sock / "qmp-diag.sock") as q:
            nodes = await q.execute("query-named-block-nodes", {"flat": True})
        return {os.path.normpath(n["file"]) for n in nodes if n.get("drv") == "file"}

    return asyncio.run(query())


def _open_files(pid: int) -> set[str]:
    """Image files the QEMU process holds open (as the kernel sees them)."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if ".qcow2" in target:
            out.add(target)
    return out


def _move(lab: LabHandle, name: str, wait: bool = True, **request: Any) -> dict[str, Any]:
    with lab.client(HOST) as c:
        job = c.move_storage(name, request)
    return wait_job(lab, HOST, job["id"], timeout=300) if wait else job


def _verdicts(lab: LabHandle, host: str, name: str) -> int:
    """How many disk verdicts the guest printed so far (its console keeps every boot)."""
    return len(serial_lines(lab, host, name, "FERRY-DISK-VERIFY"))


def _check_verdict(lab: LabHandle, host: str, name: str, seen: int, acked: int) -> None:
    """Wait for the verdict of the boot after ``seen`` verdicts and check the writer's blocks."""
    lines = wait_for(
        lambda: (ls := serial_lines(lab, host, name, "FERRY-DISK-VERIFY"))[seen:] and ls,
        90, "the new boot's disk verdict",
    )  # fmt: skip
    m = re.search(r"last=(\d+) gaps=(\d+) corrupt=(\d+)", lines[seen])
    assert m, lines
    assert int(m.group(1)) >= acked and m.group(2) == "0" and m.group(3) == "0", lines[seen]


def _verify(lab: LabHandle, name: str, ip: str, acked: int) -> None:
    """Reboot the guest from its (moved) disk and check the writer's blocks."""
    seen = _verdicts(lab, HOST, name)
    with lab.client(HOST) as c:
        c.action(name, "stop")
        c.action(name, "start")
    lab.wait_guest(ip)
    _check_verdict(lab, HOST, name, seen, acked)


def test_running_vm_moves_under_disk_writer(lab: LabHandle) -> None:
    ip = _make(lab, "sm1")
    try:
        vm = _vm(lab, "sm1")
        old_disk, old_dir = _disk_path(vm), Path(vm["storage_dir"])
        new_dir = _root(lab) / "fast" / "sm1"
        wait_for(lambda: lab.stat(ip)["disk_ack"] > 200, 60, "disk writes")
        session = start_probe(lab.lab, "session", ip, duration=90)
        before = lab.stat(ip)
        job = _move(lab, "sm1", to=str(new_dir))
        assert job["state"] == "completed", job["error"]
        assert job["kind"] == "storage" and job["mode"] == "live"
        assert [p["phase"] for p in job["phases"]] == [
            "queued", "checks", "setup", "mirror", "switchover", "cleanup",
        ]  # fmt: skip
        after = lab.stat(ip)
        # The guest noticed nothing: same QEMU, no reboot, the writer kept acknowledging.
        moved = _vm(lab, "sm1")
        assert moved["state"] == "running" and moved["pid"] == vm["pid"]
        assert after["hb"] >= before["hb"] and after["disk_ack"] > before["disk_ack"]
        result = session.stop()
        assert result["ok"] and not result["reset"], result
        # QEMU's graph uses only the new file; the old files and folder are gone.
        new_disk = str(new_dir / "disk0.qcow2")
        assert moved["storage_dir"] == str(new_dir) and _disk_path(moved) == new_disk
        assert _graph_files(lab, moved) == {new_disk}
        assert _open_files(vm["pid"]) == {new_disk}
        assert not old_dir.exists() and not Path(old_disk).exists()
        assert json.loads((new_dir / "vm.json").read_text())["storage_dir"] == str(new_dir)
        _verify(lab, "sm1", ip, lab.stat(ip)["disk_ack"])
    finally:
        _remove(lab, "sm1")


def test_later_operations_find_the_pivoted_disk(lab: LabHandle) -> None:
    """After a pivot the disk's node has a new name: a second move, live migration's mirror
    (shared-nothing to h2) and shutdown must still find it."""
    ip = _make(lab, "sm2", disk_mib=64, roles="heartbeat,udpecho,tcpecho,disk,power")
    try:
        wait_for(lambda: lab.stat(ip)["disk_ack"] > 100, 60, "disk writes")
        first = _move(lab, "sm2", to=str(_root(lab) / "one"))
        assert first["state"] == "completed", first["error"]
        second = _move(lab, "sm2", disk_map={"disk0": str(_root(lab) / "two" / "d0.qcow2")})
        assert second["state"] == "completed", second["error"]
        vm = _vm(lab, "sm2")
        assert _graph_files(lab, vm) == {str(_root(lab) / "two" / "d0.qcow2")}
        assert not (_root(lab) / "one" / "disk0.qcow2").exists()
        ep = lab.lab.endpoint("h2")
        with lab.client(HOST) as c:
            job = c.move("sm2", {"destination": {"name": "h2", "url": ep.url}, "options": {}})
        live = wait_job(lab, HOST, job["id"])
        assert live["state"] == "completed" and live["mode"] == "shared-nothing", live["error"]
        acked = lab.stat(ip)["disk_ack"]
        assert not (_root(lab) / "two" / "d0.qcow2").exists()
        seen = _verdicts(lab, "h2", "sm2")
        with lab.client("h2") as c:
            c.action("sm2", "shutdown", timeout=30)
            c.action("sm2", "start")
        lab.wait_guest(ip)
        _check_verdict(lab, "h2", "sm2", seen, acked)
    finally:
        _remove(lab, "sm2")
        with lab.client("h2") as c:
            if any(v["name"] == "sm2" for v in c.vms()):
                lab.remove_vm("h2", "sm2")


def test_cancel_mid_mirror_keeps_old_files(lab: LabHandle) -> None:
    ip = _make(lab, "sm3", disk_mib=256, fill_mib=128, roles="heartbeat,udpecho,tcpecho")
    try:
        vm = _vm(lab, "sm3")
        old_disk = _disk_path(vm)
        new_dir = _root(lab) / "slow" / "sm3"
        job = _move(lab, "sm3", wait=False, to=str(new_dir), bandwidth_mbps=40)
        with lab.client(HOST) as c:
            wait_for(lambda: (j := c.migration(job["id"]))["phase"] == "mirror"
                     and j["progress"]["disk_transferred"] > 0, 60, "mirror")  # fmt: skip
            assert _graph_files(lab, vm) == {old_disk, str(new_dir / "disk0.qcow2")}
            c.cancel_migration(job["id"])
        done = wait_job(lab, HOST, job["id"])
        assert done["state"] == "cancelled" and done["error"]["phase"] == "mirror", done
        after = _vm(lab, "sm3")
        assert after["state"] == "running" and after["pid"] == vm["pid"]
        assert after["storage_dir"] == vm["storage_dir"] and _disk_path(after) == old_disk
        assert _graph_files(lab, after) == {old_disk}
        assert _open_files(vm["pid"]) == {old_disk}
        assert not new_dir.exists(), "partial copies left behind"
        assert lab.probe("tcp", ip, count=3)["echoed"] == 3
    finally:
        _remove(lab, "sm3")


def _ferry(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "vmferry.cli.main", "--host", HOST, *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=dict(os.environ))


def test_stopped_vm_move_with_verify_through_cli(lab: LabHandle) -> None:
    ip = _make(lab, "sm4", disk_mib=64)
    try:
        acked = wait_for(lambda: (a := lab.stat(ip)["disk_ack"]) > 200 and a, 60, "disk writes")
        with lab.client(HOST) as c:
            c.action("sm4", "stop")
        seen = _verdicts(lab, HOST, "sm4")
        vm = _vm(lab, "sm4")
        new_dir = _root(lab) / "cold" / "sm4"
        r = _ferry("move-storage", "sm4", "--to", str(new_dir), "--output", "json")
        assert r.returncode == 0, r.stderr
        job = json.loads(r.stdout)
        assert job["state"] == "completed" and job["mode"] == "offline", job
        assert not Path(vm["storage_dir"]).exists()
        moved = _vm(lab, "sm4")
        assert moved["state"] == "off" and moved["storage_dir"] == str(new_dir)
        listed = json.loads(_ferry("migration", "list", "--output", "json").stdout)
        assert any(j["id"] == job["id"] and j["kind"] == "storage" for j in listed)
        with lab.client(HOST) as c:
            c.action("sm4", "start")
        lab.wait_guest(ip)
        _check_verdict(lab, HOST, "sm4", seen, acked)
    finally:
        _remove(lab, "sm4")


def test_saved_vm_state_moves_and_restores(lab: LabHandle) -> None:
    ip = _make(lab, "sm5", disk_mib=32, roles="heartbeat,udpecho,tcpecho")
    try:
        before = lab.stat(ip)
        with lab.client(HOST) as c:
            c.action("sm5", "save")
        vm = _vm(lab, "sm5")
        states = _root(lab) / "states" / "sm5"
        job = _move(lab, "sm5", to=str(_root(lab) / "saved" / "sm5"), state_to=str(states))
        assert job["state"] == "completed", job["error"]
        assert (states / "saved.vmstate").exists()
        assert not Path(vm["storage_dir"]).exists()
        with lab.client(HOST) as c:
            assert c.vm("sm5")["state"] == "saved"
            c.action("sm5", "restore")
        after = lab.wait_guest(ip)
        assert after["hb"] >= before["hb"], "the guest rebooted instead of resuming"
        assert not (states / "saved.vmstate").exists(), "restore did not consume the state"
    finally:
        _remove(lab, "sm5")


REFUSED = [
    ({"to": "/tmp/vmferry-outside"}, "to"),
    ({"disk_map": {"nosuch": "x.qcow2"}}, "disk_map.nosuch"),
    ({"disk_map": {"disk0": "/var/tmp/x.qcow2"}}, "disk_map.disk0"),
]


def test_refusals_change_nothing(lab: LabHandle) -> None:
    ip = _make(lab, "sm6", disk_mib=16, roles="heartbeat,udpecho,tcpecho")
    try:
        vm = _vm(lab, "sm6")
        before = files_under(_root(lab))
        with lab.client(HOST) as c:
            jobs_before = c.migrations()
            for request, field in REFUSED:
                with pytest.raises(FerryError) as err:
                    c.move_storage("sm6", request)
                assert err.value.field == field and err.value.fix, err.value
            assert c.migrations() == jobs_before
        assert files_under(_root(lab)) == before
        assert not Path("/tmp/vmferry-outside").exists()
        after = _vm(lab, "sm6")
        assert after["pid"] == vm["pid"] and after["state"] == "running"
        assert _graph_files(lab, after) == {_disk_path(vm)}
        assert lab.probe("tcp", ip, count=2)["echoed"] == 2
        r = _ferry("move-storage", "sm6", "--disk-map", "nosuch=/x")
        assert r.returncode == 1 and "no disk named 'nosuch'" in r.stderr and "disk0" in r.stderr
    finally:
        _remove(lab, "sm6")
