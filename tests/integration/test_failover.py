"""Clustered VMs and automatic failover in the lab: real etcd (3 TLS members), real agents,
real QEMU guests on the lab's shared volume."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import LabHandle, needs_lab, wait_for

from vmferry.client import FerryError, NotFoundError, RefusedError
from vmferry.cluster.etcd import Etcd
from vmferry.cluster.store import ClusterVMStore, Keys
from vmferry.host.vms import socket_dir
from vmferry.lab.procs import qemus_of as _qemus_of
from vmferry.qemu.qmp import QmpError, qmp_session

pytestmark = needs_lab


def ferry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", *args],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )  # fmt: skip


def _all_alive(lab: LabHandle, name: str, via: str = "h1") -> dict[str, Any] | None:
    with lab.client(via) as c:
        st = c.cluster_status(name)
    return st if st["leader"] and all(n["lease"] == "alive" for n in st["nodes"]) else None


@contextlib.contextmanager
def ha_cluster(lab: LabHandle, name: str) -> Iterator[Etcd]:
    """Cluster ``name`` of h1 and h2 with the lab's shared directory as its shared volume."""
    urls = {h: lab.lab.endpoint(h).url for h in ("h1", "h2")}
    etcd = lab.lab.etcd_client()
    with lab.client("h1") as c:
        c.cluster_create(name, urls)
    try:
        wait_for(lambda: _all_alive(lab, name), 20, f"cluster {name} up")
        with lab.client("h1") as c:
            c.cluster_volume_add(str(lab.lab.shared_dir))
        yield etcd
    finally:
        store = ClusterVMStore(etcd)
        with contextlib.suppress(FerryError):
            for vm in store.clustered_vms(name):
                store.remove_clustered_vm(name, vm.name)
            store.destroy(name)
        etcd.close()


def _shared_vm(
    lab: LabHandle, host: str, name: str, roles: tuple[str, ...] = ("heartbeat", "udpecho")
) -> tuple[str, dict[str, Any]]:
    """A started probe VM on ``host`` with its folder and disk on the shared volume."""
    ip = lab.guest_ip()
    spec: dict[str, Any] = {
        "name": name, "memory_mib": 256, "disks": [{"size_mib": 16}],
        "nics": [{"switch": "external"}], "storage_dir": str(lab.lab.shared_dir / name),
        "probe": {"ip": f"{ip}/24", "roles": list(roles)},
    }  # fmt: skip
    with lab.client(host) as c:
        c.create_vm(spec)
        vm = c.action(name, "start")
    lab.wait_guest(ip)
    return ip, vm


def _forget_everywhere(lab: LabHandle, name: str, last: str) -> None:
    """Delete the VM from the other host first (its files are shared), then from ``last``."""
    for host in [h for h in ("h1", "h2") if h != last] + [last]:
        with contextlib.suppress(FerryError):
            lab.remove_vm(host, name)


