"""The failover controller's decisions: pure planning, and whole passes against a real etcd."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from vmferry.cluster.controller import Controller, plan, rooms
from vmferry.cluster.etcd import Etcd
from vmferry.cluster.member import ClusterMember
from vmferry.cluster.store import (
    AliveRecord,
    ClusteredVM,
    ClusterEvent,
    ClusterInfo,
    ClusterState,
    ClusterVMStore,
    Keys,
    LeaderRecord,
    NodeRecord,
)
from vmferry.errors import ConflictError
from vmferry.host.settings import HostSettings


def _state(alive: list[str], vms: list[ClusteredVM], nodes: tuple[str, ...] = ("n1", "n2", "n3"))\
        -> ClusterState:  # fmt: skip
    return ClusterState(
        info=ClusterInfo(name="c", created_at=0), revision=1,
        nodes={n: NodeRecord(name=n, url=f"https://{n}") for n in nodes},
        alive={n: AliveRecord(node=n, lease=1, ttl_s=6, since=0) for n in alive},
        vms={v.name: v for v in vms},
    )  # fmt: skip


def _vm(name: str, node: str, **kw: Any) -> ClusteredVM:
    kw.setdefault("storage_dir", f"/shared/{name}")
    kw.setdefault("memory_mib", 256)
    return ClusteredVM(name=name, node=node, uuid=f"uuid-{name}", **kw)


def test_plan_lists_the_dead_nodes_vms_only() -> None:
    st = _state(["n2", "n3"], [
        _vm("a", "n1"), _vm("b", "n2"), _vm("busy", "n1"),
        ClusteredVM(name="old", node="n1"),  # recorded without its folder
        _vm("pend", "n3", restart_pending=True), _vm("later", "n2", restart_pending=True),
    ])  # fmt: skip
    p = plan(st, in_flight={"busy"}, now=100.0, retry_at={"later": 200.0})
    assert p.dead == ["n1"]
    assert [v.name for v in p.orphans] == ["a"]
    assert "no folder" in p.broken["old"]
    assert [v.name for v in p.retries] == ["pend"]  # "later" waits for its back-off
    # nothing is dead: nothing to do
    assert not plan(_state(["n1", "n2", "n3"], [_vm("a", "n1")]), set()).orphans


def test_rooms_count_groups_and_promised_memory_of_alive_nodes() -> None:
    st = _state(["n2", "n3"], [
        _vm("a", "n2", anti_affinity="g"), _vm("p", "n3", restart_pending=True, memory_mib=300),
        _vm("x", "n1", anti_affinity="g"),
    ])  # fmt: skip
    r = {x.name: x for x in rooms(st, {"n1": 5000, "n2": 1000, "n3": 1000}, in_flight=set())}
    assert set(r) == {"n2", "n3"}  # a dead node's answer (if any) does not count
    assert r["n2"].groups["g"] == 1 and r["n2"].free_mib == 1000
    assert r["n3"].free_mib == 700  # promised to "p", whose QEMU the agent does not count yet


# -- whole passes against a real etcd ------------------------------------------------------------


class FakeAgents:
    """The nodes' agents as the controller sees them: free memory, import, start."""

    def __init__(self, free: dict[str, int]) -> None:
        self.free = free
        self.vms: dict[str, dict[str, dict[str, Any]]] = {n: {} for n in free}
        self.calls: list[tuple[str, str, str]] = []
        self.fail_import: set[str] = set()

    @staticmethod
    def _node(url: str) -> str:
        return url.removeprefix("https://")

    async def host_info(self, url: str) -> dict[str, Any]:
        return {"memory_free_for_vms_mib": self.free[self._node(url)]}

    async def vm(self, url: str, name: str) -> dict[str, Any] | None:
        return self.vms[self._node(url)].get(name)

    async def import_vm(self, url: str, path: str) -> dict[str, Any]:
        node, name = self._node(url), Path(path).name
        self.calls.append(("import", node, name))
        if name in self.fail_import:
            raise ConflictError(f"VM {name!r} is open in a QEMU process (image locked)")
        self.vms[node][name] = {"name": name, "uuid": f"uuid-{name}", "state": "off"}
        return self.vms[node][name]

    async def start_vm(self, url: str, name: str) -> dict[str, Any]:
        node = self._node(url)
        self.calls.append(("start", node, name))
        self.vms[node][name]["state"] = "running"
        return self.vms[node][name]


