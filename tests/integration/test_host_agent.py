"""The host agent runs real QEMU guests in the lab (TCG) and survives its own restarts."""

from __future__ import annotations

import os
import re
import ssl

import httpx
import pytest
from conftest import LabHandle, needs_lab, serial_lines, wait_for

from vmferry.client import ConflictError, FerryClient, HostEndpoint, RefusedError
from vmferry.procinfo import pid_start_time

pytestmark = needs_lab


def test_boot_echo_and_heartbeat(lab: LabHandle) -> None:
    vm, ip = lab.make_vm("h1", "boot1")
    try:
        assert vm["state"] == "running" and vm["pid"]
        first = lab.wait_guest(ip)
        udp = lab.probe("udp", ip, count=5)
        assert udp["received"] == 5, udp
        tcp = lab.probe("tcp", ip, count=5)
        assert tcp["echoed"] == 5, tcp
        later = wait_for(
            lambda: (s := lab.stat(ip)) and s["hb"] >= first["hb"] + 2 and s, 10, "heartbeat"
        )
        assert later["hb"] > first["hb"]
        assert serial_lines(lab, "h1", "boot1", "FERRY-READY")
    finally:
        lab.remove_vm("h1", "boot1")


def test_agent_restart_keeps_vm_and_reports_crash(lab: LabHandle) -> None:
    vm, ip = lab.make_vm("h1", "sticky")
    try:
        lab.wait_guest(ip)
        pid = vm["pid"]
        start = pid_start_time(pid)
        lab.lab.kill_agent("h1")
        # The VM does not notice the agent's death.
        assert lab.probe("udp", ip, count=3)["received"] == 3
        lab.lab.start_agent("h1")
        with lab.client("h1") as c:
            again = c.vm("sticky")
        assert again["state"] == "running"
        assert again["pid"] == pid and pid_start_time(pid) == start
        assert lab.probe("tcp", ip, count=3)["echoed"] == 3
        # A QEMU that dies under the agent is reported as crashed, not running.
        os.kill(pid, 9)
        with lab.client("h1") as c:
            wait_for(lambda: c.vm("sticky")["state"] == "crashed", 10, "crashed state")
    finally:
        lab.remove_vm("h1", "sticky")


def test_save_restore_continues_without_reboot(lab: LabHandle) -> None:
    _, ip = lab.make_vm("h2", "saver")
    try:
        lab.wait_guest(ip)
        before = wait_for(lambda: (s := lab.stat(ip)) and s["hb"] >= 4 and s, 20, "heartbeats")
        with lab.client("h2") as c:
            assert c.action("saver", "save")["state"] == "saved"
            assert lab.probe("udp", ip, count=2, timeout=0.3)["received"] == 0
            assert c.action("saver", "restore")["state"] == "running"
        after = lab.wait_guest(ip, timeout=20)
        # Same guest memory: the counter went on from where it was (a reboot restarts at 1).
        assert after["hb"] >= before["hb"]
        assert after["uptime_ms"] >= before["uptime_ms"]
        assert len(serial_lines(lab, "h2", "saver", "FERRY-READY")) == 1
    finally:
        lab.remove_vm("h2", "saver")


def test_pause_resume_and_acpi_shutdown(lab: LabHandle) -> None:
    _, ip = lab.make_vm("h1", "pauser")
    try:
        lab.wait_guest(ip)
        with lab.client("h1") as c:
            assert c.action("pauser", "pause")["state"] == "paused"
            assert lab.probe("udp", ip, count=2, timeout=0.3)["received"] == 0
            assert c.action("pauser", "resume")["state"] == "running"
            lab.wait_guest(ip, timeout=10)
            assert c.action("pauser", "shutdown", timeout=30)["state"] == "off"
        assert serial_lines(lab, "h1", "pauser", "FERRY-POWEROFF"), "guest did not see ACPI"
    finally:
        lab.remove_vm("h1", "pauser")


def test_disk_writer_survives_hard_stop(lab: LabHandle) -> None:
    _, ip = lab.make_vm("h2", "writer", roles="heartbeat,udpecho,disk", disk_mib=32)
    try:
        lab.wait_guest(ip)
        acked = wait_for(
            lambda: (s := lab.stat(ip)) and s["disk_ack"] >= 300 and s["disk_ack"], 60, "acks"
        )
        with lab.client("h2") as c:
            c.action("writer", "stop")  # pulls the plug: no flush from the guest
            c.action("writer", "start")
        lab.wait_guest(ip)
        verify = wait_for(
            lambda: serial_lines(lab, "h2", "writer", "FERRY-DISK-VERIFY")[1:],
            30,
            "the verifier after restart",
        )
        m = re.search(r"last=(\d+) gaps=(\d+) corrupt=(\d+)", verify[0])
        assert m, verify
        last, gaps, corrupt = (int(g) for g in m.groups())
        assert last >= acked, f"acknowledged {acked} but the disk holds only {last}"
        assert gaps == 0 and corrupt == 0, verify[0]
    finally:
        lab.remove_vm("h2", "writer")


def test_refusals_over_the_wire(lab: LabHandle) -> None:
    with lab.client("h1") as c:
        c.create_vm({"name": "dup", "memory_mib": 64})
        try:
            with pytest.raises(ConflictError) as exc:
                c.create_vm({"name": "dup", "memory_mib": 64})
            assert exc.value.field == "name"
            with pytest.raises(RefusedError) as exc2:
                c.create_vm({"name": "x1", "memory_mib": 64, "nics": [{"switch": "nope"}]})
            assert exc2.value.field == "nics[0].switch"
            with pytest.raises(RefusedError) as exc3:
                c.create_vm({"name": "x2", "memory_mib": 0})
            assert exc3.value.field == "memory_mib"
            assert [v["name"] for v in c.vms()] == ["dup"]
        finally:
            c.delete_vm("dup")


def test_missing_client_certificate_is_refused(lab: LabHandle) -> None:
    ep = lab.lab.endpoint("h1")
    ctx = ssl.create_default_context(cafile=ep.ca)
    r = httpx.get(f"{ep.url}/v1/vms", verify=ctx, timeout=10)
    assert r.status_code == 401
    assert "client certificate" in r.json()["error"]["message"]
    # And an agent's identity is checked by the client: the wrong CA fails the handshake.
    bad = HostEndpoint(url=ep.url, ca=ssl.get_default_verify_paths().cafile or ep.cert or "")
    with pytest.raises(Exception, match=r"reach|certificate|SSL"), FerryClient(bad) as c:
        c.health()