def test_clustered_vm_add_set_list_remove_without_downtime(lab: LabHandle) -> None:
    ip, vm = _shared_vm(lab, "h2", "ha-add")
    with lab.client("h2") as c:
        c.create_vm({"name": "ha-local", "memory_mib": 64, "nics": [{"switch": "external"}]})
    try:
        with ha_cluster(lab, "hvm") as etcd:
            before = lab.stat(ip)
            # a VM whose files are not on a shared volume is refused, naming the volumes
            with lab.client("h2") as c, pytest.raises(RefusedError) as e:
                c.cluster_vm_add("ha-local")
            assert e.value.field == "name" and str(lab.lab.shared_dir) in e.value.message
            assert e.value.fix and "move-storage" in e.value.fix
            # the VM lives on h2: h1 does not have it and says where to ask
            with lab.client("h1") as c, pytest.raises(NotFoundError) as nf:
                c.cluster_vm_add("ha-add")
            assert "--host" in (nf.value.fix or "")
            # unknown owners are refused with the members listed; nothing is recorded
            bad = ferry("--host", "h2", "cluster", "vm", "add", "ha-add", "--preferred", "h9")
            assert bad.returncode == 1 and "h9" in bad.stderr and "h1, h2" in bad.stderr
            assert ClusterVMStore(etcd).clustered_vms("hvm") == []

            r = ferry("--host", "h2", "cluster", "vm", "add", "ha-add", "--priority", "high",
                      "--preferred", "h1", "--anti-affinity", "web", "-o", "json")  # fmt: skip
            assert r.returncode == 0, r.stderr
            row = json.loads(r.stdout)
            assert row["node"] == "h2" and row["priority"] == "high"
            assert row["preferred"] == ["h1"] and row["anti_affinity"] == "web"
            assert row["storage_dir"] == str(lab.lab.shared_dir / "ha-add")
            again = ferry("--host", "h1", "cluster", "vm", "add", "ha-add")
            assert again.returncode == 1
            r = ferry("--host", "h1", "cluster", "vm", "set", "ha-add", "--priority", "low",
                      "--possible", "h1,h2", "-o", "json")  # fmt: skip
            assert r.returncode == 0, r.stderr
            r = ferry("--host", "h1", "cluster", "vm", "list", "--output", "json")
            assert r.returncode == 0, r.stderr
            [listed] = json.loads(r.stdout)
            assert listed["priority"] == "low" and listed["possible"] == ["h1", "h2"]
            assert listed["preferred"] == ["h1"] and listed["owner_lease"] == "alive"
            # the owner node fences it from now on, and keeps it running meanwhile
            with lab.client("h2") as c:
                wait_for(lambda: c.cluster_member()["clustered_vms"] == ["ha-add"], 10, "h2")
                assert c.vm("ha-add")["pid"] == vm["pid"]
            after = lab.stat(ip)
            assert after["hb"] > before["hb"]  # same guest, still counting: no restart
            r = ferry("--host", "h1", "cluster", "vm", "remove", "ha-add")
            assert r.returncode == 0, r.stderr
            with lab.client("h1") as c:
                assert c.cluster_vms() == []
                kinds = [(e["kind"], e["vm"]) for e in c.cluster_events()]
            assert kinds == [("added", "ha-add"), ("changed", "ha-add"), ("removed", "ha-add")]
            with lab.client("h2") as c:
                wait_for(lambda: c.cluster_member()["clustered_vms"] == [], 10, "h2 to let go")
                assert c.vm("ha-add")["state"] == "running"
    finally:
        _forget_everywhere(lab, "ha-local", "h2")
        _forget_everywhere(lab, "ha-add", "h2")