def _setup(url: str, name: str, vms: list[ClusteredVM], alive: list[str]) -> tuple[Etcd, int]:
    """A cluster n1..n3 in etcd: ``alive`` hold leases, n2 is the leader; returns its lease."""
    etcd = Etcd([url], timeout=2)
    store = ClusterVMStore(etcd)
    for n in ("n1", "n2", "n3"):
        etcd.delete(Keys.membership(n))
    store.create(name, [NodeRecord(name=n, url=f"https://{n}") for n in ("n1", "n2", "n3")])
    lease = etcd.grant(30)
    keys = Keys(name)
    for n in alive:
        store.announce(name, AliveRecord(node=n, lease=lease, ttl_s=30, since=time.time()))
    etcd.put(keys.leader, LeaderRecord(node="n2", lease=lease, since=0).model_dump_json(), lease)
    for vm in vms:
        store.add_vm(name, vm)
    return etcd, lease


def _teardown(etcd: Etcd, lease: int, name: str) -> None:
    """Undo :func:`_setup`: the lease, the clustered VMs, the cluster."""
    store = ClusterVMStore(etcd)
    etcd.revoke(lease)
    for v in store.clustered_vms(name):
        store.remove_clustered_vm(name, v.name)
    store.destroy(name)
    etcd.close()


def _controller(url: str, cluster: str, agents: FakeAgents) -> Controller:
    member = SimpleNamespace(cluster=cluster, lease=1, leader="n2", node="n2")
    settings = HostSettings.model_validate(
        {"name": "n2", "cluster": {"etcd": {"endpoints": [url]}, "failover_concurrency": 2}}
    )
    return Controller(cast(ClusterMember, member), lambda: settings, agents)


async def _settle(ctl: Controller) -> None:
    while ctl._restarts:
        await asyncio.gather(*list(ctl._restarts))


def _kinds(evs: list[ClusterEvent]) -> list[tuple[str, str | None, str | None]]:
    return [(e.kind, e.vm, e.node) for e in evs if e.kind != "added"]


def test_a_pass_restarts_the_dead_nodes_vms_and_reports_what_it_cannot(etcd_url: str) -> None:
    vms = [
        _vm("web", "n1", priority="high", anti_affinity="web"),
        _vm("web2", "n3", anti_affinity="web"),
        _vm("huge", "n1", priority="low", memory_mib=5000),
        _vm("manual", "n1", priority="no-auto-start"),
        _vm("stays", "n2"),
    ]
    etcd, lease = _setup(etcd_url, "fo", vms, alive=["n2", "n3"])
    store = ClusterVMStore(etcd)
    agents = FakeAgents({"n1": 99999, "n2": 2000, "n3": 4000})
    ctl = _controller(etcd_url, "fo", agents)
    try:

        async def run() -> None:
            await ctl.run_once()
            await _settle(ctl)
            await ctl.run_once()  # a second pass changes nothing and repeats no event
            await _settle(ctl)

        asyncio.run(run())
        recs = {v.name: v for v in store.clustered_vms("fo")}
        # n3 has more room, but runs a "web" VM already: anti-affinity sends "web" to n2
        assert recs["web"].node == "n2" and not recs["web"].restart_pending
        assert agents.calls == [("import", "n2", "web"), ("start", "n2", "web")]
        assert recs["huge"].node == "n1" and recs["manual"].node == "n1"  # reported, kept
        assert recs["stays"].node == "n2"
        evs = store.events("fo")
        assert _kinds(evs) == [
            ("failover", "web", "n2"), ("unplaced", "huge", None), ("skipped", "manual", None),
            ("restarted", "web", "n2"),
        ]  # fmt: skip
        fo = next(e for e in evs if e.kind == "failover")
        assert (
            fo.from_node == "n1" and "lost its lease" in fo.reason and "priority high" in fo.reason
        )
        assert {"noticed_at", "decided_at", "decision_ms"} <= set(fo.timings)
        assert "restart_s" in next(e for e in evs if e.kind == "restarted").timings
        rep = store.report("fo")
        assert rep is not None and rep.dead_nodes == ["n1"]
        assert "needs 5000 MiB" in rep.unplaced["huge"] and "manual" in rep.skipped

        # capacity appears: the unplaced VM is placed on a later pass, not forgotten
        agents.free["n3"] = 8000
        asyncio.run(run())
        assert store.vm_record("fo", "huge")[0].node == "n3"  # type: ignore[index]
        assert ("start", "n3", "huge") in agents.calls
        assert store.report("fo").unplaced == {}  # type: ignore[union-attr]
    finally:
        _teardown(etcd, lease, "fo")


