"""Failover-cluster foundation in the lab: real etcd (3 members, TLS), real agents, real QEMU."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import LabHandle, needs_lab, wait_for

from vmferry.client import ConflictError, FerryError, RefusedError
from vmferry.cluster import guard
from vmferry.cluster.etcd import Etcd
from vmferry.cluster.store import ClusteredVM, ClusterStore, Keys
from vmferry.procinfo import pid_state

pytestmark = needs_lab


def ferry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", *args],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )  # fmt: skip


def _urls(lab: LabHandle, *hosts: str) -> dict[str, str]:
    return {h: lab.lab.endpoint(h).url for h in hosts}


def _status(lab: LabHandle, via: str = "h1", name: str | None = None) -> dict[str, Any]:
    with lab.client(via) as c:
        return c.cluster_status(name)


def _node(st: dict[str, Any], name: str) -> dict[str, Any]:
    return next(n for n in st["nodes"] if n["name"] == name)


def _all_alive(lab: LabHandle, name: str, via: str = "h1") -> dict[str, Any] | None:
    st = _status(lab, via, name)
    ok = st["leader"] and all(n["lease"] == "alive" for n in st["nodes"])
    return st if ok else None


@pytest.fixture
def etcd(lab: LabHandle) -> Iterator[Etcd]:
    client = lab.lab.etcd_client()
    yield client
    client.close()


@contextlib.contextmanager
def cluster(lab: LabHandle, name: str, *hosts: str) -> Iterator[dict[str, Any]]:
    """A cluster of ``hosts`` with every lease alive; destroyed (clustered VMs dropped) after."""
    with lab.client(hosts[0]) as c:
        c.cluster_create(name, _urls(lab, *hosts))
    try:
        yield wait_for(lambda: _all_alive(lab, name, hosts[0]), 20, f"cluster {name} up")
    finally:
        etcd = lab.lab.etcd_client()
        try:
            store = ClusterStore(etcd)
            for vm in store.clustered_vms(name):
                store.remove_clustered_vm(name, vm.name)
            with contextlib.suppress(FerryError):
                store.destroy(name)
        finally:
            etcd.close()


def test_lab_etcd_has_three_tls_members(lab: LabHandle, etcd: Etcd) -> None:
    members = lab.lab.etcd_members()
    assert [m.name for m in members] == ["e1", "e2", "e3"]
    health = etcd.health()
    assert all(h["ok"] for h in health), health
    assert len({h["leader"] for h in health}) == 1  # one leader all agree on
    # TLS with client certificates: no certificate, no answer
    anonymous = Etcd([members[0].client_url], ca=str(lab.lab.dir / "pki" / "ca.crt"), timeout=2)
    assert not anonymous.health()[0]["ok"]
    anonymous.close()


def test_create_join_leave_status_destroy(lab: LabHandle, etcd: Etcd) -> None:
    with lab.client("h1") as c:
        st = c.cluster_create("life", _urls(lab, "h1"))
    assert [n["name"] for n in st["nodes"]] == ["h1"]
    try:
        st = wait_for(lambda: _all_alive(lab, "life"), 20, "h1's lease")
        assert st["leader"] == "h1"
        # refusals name the field and change nothing
        before = {kv.key: kv.value for kv in etcd.get_prefix("/vmferry/")}
        with lab.client("h2") as c, pytest.raises(ConflictError) as e:
            c.cluster_create("life", _urls(lab, "h2"))
        assert e.value.field == "name"
        with lab.client("h2") as c, pytest.raises(RefusedError) as r:
            c.cluster_create("other", {"h2": lab.lab.endpoint("h1").url})  # wrong agent
        assert r.value.field == "nodes" and "not 'h2'" in r.value.message
        with lab.client("h2") as c, pytest.raises(ConflictError) as e:
            c.cluster_create("other", _urls(lab, "h1", "h2"))
        assert "already in cluster 'life'" in e.value.message
        assert {kv.key: kv.value for kv in etcd.get_prefix("/vmferry/")} == before

        # join through the CLI (the node's URL comes from the client config)
        r2 = ferry("--host", "h1", "cluster", "join", "life", "--node", "h2", "-o", "json")
        assert r2.returncode == 0, r2.stderr
        st = wait_for(lambda: _all_alive(lab, "life", "h2"), 20, "h2's lease")
        assert {n["name"] for n in st["nodes"]} == {"h1", "h2"}
        assert sum(n["leader"] for n in st["nodes"]) == 1
        cli = ferry("--host", "h2", "cluster", "status", "--output", "json")
        assert cli.returncode == 0, cli.stderr
        js = json.loads(cli.stdout)
        assert js["name"] == "life" and len(js["etcd"]) == 3
        assert all(e["ok"] for e in js["etcd"])
        with lab.client("h2") as c:
            me = c.cluster_member()
        assert me["cluster"] == "life" and me["lease"] and me["fenced_at"] is None

        # leave: h2 is standalone again, its lease is given up
        r3 = ferry("--host", "h2", "cluster", "leave", "-o", "json")
        assert r3.returncode == 0, r3.stderr
        st = _status(lab, "h1", "life")
        assert [n["name"] for n in st["nodes"]] == ["h1"] and st["leader"] == "h1"
        with lab.client("h2") as c:
            wait_for(lambda: c.cluster_member()["lease"] is None, 10, "h2 to drop its lease")
            assert c.cluster_member()["cluster"] is None
        # the last node cannot leave; it destroys the cluster instead
        bad = ferry("--host", "h1", "cluster", "leave")
        assert bad.returncode == 1 and "ferry cluster destroy life" in bad.stderr
    finally:
        done = ferry("--host", "h1", "cluster", "destroy", "life")
    assert done.returncode == 0, done.stderr
    assert etcd.get_prefix("/vmferry/") == []
    with lab.client("h1") as c:
        wait_for(lambda: c.cluster_member()["cluster"] is None, 10, "h1 standalone")


def test_shared_volume_add_list_remove(lab: LabHandle) -> None:
    shared = str(lab.lab.shared_dir)
    # h1's own storage folder: a storage root of h1 only (lab hosts share one file system, so
    # the "same volume" marker passes here; the storage-root check is what must refuse it)
    local = str(lab.lab.host_dir("h1") / "storage")
    with cluster(lab, "vols", "h1", "h2"):
        r = ferry("--host", "h2", "cluster", "volume", "add", shared, "-o", "json")
        assert r.returncode == 0, r.stderr
        checks = json.loads(r.stdout)["checks"]
        assert {c["node"] for c in checks} == {"h1", "h2"} and all(c["ok"] for c in checks)
        with lab.client("h1") as c:
            assert [v["path"] for v in c.cluster_volumes()] == [shared]
            # a folder that is not the same volume on every node is refused, nothing recorded
            with pytest.raises(RefusedError) as e:
                c.cluster_volume_add(local)
            assert e.value.field == "path" and "h2" in e.value.message
            with pytest.raises(RefusedError):
                c.cluster_volume_add(shared)  # already there
            assert [v["path"] for v in c.cluster_volumes()] == [shared]
            assert not list(lab.lab.shared_dir.glob(".vmferry-volume-check-*"))
        r = ferry("--host", "h1", "cluster", "volume", "remove", shared)
        assert r.returncode == 0, r.stderr
        with lab.client("h1") as c:
            assert c.cluster_volumes() == []


def test_losing_one_etcd_member_changes_nothing(lab: LabHandle, etcd: Etcd) -> None:
    with cluster(lab, "quorum", "h1", "h2") as st0:
        leases = {n["name"]: n["lease_id"] for n in st0["nodes"]}
        health = etcd.health()
        leader_id = health[0]["leader"]
        victim = next(
            m for m, h in zip(lab.lab.etcd_members(), health, strict=True)
            if h["member"] == leader_id
        )  # fmt: skip  # the worst member to lose: the raft leader
        lab.lab.stop_etcd_member(victim.name)
        try:
            t_end = time.monotonic() + 10  # longer than a lease TTL (6 s)
            while time.monotonic() < t_end:
                st = _status(lab, "h2", "quorum")
                assert {n["name"]: n["lease_id"] for n in st["nodes"]} == leases, st
                assert st["leader"] == st0["leader"]
                time.sleep(0.5)
            for h in ("h1", "h2"):
                with lab.client(h) as c:
                    assert c.cluster_member()["fenced_at"] is None
            ok = [e["ok"] for e in st["etcd"]]
            assert ok.count(True) == 2
        finally:
            lab.lab.start_etcd_member(victim.name)
        wait_for(lambda: all(h["ok"] for h in etcd.health()), 30, "the member to come back")


def _alive(pid: int) -> bool:
    return pid_state(pid) not in (None, "Z", "X")


@pytest.mark.slow
def test_isolated_node_fences_its_clustered_vm_before_its_lease_expires(
    lab: LabHandle, etcd: Etcd
) -> None:
    _, ip = lab.make_vm("h2", "fence1", roles="heartbeat,udpecho")
    try:
        lab.wait_guest(ip)
        lab.make_vm("h2", "bystander1", roles="heartbeat")
        with cluster(lab, "fc", "h1", "h2"):
            ClusterStore(etcd).set_clustered_vm("fc", ClusteredVM(name="fence1", node="h2"))
            with lab.client("h2") as c:
                wait_for(lambda: c.cluster_member()["clustered_vms"] == ["fence1"], 10, "cache")
                pid = int(c.vm("fence1")["pid"])
                other_pid = int(c.vm("bystander1")["pid"])
            alive_key = Keys("fc").alive("h2")
            kv = etcd.get(alive_key)
            assert kv is not None and kv.lease
            lab.lab.set_mgmt_link("h2", False)  # h2 reaches neither etcd nor h1 now
            t_cut = time.monotonic()
            t_killed = t_expired = None
            try:
                while time.monotonic() - t_cut < 30 and (t_killed is None or t_expired is None):
                    now = time.monotonic()
                    if t_killed is None and not _alive(pid):
                        t_killed = now
                    # expired = etcd deleted the lease's keys: what every other node sees
                    if t_expired is None and etcd.get(alive_key) is None:
                        t_expired = now
                    time.sleep(0.05)
                assert t_killed is not None, "the isolated node did not stop its clustered VM"
                assert t_expired is not None, "the isolated node's lease did not expire"
                assert t_killed < t_expired, (t_killed - t_cut, t_expired - t_cut)
                print(f"fenced {t_killed - t_cut:.2f} s after the cut, "
                      f"lease expired {t_expired - t_cut:.2f} s after it")  # fmt: skip
                assert etcd.lease_ttl(kv.lease) == -1
                assert _alive(other_pid), "a VM that is not clustered was stopped"
                # h1 kept its lease and became (or stayed) leader
                st = wait_for(
                    lambda: (s := _status(lab, "h1", "fc"))["leader"] == "h1" and s, 5, "leader h1"
                )
                assert _node(st, "h1")["lease"] == "alive"
                assert _node(st, "h2")["lease"] == "expired"
            finally:
                lab.lab.set_mgmt_link("h2", True)
            # back on the network: h2 takes a new lease and does not restart the fenced VM
            st = wait_for(lambda: _all_alive(lab, "fc"), 20, "h2 back in the cluster")
            n2 = _node(st, "h2")
            assert n2["lease_id"] != f"{kv.lease:x}"
            st = wait_for(
                lambda: (s := _status(lab, "h1", "fc")) and _node(s, "h2")["last_fenced_at"] and s,
                10, "the fence record",
            )  # fmt: skip
            assert _node(st, "h2")["last_fenced_vms"] == ["fence1"]
            time.sleep(2)
            with lab.client("h2") as c:
                assert c.vm("fence1")["state"] == "off"
                assert c.cluster_member()["fenced_vms"] == ["fence1"]
    finally:
        lab.lab.set_mgmt_link("h2", True)
        for name in ("fence1", "bystander1"):
            with contextlib.suppress(FerryError):
                lab.remove_vm("h2", name)


def test_leader_moves_when_the_leader_agent_is_killed(lab: LabHandle) -> None:
    with cluster(lab, "lead", "h1", "h2") as st:
        leader = st["leader"]
        other = "h2" if leader == "h1" else "h1"
        lab.lab.kill_agent(leader)
        t0 = time.monotonic()
        try:
            st = wait_for(
                lambda: (s := _status(lab, other, "lead"))["leader"] == other and s, 20,
                f"{other} to become leader",
            )  # fmt: skip
            took = time.monotonic() - t0
            # the old leader's lease (6 s) had to expire first; then one tick (1 s)
            assert took < 6 + 3, took
            assert _node(st, leader)["lease"] == "expired"
        finally:
            lab.lab.start_agent(leader)
        st = wait_for(lambda: _all_alive(lab, "lead", other), 20, f"{leader} back")
        assert st["leader"] == other  # leadership does not flap back


def _failed(rep: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["test"], c["scope"]) for c in rep["checks"] if c["result"] == "fail"]


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr (e2fsprogs)")
def test_validate_catches_a_missing_switch_and_an_unwritable_volume(
    lab: LabHandle, etcd: Etcd
) -> None:
    urls = _urls(lab, "h1", "h2")
    with lab.client("h1") as c:
        rep = c.cluster_validate(nodes=urls, volumes=[str(lab.lab.shared_dir)])
        assert rep["result"] in ("pass", "warning"), _failed(rep)
        tests = {(ch["test"], ch["scope"]) for ch in rep["checks"]}
        assert {
            ("migration", "h1->h2"),
            ("migration", "h2->h1"),
            ("volumes", "h2"),
            ("etcd", "h1"),
            ("clock", "h2"),
            ("switches", "h1"),
            ("version", "all"),
        } <= tests
        before = c.settings()["switches"]
        c.update_settings(switches={**before, "sw2": {"bridge": "br-sw2"}})
    locked = lab.lab.shared_dir / "locked"
    locked.mkdir()
    subprocess.run(["chattr", "+i", str(locked)], check=True)
    try:
        r = ferry("--host", "h2", "cluster", "validate", "--nodes", "h1,h2",
                  "--volume", str(locked), "-o", "json")  # fmt: skip
        assert r.returncode == 1, r.stderr
        rep = json.loads(r.stdout)
        assert rep["result"] == "fail"
        assert set(_failed(rep)) == {("switches", "h2"), ("volumes", "all")}
        sw = next(ch for ch in rep["checks"] if ch["test"] == "switches" and ch["scope"] == "h2")
        assert "sw2" in sw["message"] and "--switch sw2=" in sw["fix"]
        # create refuses on a failed test and writes nothing; --force overrides
        with lab.client("h1") as c, pytest.raises(RefusedError) as e:
            c.cluster_create("val", urls)
        assert e.value.field == "nodes" and "switches (h2)" in e.value.message
        assert etcd.get_prefix("/vmferry/") == []
        forced = ferry("--host", "h1", "cluster", "create", "val", "--nodes", "h1,h2", "--force")
        assert forced.returncode == 0, forced.stderr
        assert ferry("--host", "h1", "cluster", "destroy", "val").returncode == 0
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=False)
        locked.rmdir()
        with lab.client("h1") as c:
            c.update_settings(switches=before)


@pytest.mark.slow
def test_losing_etcd_quorum_fences_clustered_vms_as_documented(lab: LabHandle, etcd: Etcd) -> None:
    """docs/cluster.md: with no etcd majority no node can renew, so every node fences."""
    lab.make_vm("h1", "quorum1", roles="heartbeat")
    stopped: list[str] = []
    try:
        with cluster(lab, "noq", "h1", "h2"):
            ClusterStore(etcd).set_clustered_vm("noq", ClusteredVM(name="quorum1", node="h1"))
            with lab.client("h1") as c:
                wait_for(lambda: c.cluster_member()["clustered_vms"] == ["quorum1"], 10, "cache")
                pid = int(c.vm("quorum1")["pid"])
            try:
                for m in lab.lab.etcd_members()[:2]:
                    lab.lab.stop_etcd_member(m.name)
                    stopped.append(m.name)
                t0 = time.monotonic()
                wait_for(lambda: not _alive(pid), 15, "h1 to fence its clustered VM")
                took = time.monotonic() - t0
                assert took < 6, took  # TTL/2 (3 s) after the last renewal, + the kill
                with lab.client("h1") as c:
                    me = wait_for(
                        lambda: (m := c.cluster_member())["fenced_vms"] and m, 5, "fence report"
                    )
                    assert me["fenced_vms"] == ["quorum1"] and me["etcd_error"]
            finally:
                for name in stopped:
                    lab.lab.start_etcd_member(name)
                stopped.clear()
            wait_for(lambda: all(h["ok"] for h in etcd.health()), 30, "etcd back")
            wait_for(lambda: _all_alive(lab, "noq"), 30, "both nodes back")
            with lab.client("h1") as c:
                assert c.vm("quorum1")["state"] == "off"  # not restarted by the old owner
    finally:
        for name in stopped:
            lab.lab.start_etcd_member(name)
        with contextlib.suppress(FerryError):
            lab.remove_vm("h1", "quorum1")


@pytest.mark.slow
def test_a_killed_agent_still_fences_through_its_guard(lab: LabHandle, etcd: Etcd) -> None:
    """ferryd SIGKILLed: nobody renews its lease, so its clustered VM must stop before expiry."""
    lab.make_vm("h2", "guard1", roles="heartbeat")
    try:
        with cluster(lab, "gd", "h1", "h2"):
            ClusterStore(etcd).set_clustered_vm("gd", ClusteredVM(name="guard1", node="h2"))
            with lab.client("h2") as c:
                wait_for(lambda: c.cluster_member()["clustered_vms"] == ["guard1"], 10, "cache")
                pid = int(c.vm("guard1")["pid"])
            state_dir = lab.lab.host_dir("h2") / "state"
            wait_for(lambda: guard.running_guard(state_dir), 10, "h2's fence guard")
            alive_key = Keys("gd").alive("h2")
            lab.lab.kill_agent("h2")
            t_kill = time.monotonic()
            t_fenced = t_expired = None
            while time.monotonic() - t_kill < 30 and (t_fenced is None or t_expired is None):
                now = time.monotonic()
                if t_fenced is None and not _alive(pid):
                    t_fenced = now
                if t_expired is None and etcd.get(alive_key) is None:
                    t_expired = now
                time.sleep(0.05)
            assert t_fenced is not None, "nothing stopped the clustered VM of the dead agent"
            assert t_expired is not None
            assert t_fenced < t_expired, (t_fenced - t_kill, t_expired - t_kill)
            print(f"guard fenced {t_fenced - t_kill:.2f} s after the kill, "
                  f"lease keys gone {t_expired - t_kill:.2f} s after it")  # fmt: skip
            wait_for(lambda: guard.running_guard(state_dir) is None, 5, "the guard to exit")
            lab.lab.start_agent("h2")
            wait_for(lambda: _all_alive(lab, "gd"), 20, "h2 back")
            with lab.client("h2") as c:
                assert c.vm("guard1")["state"] == "off"  # fenced, and not restarted
    finally:
        if lab.lab.agent_pid("h2") is None:
            lab.lab.start_agent("h2")
        with contextlib.suppress(FerryError):
            lab.remove_vm("h2", "guard1")