@pytest.mark.slow
def test_a_dead_nodes_clustered_vm_runs_again_on_the_other_node_once(lab: LabHandle) -> None:
    ip, vm = _shared_vm(lab, "h2", "ha-fo")
    uuid = vm["uuid"]
    try:
        with ha_cluster(lab, "hfo") as etcd:
            with lab.client("h2") as c:
                c.cluster_vm_add("ha-fo", priority="high")
                wait_for(lambda: c.cluster_member()["clustered_vms"] == ["ha-fo"], 10, "h2")
            assert _qemus_of(uuid) == [vm["pid"]]
            alive_key = Keys("hfo").alive("h2")
            # h2 dies: its agent and its VM's QEMU are killed
            lab.lab.kill_agent("h2")
            os.kill(int(vm["pid"]), signal.SIGKILL)
            t_kill = time.monotonic()
            t_expired = t_registered = t_running = None
            wall_expired = 0.0
            while time.monotonic() - t_kill < 60 and t_running is None:
                # h1 first, then etcd: a VM seen on h1 must find the lease already gone in the
                # same sample (failover is faster than one sample now, so order matters)
                now = time.monotonic()
                if t_running is None:
                    with lab.client("h1") as c, contextlib.suppress(NotFoundError):
                        state = c.vm("ha-fo")["state"]
                        t_registered = t_registered or now
                        if state == "running":
                            t_running = now
                if t_expired is None and etcd.get(alive_key) is None:
                    t_expired, wall_expired = now, time.time()
                time.sleep(0.1)
            assert t_expired is not None, "h2's lease did not expire"
            assert t_running is not None, "the VM was not restarted on h1"
            assert t_registered is not None and t_registered >= t_expired  # never before expiry
            lab.wait_guest(ip, 60)
            t_answer = time.monotonic()
            # exactly one instance: one QEMU on the whole machine, on h1
            with lab.client("h1") as c:
                pid_h1 = int(c.vm("ha-fo")["pid"])
                evs = c.cluster_events()
                st = c.cluster_status("hfo")
            assert _qemus_of(uuid) == [pid_h1]
            fo = next(e for e in evs if e["kind"] == "failover" and e["vm"] == "ha-fo")
            assert fo["from_node"] == "h2" and fo["node"] == "h1" and fo["by"] == "h1"
            assert "h2 lost its lease" in fo["reason"] and "priority high" in fo["reason"]
            rs = next(e for e in evs if e["kind"] == "restarted" and e["vm"] == "ha-fo")
            assert rs["node"] == "h1"
            rec = ClusterVMStore(etcd).vm_record("hfo", "ha-fo")
            assert rec is not None and rec[0].node == "h1" and not rec[0].restart_pending
            assert st["controller"]["dead_nodes"] == ["h2"] and st["controller"]["unplaced"] == {}
            tm = {**fo["timings"], **rs["timings"]}
            window = tm["noticed_at"] - tm.get("last_seen_alive_at", tm["noticed_at"])
            seen = f" (within {window:.2f} s of its last read with h2 alive)" if window else ""
            print(
                f"\nfailover of ha-fo: lease expired {t_expired - t_kill:.2f} s after the kill; "
                f"leader {fo['by']} noticed it{seen}; decision {tm['decision_ms']:.1f} ms; "
                f"import {tm['import_s']:.2f} s + start {tm['start_s']:.2f} s = "
                f"{tm['restart_s']:.2f} s; running on h1 {t_running - t_kill:.2f} s and answering "
                f"{t_answer - t_kill:.2f} s after the kill"
            )  # fmt: skip
            print(f"failover timings: {tm}")
            # Decided within a controller tick of the lease expiring (+ one tick to elect a new
            # leader when the dead node led); what follows is the agent's import and QEMU start
            # (+ the guest's boot), which the 5 s target of issue 5 allows around it.
            assert tm["decided_at"] - wall_expired < 2.5, tm["decided_at"] - wall_expired
            assert tm["import_s"] < 5.0, tm
            print(f"lease expiry -> decision {tm['decided_at'] - wall_expired:.2f} s")

            # h2 comes back: it fences what it had (already dead), does not start it again and
            # lets it go (unregistered there, the shared files kept: h1 runs from them)
            lab.lab.start_agent("h2")
            wait_for(lambda: _all_alive(lab, "hfo"), 30, "h2 back in the cluster")
            time.sleep(3)  # a few lease ticks of h2 and controller passes
            with lab.client("h2") as c:
                assert c.cluster_member()["clustered_vms"] == []
                assert "ha-fo" not in [v["name"] for v in c.vms()]
            assert (lab.lab.shared_dir / "ha-fo" / "vm.json").exists()
            assert _qemus_of(uuid) == [pid_h1]
            with lab.client("h1") as c:
                assert c.vm("ha-fo")["state"] == "running"
                assert [e for e in c.cluster_events() if e["kind"] == "failover"] == [fo]
            lab.stat(ip)
    finally:
        if lab.lab.agent_pid("h2") is None:
            lab.lab.start_agent("h2")
        _forget_everywhere(lab, "ha-fo", "h1")


@pytest.mark.slow
def test_a_clustered_vm_the_admin_stopped_stays_off_through_a_failover(lab: LabHandle) -> None:
    """``ferry vm stop`` of a clustered VM is recorded: when its node dies, the VM is given to
    the other node and registered there, off; ``ferry vm start`` there runs it again."""
    ip, vm = _shared_vm(lab, "h2", "ha-off")
    try:
        with ha_cluster(lab, "hoff") as etcd:
            store = ClusterVMStore(etcd)
            with lab.client("h2") as c:
                c.cluster_vm_add("ha-off")
            r = ferry("--host", "h2", "vm", "stop", "ha-off")
            assert r.returncode == 0, r.stderr
            rec = store.vm_record("hoff", "ha-off")
            assert rec is not None and rec[0].keep_off and rec[0].node == "h2"
            assert _qemus_of(vm["uuid"]) == []
            lab.lab.kill_agent("h2")  # h2 dies (its VM was already off)

            def rehomed() -> bool:
                got = store.vm_record("hoff", "ha-off")
                return got is not None and got[0].node == "h1" and not got[0].restart_pending

            wait_for(rehomed, 60, "ha-off given to h1")
            with lab.client("h1") as c:
                assert c.vm("ha-off")["state"] == "off"  # registered there, not started
                evs = [(e["kind"], e["node"]) for e in c.cluster_events() if e["vm"] == "ha-off"]
            assert ("rehomed", "h1") in evs and ("restarted", "h1") not in evs
            time.sleep(2)  # later controller passes leave it off
            assert _qemus_of(vm["uuid"]) == []
            r = ferry("--host", "h1", "vm", "start", "ha-off")
            assert r.returncode == 0, r.stderr
            lab.wait_guest(ip, 60)
            rec = store.vm_record("hoff", "ha-off")
            assert rec is not None and not rec[0].keep_off  # failover starts it again from now
    finally:
        if lab.lab.agent_pid("h2") is None:
            lab.lab.start_agent("h2")
        _forget_everywhere(lab, "ha-off", "h1")


