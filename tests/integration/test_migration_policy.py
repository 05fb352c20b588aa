"""Move policies in the lab: refusals, migration networks, the queue, transports, post-copy,
an agent restart in the middle of a move."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import (
    LabHandle,
    cleanup_vms,
    move,
    needs_lab,
    start_stuck_move,
    vm_names,
    wait_for,
    wait_job,
)

from vmferry.client import ConflictError, RefusedError
from vmferry.lab import net
from vmferry.lab.lab import start_probe
from vmferry.qemu.sockets import _getfd

pytestmark = needs_lab


def _make(lab: LabHandle, host: str, name: str, *, dirty: str | None = None,
          memory: int = 256, shared: bool = True, start: bool = True,
          switch: str = "external", postcopy: bool = True) -> str:  # fmt: skip
    ip = lab.guest_ip()
    roles = ["heartbeat", "udpecho", "tcpecho"] + (["dirty"] if dirty else [])
    spec: dict[str, Any] = {
        "name": name, "memory_mib": memory, "nics": [{"switch": switch}],
        "probe": {"ip": f"{ip}/24", "roles": roles, "dirty": dirty},
        "allow_postcopy": postcopy,
    }  # fmt: skip
    if shared:
        spec["storage_dir"] = str(lab.lab.shared_dir / name)
    with lab.client(host) as c:
        c.create_vm(spec)
        if start:
            c.action(name, "start")
    if start and switch == "external":
        lab.wait_guest(ip)
    return ip


@contextlib.contextmanager
def _settings(lab: LabHandle, host: str, **changes: Any) -> Iterator[None]:
    with lab.client(host) as c:
        before = c.settings()
        c.update_settings(**changes)
    try:
        yield
    finally:
        with lab.client(host) as c:
            c.update_settings(**{k: before[k] for k in changes})


def _mig(lab: LabHandle, host: str, **changes: Any) -> dict[str, Any]:
    with lab.client(host) as c:
        return {**c.settings()["migration"], **changes}


def test_refusals_name_the_problem(lab: LabHandle) -> None:
    with _settings(lab, "h1", switches={"external": {"bridge": "br-ext", "uplink": "uplink0"},
                                        "internal": {"bridge": "br-int"}}):  # fmt: skip
        ip = _make(lab, "h1", "ref1", switch="internal")
        try:
            # What-if changes nothing and says what is wrong.
            ep = lab.lab.endpoint("h2")
            with lab.client("h1") as c:
                plan = c.move("ref1", {"destination": {"name": "h2", "url": ep.url},
                                       "what_if": True})  # fmt: skip
            bad = {ch["name"]: ch for ch in plan["checks"] if not ch["ok"]}
            assert (
                set(bad) == {"virtual-switches"}
                and "internal" in bad["virtual-switches"]["message"]
            )
            assert "--switch-map" in bad["virtual-switches"]["fix"]
            job = move(lab, "h1", "ref1", "h2")
            assert job["state"] == "failed" and job["error"]["phase"] == "checks"
            assert "internal" in job["error"]["message"]
            assert vm_names(lab, "h2") == [] and vm_names(lab, "h1") == ["ref1"]
            # Destination refusals: migration disabled, not enough memory, name taken.
            with _settings(lab, "h2", migration=_mig(lab, "h2", enabled=False)):
                job = move(lab, "h1", "ref1", "h2", switch_map={"internal": "external"})
                assert "disabled" in job["error"]["message"]
            with _settings(lab, "h2", memory_reserve_mib=10_000_000):
                job = move(lab, "h1", "ref1", "h2", switch_map={"internal": "external"})
                assert "MiB needed" in job["error"]["message"]
            with lab.client("h2") as c:
                c.create_vm({"name": "ref1", "memory_mib": 64})
            try:
                job = move(lab, "h1", "ref1", "h2", switch_map={"internal": "external"})
                assert "already has a VM named 'ref1'" in job["error"]["message"]
            finally:
                with lab.client("h2") as c:
                    c.delete_vm("ref1")
            # The switch map makes it work.
            job = move(lab, "h1", "ref1", "h2", switch_map={"internal": "external"})
            assert job["state"] == "completed", job["error"]
            with lab.client("h2") as c:
                assert c.vm("ref1")["nics"][0]["switch"] == "external"
            lab.wait_guest(ip)  # on the external switch now: reachable from outside
        finally:
            cleanup_vms(lab, "ref1")
    # A VM that is off cannot be live-moved.
    _make(lab, "h1", "ref2", start=False)
    try:
        with pytest.raises(RefusedError, match="running or paused"):
            move(lab, "h1", "ref2", "h2")
    finally:
        cleanup_vms(lab, "ref2")


def test_migration_network_fallback_and_none(lab: LabHandle) -> None:
    h2 = lab.topo.host("h2")
    # An address h1 cannot reach (the VM network has no route from h1), on a veth inside h2
    # (this kernel has no dummy interfaces): listed first.
    unreachable = lab.topo.vm_cidr.rsplit(".", 1)[0] + ".199"
    run = ["ip", "-n", h2.netns]
    subprocess.run([*run, "link", "add", "fbtest0", "type", "veth", "peer", "name", "fbtest1"],
                   check=True)  # fmt: skip
    try:
        subprocess.run([*run, "addr", "add", f"{unreachable}/24", "dev", "fbtest0"], check=True)
        subprocess.run([*run, "link", "set", "fbtest0", "up"], check=True)
        _make(lab, "h1", "net1")
        try:
            nets = [lab.topo.vm_cidr, lab.topo.migration_cidr]
            with _settings(lab, "h2", migration=_mig(lab, "h2", networks=nets)):
                job = move(lab, "h1", "net1", "h2")
                assert job["state"] == "completed", job["error"]
                assert job["address"] == h2.migration_ip
            assert move(lab, "h2", "net1", "h1")["state"] == "completed"
            with _settings(lab, "h2", migration=_mig(lab, "h2", networks=[lab.topo.vm_cidr])):
                job = move(lab, "h1", "net1", "h2")
            assert job["state"] == "failed", job
            assert "no migration network available" in job["error"]["message"]
            assert unreachable in job["error"]["message"]
            assert vm_names(lab, "h1") == ["net1"] and vm_names(lab, "h2") == []
        finally:
            cleanup_vms(lab, "net1")
    finally:
        subprocess.run([*run, "link", "del", "fbtest0"], check=False)


def test_queue_runs_moves_one_at_a_time(lab: LabHandle) -> None:
    _make(lab, "h1", "q1", dirty="32M@1M")
    _make(lab, "h1", "q2")
    try:
        with _settings(lab, "h1", migration=_mig(lab, "h1", max_concurrent=1)):
            slow = move(lab, "h1", "q1", "h2", wait=False, policy="precopy", bandwidth_mbps=40)
            second = move(lab, "h1", "q2", "h2", wait=False)
            with lab.client("h1") as c:
                queued = c.migration(second["id"])
                assert queued["state"] == "queued" and queued["queue_position"] == 1, queued
                assert c.migration(slow["id"])["state"] == "running"
            a = wait_job(lab, "h1", slow["id"])
            b = wait_job(lab, "h1", second["id"])
        assert a["state"] == "completed" and b["state"] == "completed", (a["error"], b["error"])
        first_end = a["phases"][-1]["ended_at"]
        b_start = next(p["started_at"] for p in b["phases"] if p["phase"] == "checks")
        assert b_start >= first_end - 0.5, "the second move did not wait for the first"
    finally:
        cleanup_vms(lab, "q1", "q2")


@pytest.mark.parametrize("transport", ["compression", "multichannel"])
def test_transports(lab: LabHandle, transport: str) -> None:
    ip = _make(lab, "h1", f"tr-{transport}")
    try:
        session = start_probe(lab.lab, "session", ip, duration=60)
        job = move(lab, "h1", f"tr-{transport}", "h2", transport=transport, streams=3)
        assert job["state"] == "completed", job["error"]
        assert job["transport"] == transport
        assert session.stop()["ok"]
    finally:
        cleanup_vms(lab, f"tr-{transport}")


def test_auto_policy_escalates_to_postcopy(lab: LabHandle) -> None:
    ip = _make(lab, "h1", "busy1", dirty="128M@0:full", memory=512)
    try:
        session = start_probe(lab.lab, "session", ip, duration=120)
        job = move(lab, "h1", "busy1", "h2", bandwidth_mbps=300)
        assert job["state"] == "completed", job["error"]
        # whole pages of new data: the delta encoding was tried and judged useless
        assert job["postcopy_used"], job["escalations"]
        assert any("XBZRLE does not pay" in e for e in job["escalations"]), job["escalations"]
        assert session.stop()["ok"]
        lab.stat(ip)
    finally:
        cleanup_vms(lab, "busy1")


def test_auto_policy_xbzrle_where_it_pays(lab: LabHandle) -> None:
    """One byte per page changes: pre-copy finishes with deltas, no post-copy needed.

    The guest rewrites its 64 MB working set within every pass: at the lab link's rate
    (about 150 MB/s with TLS) it could never leave within a 200 ms downtime (about 30 MB
    could); as deltas it can (XBZRLE gets through 0.7-3.5 GB/s of dirty memory here)."""
    ip = _make(lab, "h1", "deltas1", dirty="64M@0")
    try:
        before = lab.stat(ip)
        session = start_probe(lab.lab, "session", ip, duration=120)
        job = move(lab, "h1", "deltas1", "h2", downtime_target_ms=200)
        assert job["state"] == "completed", job["error"]
        assert not job["postcopy_used"], job["escalations"]
        # The engine's verdict is "pays", or QEMU switched over before it was due (a pass
        # that happened to fit); never "does not pay". The deltas themselves are checked below.
        assert not any("does not pay" in e for e in job["escalations"]), job["escalations"]
        xb = job["qemu_stats"]["xbzrle-cache"]
        assert xb["pages"] > 4096 and xb["bytes"] < xb["pages"] * 64, xb  # small deltas
        assert session.stop()["ok"]
        after = lab.stat(ip)  # the guest runs on h2, its dirtier still going
        assert after["dirty_rounds"] > before["dirty_rounds"]
        assert after["uptime_ms"] > before["uptime_ms"]
        assert "deltas1" in vm_names(lab, "h2") and "deltas1" not in vm_names(lab, "h1")
    finally:
        cleanup_vms(lab, "deltas1")


def test_postcopy_forbidden_per_vm(lab: LabHandle) -> None:
    _make(lab, "h1", "nopc", dirty="128M@0:full", memory=512, postcopy=False)
    try:
        job = move(lab, "h1", "nopc", "h2", bandwidth_mbps=300, timeout_s=15)
        assert not job["postcopy_used"]
        assert job["state"] in ("completed", "failed")
        if job["state"] == "failed":
            assert "--timeout" in job["error"]["message"]
            assert vm_names(lab, "h1") == ["nopc"]
    finally:
        cleanup_vms(lab, "nopc")


def test_source_agent_restart_mid_move(lab: LabHandle) -> None:
    ip = _make(lab, "h1", "restart1", dirty="64M@0:full")
    try:
        pid, job = start_stuck_move(lab, "restart1")
        lab.lab.kill_agent("h1")
        time.sleep(1)
        lab.lab.start_agent("h1")
        done = wait_job(lab, "h1", job["id"])
        assert done["state"] == "failed" and "restarted" in done["error"]["message"], done
        with lab.client("h1") as c:
            vm = wait_for(lambda: (v := c.vm("restart1"))["state"] == "running" and v, 20, "vm")
        assert vm["pid"] == pid
        assert lab.probe("tcp", ip, count=3)["echoed"] == 3
        wait_for(lambda: "restart1" not in vm_names(lab, "h2"), 20, "destination cleaned")
    finally:
        cleanup_vms(lab, "restart1")


def _connected_tcp_nodelay(pid: int) -> list[int]:
    """TCP_NODELAY of every connected TCP socket of process ``pid`` (a QEMU's migration
    streams: its monitor sockets are Unix sockets)."""
    values = []
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:["):
                    continue
                with socket.socket(fileno=_getfd(pidfd, int(name))) as s:
                    if s.family not in (socket.AF_INET, socket.AF_INET6):
                        continue
                    s.getpeername()  # connected (a listener raises ENOTCONN)
                    values.append(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    finally:
        os.close(pidfd)
    return values


def test_postcopy_recovers_after_the_link_breaks(lab: LabHandle) -> None:
    """Break the migration connections in the middle of post-copy (the kernel aborts them, as
    when a switch reboots): QEMU pauses both halves, vmferry reconnects with QEMU's post-copy
    recovery, the guest resumes on the destination with its TCP session and counters intact."""
    ip = _make(lab, "h1", "pcrec", dirty="128M@0", memory=512)
    topo = lab.lab.topology()
    net.set_link_rate(topo, "h1", "100mbit")  # post-copy lasts seconds, not milliseconds
    try:
        before = lab.stat(ip)
        session = start_probe(lab.lab, "session", ip, duration=180)
        job = move(lab, "h1", "pcrec", "h2", wait=False, policy="postcopy")
        with lab.client("h1") as c:
            running = wait_for(
                lambda: (j := c.migration(job["id"]))["phase"] == "postcopy" and j, 120, "post-copy"
            )
        time.sleep(0.5)
        killed = subprocess.run(
            ["ip", "netns", "exec", topo.host("h1").netns,
             "ss", "-K", "-t", "dst", running["address"]],
            capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
        assert "ESTAB" in killed.stdout, killed.stdout  # the streams were there and are gone
        with lab.client("h1") as c:
            wait_for(lambda: "post-copy recovered" in c.migration(job["id"])["escalations"],
                     120, "post-copy recovery")  # fmt: skip
        with lab.client("h2") as c:
            dest_pid = int(c.vm("pcrec")["pid"])
        # the recovered streams, accepted on the destination's new port, have Nagle off too
        nodelay = _connected_tcp_nodelay(dest_pid)
        assert nodelay and all(nodelay), nodelay
        with lab.client("h1") as c:
            assert c.migration(job["id"])["phase"] == "postcopy"  # looked at while it copied
        done = wait_job(lab, "h1", job["id"])
        assert done["state"] == "completed", done["error"]
        assert "post-copy recovered" in done["escalations"], done["escalations"]
        assert vm_names(lab, "h1") == [] and vm_names(lab, "h2") == ["pcrec"]
        after = lab.stat(ip)
        assert after["hb"] > before["hb"] and after["uptime_ms"] > before["uptime_ms"]
        assert session.stop()["ok"]
    finally:
        net.set_link_rate(topo, "h1", None)
        cleanup_vms(lab, "pcrec")


def test_destination_agent_restart_mid_move(lab: LabHandle) -> None:
    """The destination agent restarts while memory is copied: it takes the move back from its
    record, so a cancel still removes the skeleton VM there."""
    ip = _make(lab, "h1", "drestart", dirty="64M@0:full")
    try:
        pid, job = start_stuck_move(lab, "drestart")
        lab.lab.kill_agent("h2")
        time.sleep(1)
        lab.lab.start_agent("h2")
        with lab.client("h2") as c:
            assert [v["state"] for v in c.vms()] == ["incoming"]
        with lab.client("h1") as c:
            assert c.migration(job["id"])["state"] == "running"
            c.cancel_migration(job["id"])
        done = wait_job(lab, "h1", job["id"])
        assert done["state"] == "cancelled", done
        assert vm_names(lab, "h2") == []
        with lab.client("h1") as c:
            assert c.vm("drestart")["pid"] == pid
        assert lab.probe("tcp", ip, count=3)["echoed"] == 3
    finally:
        with contextlib.suppress(Exception):
            lab.lab.start_agent("h2")
        cleanup_vms(lab, "drestart")


def test_destination_agent_gone_fails_the_move(lab: LabHandle) -> None:
    """A destination agent that stays silent fails the move before switchover: the VM keeps
    running on the source, and the skeleton VM goes once that agent is back."""
    ip = _make(lab, "h1", "dgone", dirty="64M@0:full")
    try:
        pid, job = start_stuck_move(lab, "dgone")
        lab.lab.kill_agent("h2")
        done = wait_job(lab, "h1", job["id"], timeout=60)
        assert done["state"] == "failed", done
        assert "has not answered" in done["error"]["message"], done["error"]
        with lab.client("h1") as c:
            vm = c.vm("dgone")
            assert vm["state"] == "running" and vm["pid"] == pid
        assert lab.probe("tcp", ip, count=3)["echoed"] == 3
        lab.lab.start_agent("h2")
        wait_for(lambda: vm_names(lab, "h2") == [], 30, "the skeleton VM on h2 removed")
    finally:
        with contextlib.suppress(Exception):
            lab.lab.start_agent("h2")
        cleanup_vms(lab, "dgone")


def test_failed_handover_is_completed_by_the_admin(lab: LabHandle) -> None:
    """QEMU finished the move while the destination agent was down: the source copy stays
    paused (and refuses to resume) until `ferry migration complete` hands the VM over."""
    ip = _make(lab, "h1", "hand1", memory=512)
    try:
        before = lab.stat(ip)
        job = move(lab, "h1", "hand1", "h2", wait=False, bandwidth_mbps=200, commit_retry_s=3)
        with lab.client("h1") as c:
            wait_for(lambda: c.migration(job["id"])["phase"] == "precopy", 60, "precopy")
        lab.lab.kill_agent("h2")
        done = wait_job(lab, "h1", job["id"], timeout=60)
        assert done["state"] == "failed" and done["handover_pending"], done
        assert f"ferry migration complete {job['id']}" in done["error"]["fix"]
        with lab.client("h1") as c:
            assert c.vm("hand1")["state"] == "handover-pending"
            with pytest.raises(ConflictError, match="hand-over"):
                c.action("hand1", "resume")
        lab.lab.start_agent("h2")
        with lab.client("h2") as c:
            assert c.vm("hand1")["state"] == "incoming"  # taken back from its record
        with lab.client("h1") as c:
            finished = c.complete_migration(job["id"])
        assert finished["state"] == "completed" and not finished["handover_pending"]
        assert vm_names(lab, "h1") == []
        with lab.client("h2") as c:
            assert c.vm("hand1")["state"] == "running"
        after = lab.stat(ip)
        assert after["hb"] > before["hb"] and after["uptime_ms"] > before["uptime_ms"]
    finally:
        with contextlib.suppress(Exception):
            lab.lab.start_agent("h2")
        cleanup_vms(lab, "hand1")
