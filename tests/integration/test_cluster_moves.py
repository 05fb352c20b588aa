"""Planned moves of clustered VMs in the lab: ``ferry cluster move``, ``drain`` and
``resume --failback`` with real guests, real agents and the lab's real etcd."""

from __future__ import annotations

import json
import time
from typing import Any

from conftest import LabHandle, needs_lab, vm_names, wait_for
from test_failover import _forget_everywhere, _qemus_of, ferry, ha_cluster

from vmferry.client import RefusedError
from vmferry.cluster.store import ClusterVMStore
from vmferry.lab.lab import start_probe

pytestmark = needs_lab


def _ha_vm(lab: LabHandle, host: str, name: str) -> tuple[str, dict[str, Any]]:
    """A started probe VM (TCP echo too) on the shared volume, made clustered on ``host``."""
    ip = lab.guest_ip()
    spec: dict[str, Any] = {
        "name": name, "memory_mib": 256, "disks": [{"size_mib": 16}],
        "nics": [{"switch": "external"}], "storage_dir": str(lab.lab.shared_dir / name),
        "probe": {"ip": f"{ip}/24", "roles": ["heartbeat", "udpecho", "tcpecho"]},
    }  # fmt: skip
    with lab.client(host) as c:
        c.create_vm(spec)
        vm = c.action(name, "start")
    lab.wait_guest(ip)
    with lab.client(host) as c:
        c.cluster_vm_add(name)
    return ip, vm


def _owner(etcd_store: ClusterVMStore, cluster: str, vm: str) -> tuple[str, str | None]:
    got = etcd_store.vm_record(cluster, vm)
    assert got is not None
    return got[0].node, got[0].moving_to


def _node(st: dict[str, Any], name: str) -> dict[str, Any]:
    return next(n for n in st["nodes"] if n["name"] == name)


def test_cluster_move_live_keeps_the_session_and_records_the_new_owner(lab: LabHandle) -> None:
    try:
        with ha_cluster(lab, "cmv") as etcd:
            store = ClusterVMStore(etcd)
            ip, vm = _ha_vm(lab, "h1", "cmove1")
            # a plain move would leave the cluster believing the VM is on h1: refused
            with lab.client("h1") as c:
                try:
                    c.move(
                        "cmove1", {"destination": {"name": "h2", "url": lab.lab.endpoint("h2").url}}
                    )
                    raise AssertionError("a plain move of a clustered VM was accepted")
                except RefusedError as exc:
                    assert "cluster move" in (exc.fix or "")
            assert vm_names(lab, "h1") == ["cmove1"]
            bad = ferry("--host", "h2", "cluster", "move", "cmove1", "--to", "h1")
            assert bad.returncode == 1 and "already runs on h1" in bad.stderr
            before = lab.stat(ip)
            session = start_probe(lab.lab, "session", ip, duration=90)
            # asked through h2 (not the owner): h1's agent runs the move, the CLI follows it there
            r = ferry("--host", "h2", "cluster", "move", "cmove1", "--to", "h2", "-o", "json")
            assert r.returncode == 0, r.stderr
            res = json.loads(r.stdout)
            assert res["from"] == "h1" and res["to"] == "h2"
            assert res["job"]["state"] == "completed" and res["job"]["mode"] == "shared"
            # the owner records the outcome within a watcher pass
            wait_for(lambda: _owner(store, "cmv", "cmove1") == ("h2", None), 10, "owner h2")
            assert vm_names(lab, "h1") == [] and vm_names(lab, "h2") == ["cmove1"]
            assert len(_qemus_of(vm["uuid"])) == 1
            with lab.client("h2") as c:
                wait_for(lambda: c.cluster_member()["clustered_vms"] == ["cmove1"], 10, "h2")
            # and back, to the best possible node (the only other one here)
            r = ferry("--host", "h1", "cluster", "move", "cmove1", "--best", "-o", "json")
            assert r.returncode == 0, r.stderr
            assert json.loads(r.stdout)["to"] == "h1"
            wait_for(lambda: _owner(store, "cmv", "cmove1") == ("h1", None), 10, "owner h1")
            after = lab.stat(ip)
            assert after["hb"] > before["hb"], "the guest restarted"
            result = session.stop()
            assert result["ok"] and not result["reset"], result
            with lab.client("h1") as c:
                kinds = [(e["kind"], e["vm"], e["node"]) for e in c.cluster_events()]
            assert ("moved", "cmove1", "h2") in kinds and ("moved", "cmove1", "h1") in kinds
    finally:
        _forget_everywhere(lab, "cmove1", "h1")


def test_drain_moves_every_vm_live_and_failback_brings_them_home(lab: LabHandle) -> None:
    names = ["drain1", "drain2"]
    try:
        with ha_cluster(lab, "cdr") as etcd:
            store = ClusterVMStore(etcd)
            ips = {n: _ha_vm(lab, "h1", n)[0] for n in names}
            sessions = {
                n: start_probe(lab.lab, "session", ip, duration=150) for n, ip in ips.items()
            }
            hb = {n: lab.stat(ip)["hb"] for n, ip in ips.items()}
            t0 = time.monotonic()
            r = ferry("--host", "h2", "cluster", "drain", "h1", "-o", "json")
            assert r.returncode == 0, r.stderr
            drain = json.loads(r.stdout)
            print(f"drain of 2 VMs: {time.monotonic() - t0:.1f} s")
            assert drain["status"] == "done" and drain["moved"] == {n: "h2" for n in names}
            assert sorted(vm_names(lab, "h2")) == names and vm_names(lab, "h1") == []
            for n in names:
                assert _owner(store, "cdr", n) == ("h2", None)
            with lab.client("h1") as c:
                st = c.cluster_status("cdr")
            assert _node(st, "h1")["state"] == "paused"
            # a paused node takes nothing
            bad = ferry("--host", "h2", "cluster", "move", "drain1", "--to", "h1")
            assert bad.returncode == 1 and "paused" in bad.stderr
            r = ferry("--host", "h1", "cluster", "resume", "h1", "--failback", "-o", "json")
            assert r.returncode == 0, r.stderr
            back = json.loads(r.stdout)
            assert back["kind"] == "failback" and back["status"] == "done"
            assert sorted(vm_names(lab, "h1")) == names and vm_names(lab, "h2") == []
            with lab.client("h2") as c:
                st = c.cluster_status("cdr")
                kinds = [e["kind"] for e in c.cluster_events("cdr", 100)]
            assert _node(st, "h1")["state"] == "up" and not _node(st, "h1")["paused"]
            assert {"drain-started", "drain-done", "resumed", "failback-done"} <= set(kinds)
            for n, ip in ips.items():
                assert lab.stat(ip)["hb"] > hb[n], f"{n} restarted"
                result = sessions[n].stop()
                assert result["ok"] and not result["reset"], (n, result)
    finally:
        for n in names:
            _forget_everywhere(lab, n, "h1")