def _press_power_button(lab: LabHandle, host: str, uuid: str) -> None:
    """ACPI power button through the VM's diagnostics QMP socket: ferry is not asked, the guest
    powers itself off (as when its OS shuts down)."""
    sock = socket_dir(lab.lab.host_dir(host) / "state", uuid)

    async def press() -> None:
        async with qmp_session(sock / "qmp-diag.sock") as q:
            for _ in range(6):  # a guest may miss a press while it is still starting up
                await q.execute("system_powerdown")
                for _ in range(25):
                    try:
                        if await q.status() == "shutdown":
                            return
                    except QmpError:
                        return  # the agent saw it off first and stopped its QEMU
                    await asyncio.sleep(0.2)
        raise AssertionError("the guest did not power off on the ACPI button")

    asyncio.run(press())


def test_a_clustered_vm_that_powers_itself_off_is_kept_off(lab: LabHandle) -> None:
    """A guest that shuts itself down (not through ferry) is recorded like a ``ferry vm stop``:
    failover will keep it off; the host logs the power-off; ``ferry vm start`` clears it."""
    ip, vm = _shared_vm(lab, "h2", "ha-pwr", ("heartbeat", "udpecho", "power"))
    try:
        with ha_cluster(lab, "hpwr") as etcd:
            store = ClusterVMStore(etcd)
            with lab.client("h2") as c:
                c.cluster_vm_add("ha-pwr")
            rec = store.vm_record("hpwr", "ha-pwr")
            assert rec is not None and not rec[0].keep_off
            _press_power_button(lab, "h2", vm["uuid"])

            def kept_off() -> bool:
                got = store.vm_record("hpwr", "ha-pwr")
                return got is not None and got[0].keep_off

            wait_for(kept_off, 30, "keep_off recorded after the guest's power-off")
            assert _qemus_of(vm["uuid"]) == []
            with lab.client("h2") as c:
                assert c.vm("ha-pwr")["state"] == "off"
                assert [e["kind"] for e in c.events(vm="ha-pwr", kind="vm-powered-off")] == [
                    "vm-powered-off"
                ]
                whys = [e["reason"] for e in c.cluster_events() if e["vm"] == "ha-pwr"]
            assert any("inside the guest" in w for w in whys), whys
            r = ferry("--host", "h2", "vm", "start", "ha-pwr")
            assert r.returncode == 0, r.stderr
            lab.wait_guest(ip, 60)
            rec = store.vm_record("hpwr", "ha-pwr")
            assert rec is not None and not rec[0].keep_off
    finally:
        _forget_everywhere(lab, "ha-pwr", "h2")


def _hosts_of(lab: LabHandle, pids: list[int]) -> set[str]:
    """The lab hosts (network namespaces) the processes ``pids`` run in.

    A QEMU started with ``-daemonize`` is briefly two processes (the launcher waits for its
    daemon), so "one instance" means QEMUs of the VM on one host only.
    """
    by_ino = {os.stat(f"/run/netns/{h.netns}").st_ino: h.name for h in lab.topo.hosts}
    hosts = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            hosts.add(by_ino.get(os.stat(f"/proc/{pid}/ns/net").st_ino, f"pid {pid}: not a host"))
    return hosts