def test_a_vm_the_admin_stopped_is_given_a_node_but_not_started(etcd_url: str) -> None:
    etcd, lease = _setup(etcd_url, "off", [_vm("kept", "n1", keep_off=True)], alive=["n2", "n3"])
    store = ClusterVMStore(etcd)
    agents = FakeAgents({"n1": 0, "n2": 2000, "n3": 4000})
    ctl = _controller(etcd_url, "off", agents)
    try:

        async def run() -> None:
            for _ in range(2):  # a later pass does not start it either
                await ctl.run_once()
                await _settle(ctl)

        asyncio.run(run())
        rec = store.vm_record("off", "kept")
        assert rec is not None and rec[0].node == "n3" and not rec[0].restart_pending
        assert rec[0].keep_off
        assert agents.calls == [("import", "n3", "kept")]  # registered there, not started
        assert agents.vms["n3"]["kept"]["state"] == "off"
        kinds = _kinds(store.events("off"))
        assert kinds == [("failover", "kept", "n3"), ("rehomed", "kept", "n3")]
        ev = next(e for e in store.events("off") if e.kind == "rehomed")
        assert "kept off" in ev.reason
    finally:
        _teardown(etcd, lease, "off")


def test_no_failover_while_the_old_owner_holds_its_lease_or_we_lost_the_lead(etcd_url: str) -> None:
    etcd, lease = _setup(etcd_url, "safe", [_vm("db", "n1")], alive=["n2", "n3"])
    store = ClusterVMStore(etcd)
    agents = FakeAgents({"n1": 0, "n2": 4000, "n3": 4000})
    try:
        got = store.vm_record("safe", "db")
        assert got is not None
        vm, rev = got
        leader_rev = etcd.get(Keys("safe").leader).mod_revision  # type: ignore[union-attr]
        # n1 comes back (its alive key exists again): the reassignment must not happen
        n1_lease = etcd.grant(30)
        store.announce("safe", AliveRecord(node="n1", lease=n1_lease, ttl_s=30, since=0))
        moved = vm.model_copy(update={"node": "n2", "restart_pending": True})
        assert not store.reassign("safe", moved, rev, "n1", leader_rev)
        assert store.vm_record("safe", "db")[0].node == "n1"  # type: ignore[index]
        etcd.revoke(n1_lease)  # n1's lease is gone for good
        # another node took the lead meanwhile: this controller's transaction refuses too
        assert not store.reassign("safe", moved, rev, "n1", leader_rev + 1000)
        assert store.reassign("safe", moved, rev, "n1", leader_rev)
        # a controller that is not the leader does nothing
        ctl = _controller(etcd_url, "safe", agents)
        ctl.member.leader = "n3"  # type: ignore[misc]
        assert ctl._is_leader() is False
        assert agents.calls == []
    finally:
        _teardown(etcd, lease, "safe")