@pytest.mark.slow
def test_isolated_node_fences_and_its_vm_runs_once_elsewhere(lab: LabHandle) -> None:
    """h2 loses its management link (etcd and h1 unreachable, its agent still runs): it stops
    its clustered VM before its lease expires, the VM runs on h1 (never two QEMUs at once), and
    once h2 is back it does not start the VM again."""
    ip, vm = _shared_vm(lab, "h2", "ha-iso")
    uuid, pid_h2 = vm["uuid"], int(vm["pid"])
    try:
        with ha_cluster(lab, "hiso") as etcd:
            with lab.client("h2") as c:
                c.cluster_vm_add("ha-iso")
                # a readiness wait (h2's next good lease tick), not what is tested: generous,
                # the lease loop's etcd requests are slow on a loaded machine
                wait_for(lambda: c.cluster_member()["clustered_vms"] == ["ha-iso"], 30, "h2")
            assert _qemus_of(uuid) == [pid_h2]
            alive_key = Keys("hiso").alive("h2")
            assert etcd.get(alive_key) is not None
            most = 0  # the most hosts running a QEMU with the VM's uuid at one sample
            seen: set[str] = set()  # every host that ran one since the cut
            starting = 0  # samples with two processes on one host (QEMU's -daemonize)
            t_fenced = t_expired = t_answer = None
            pid_h1: int | None = None
            lab.lab.set_mgmt_link("h2", False)
            t_cut = time.monotonic()
            try:
                while time.monotonic() - t_cut < 90 and t_answer is None:
                    now = time.monotonic()
                    qemus = _qemus_of(uuid)
                    hosts = _hosts_of(lab, qemus)
                    most, seen = max(most, len(hosts)), seen | hosts
                    starting += len(qemus) > len(hosts)
                    if t_fenced is None and pid_h2 not in qemus:
                        t_fenced = now
                    if t_fenced is not None:  # fenced: h2 never runs it again
                        assert "h2" not in hosts, qemus
                    if t_expired is None and etcd.get(alive_key) is None:
                        t_expired = now
                    if t_expired is not None and pid_h1 is None:
                        with lab.client("h1") as c, contextlib.suppress(NotFoundError):
                            on_h1 = c.vm("ha-iso")
                            if on_h1["state"] == "running":
                                pid_h1 = int(on_h1["pid"])
                    if pid_h1 is not None:
                        with contextlib.suppress(FerryError):  # e.g. no route while it boots
                            echo = lab.probe("udp", ip, count=1, interval=0.0, timeout=0.5)
                            if echo.get("received") == 1:
                                t_answer = time.monotonic()
                    time.sleep(0.1)
                assert t_fenced is not None, "the isolated node did not stop its clustered VM"
                assert t_expired is not None, "the isolated node's lease did not expire"
                assert t_fenced < t_expired, (t_fenced - t_cut, t_expired - t_cut)
                assert pid_h1 is not None, "the VM was not restarted on h1"
                assert t_answer is not None, "the VM restarted on h1 does not answer echo"
                assert most == 1 and seen == {"h2", "h1"}, (most, seen)
                assert _qemus_of(uuid) == [pid_h1]
                print(f"\nisolated h2: fenced {t_fenced - t_cut:.2f} s after the cut, lease "
                      f"expired {t_expired - t_cut:.2f} s, echo from h1 "
                      f"{t_answer - t_cut:.2f} s after it; {starting} sample(s) saw QEMU's "
                      "launcher and daemon on h1")  # fmt: skip
            finally:
                lab.lab.set_mgmt_link("h2", True)
            # h2 is back: it takes a new lease, lets the VM go and does not start it again
            wait_for(lambda: _all_alive(lab, "hiso"), 30, "h2 back in the cluster")
            t_back = time.monotonic()
            while time.monotonic() - t_back < 6:  # several lease ticks and controller passes
                assert _qemus_of(uuid) == [pid_h1]  # nothing starts: not even a launcher
                time.sleep(0.25)
            with lab.client("h2") as c:
                assert c.cluster_member()["clustered_vms"] == []
            r = ferry("--host", "h2", "vm", "list", "--output", "json")
            assert r.returncode == 0, r.stderr
            on_h2 = [v for v in json.loads(r.stdout) if v["name"] == "ha-iso"]
            assert on_h2 == [] or on_h2[0]["state"] == "off", on_h2
            with lab.client("h1") as c:
                assert c.vm("ha-iso")["state"] == "running"
                fos = [e for e in c.cluster_events() if e["kind"] == "failover"]
            assert [(e["vm"], e["from_node"], e["node"]) for e in fos] == [("ha-iso", "h2", "h1")]
            assert _qemus_of(uuid) == [pid_h1]
            lab.stat(ip)
    finally:
        lab.lab.set_mgmt_link("h2", True)
        _forget_everywhere(lab, "ha-iso", "h1")