def test_a_failed_restart_stays_pending_and_is_retried(etcd_url: str) -> None:
    etcd, lease = _setup(etcd_url, "retry", [_vm("app", "n1")], alive=["n2", "n3"])
    store = ClusterVMStore(etcd)
    agents = FakeAgents({"n1": 0, "n2": 1000, "n3": 4000})
    agents.fail_import.add("app")
    ctl = _controller(etcd_url, "retry", agents)
    try:

        async def once() -> None:
            await ctl.run_once()
            await _settle(ctl)

        asyncio.run(once())
        rec = store.vm_record("retry", "app")[0]  # type: ignore[index]
        assert rec.node == "n3" and rec.restart_pending
        evs = store.events("retry")
        failed = [e for e in evs if e.kind == "restart-failed"]
        assert failed and "image locked" in failed[0].reason
        asyncio.run(once())  # inside the back-off: no new attempt
        assert agents.calls.count(("import", "n3", "app")) == 1
        agents.fail_import.clear()
        ctl.retry_at["app"] = 0.0  # the back-off is over
        asyncio.run(once())
        rec = store.vm_record("retry", "app")[0]  # type: ignore[index]
        assert rec.node == "n3" and not rec.restart_pending
        assert agents.vms["n3"]["app"]["state"] == "running"
    finally:
        _teardown(etcd, lease, "retry")


def test_the_leaders_cheap_check_sees_a_node_record_written_after_its_pass(etcd_url: str) -> None:
    """A drain asked of another node's agent is seen within a check, not a whole tick."""
    etcd, lease = _setup(etcd_url, "chk", [_vm("a", "n1")], alive=["n1", "n2"])
    store = ClusterVMStore(etcd)
    try:
        state = store.load("chk")
        alive, changed = store.leader_check("chk", state.revision)
        assert alive == {"n1", "n2"} and not changed
        store.update_vm("chk", state.vms["a"].model_copy(update={"priority": "high"}),
                        store.vm_record("chk", "a")[1])  # type: ignore[index]  # fmt: skip
        assert not store.leader_check("chk", state.revision)[1]  # VM records do not count
        node = state.nodes["n1"].model_copy(update={"paused": True})
        rec = etcd.get(Keys("chk").node("n1"))
        assert rec is not None and store.update_node("chk", node, rec.mod_revision)
        assert store.leader_check("chk", state.revision)[1]
        assert not store.leader_check("chk", store.load("chk").revision)[1]
    finally:
        _teardown(etcd, lease, "chk")


def test_reassign_many_records_in_batches_and_one_changed_record_holds_back_no_other(
    etcd_url: str,
) -> None:
    vms = [_vm(f"v{i}", "n1") for i in range(7)]
    etcd, lease = _setup(etcd_url, "batch", vms, alive=["n2", "n3"])
    store = ClusterVMStore(etcd)
    try:
        leader_rev = etcd.get(Keys("batch").leader).mod_revision  # type: ignore[union-attr]
        moves = []
        for v in vms:
            vm, rev = store.vm_record("batch", v.name)  # type: ignore[misc]
            new = vm.model_copy(update={"node": "n2", "restart_pending": True})
            moves.append((new, rev, "n1", ClusterEvent(kind="failover", vm=v.name, node="n2")))
        assert store.leader_check("batch", 0)[0] == {"n2", "n3"}  # the leader's cheap check
        # v3 changes after it was read: its chunk falls back to one transaction per VM
        vm3, rev3 = store.vm_record("batch", "v3")  # type: ignore[misc]
        store.update_vm("batch", vm3.model_copy(update={"priority": "high"}), rev3)
        done = store.reassign_many("batch", moves, leader_rev, chunk=3)
        assert sorted(done) == ["v0", "v1", "v2", "v4", "v5", "v6"]
        recs = {v.name: v.node for v in store.clustered_vms("batch")}
        assert recs["v3"] == "n1" and all(recs[n] == "n2" for n in done)
        assert sorted(e.vm or "" for e in store.events("batch") if e.kind == "failover") == done
        # a lost lead records nothing at all (v3's record is current this time)
        vm3, rev3 = store.vm_record("batch", "v3")  # type: ignore[misc]
        ev = ClusterEvent(kind="failover", vm="v3", node="n3")
        late = [(vm3.model_copy(update={"node": "n3"}), rev3, "n1", ev)]
        assert store.reassign_many("batch", late, leader_rev + 1000) == []
        assert store.reassign_many("batch", late, leader_rev) == ["v3"]
    finally:
        _teardown(etcd, lease, "batch")
