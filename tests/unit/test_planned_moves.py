"""Planned moves, drains and failbacks (cluster/planned.py) against a real loopback etcd, with
fake agents (no QEMU): the records, the leader's drain passes, the failover of a VM whose owner
died in the middle of a planned move."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from test_failover_controller import (
    FakeAgents,
    _controller,
    _settle,
    _setup,
    _state,
    _teardown,
    _vm,
)

from vmferry.cluster.controller import rooms
from vmferry.cluster.planned import ClusterMoves, OwnerMoves, move_rooms
from vmferry.cluster.store import ClusterVMStore
from vmferry.errors import ConflictError, NotFoundError, RefusedError
from vmferry.migration.model import Job, JobState, MoveRequest


class MoveAgents(FakeAgents):
    """Fake agents that also take planned moves: each owner's jobs are a dict the test ends."""

    def __init__(self, free: dict[str, int]) -> None:
        super().__init__(free)
        self.jobs: dict[str, dict[str, Any]] = {}
        self.moves: list[tuple[str, str, str, bool]] = []
        self.refuse: set[str] = set()
        self.store: ClusterVMStore | None = None
        self.groups: list[tuple[str, str | None, int]] = []
        self.cancelled: list[str] = []

    async def start_planned_move(
        self,
        url: str,
        vm: str,
        to: str,
        quick: bool,
        reason: str,
        group: str | None = None,
        group_limit: int = 0,
    ) -> dict[str, Any]:
        owner = self._node(url)
        self.groups.append((vm, group, group_limit))
        if vm in self.refuse:
            raise ConflictError(f"VM {vm!r} cannot move live: a pass-through disk")
        assert self.store is not None
        self.store.begin_move("dr", vm, owner, to)  # what the owner's agent does first
        job_id = f"job-{vm}-{len(self.moves)}"
        self.moves.append((owner, vm, to, quick))
        self.jobs[job_id] = {"id": job_id, "state": "running", "vm": vm, "owner": owner, "to": to}
        return {"job": self.jobs[job_id]}

    async def migration(self, url: str, job_id: str) -> dict[str, Any]:
        return self.jobs[job_id]

    async def cancel_migration(self, url: str, job_id: str) -> dict[str, Any]:
        job = self.jobs[job_id]
        job["state"] = "cancelled"
        self.cancelled.append(job["vm"])
        assert self.store is not None
        self.store.end_move("dr", job["vm"], job["owner"], job["to"], False)
        return job

    def finish(self, vm: str, ok: bool = True) -> None:
        """End the VM's running job the way the owner's watcher does."""
        assert self.store is not None
        job = next(j for j in self.jobs.values() if j["vm"] == vm and j["state"] == "running")
        job["state"] = "completed" if ok else "failed"
        if not ok:
            job["error"] = {"message": "the destination QEMU died"}
        self.store.end_move("dr", vm, job["owner"], job["to"], ok)


def _running(agents: MoveAgents) -> list[str]:
    return sorted(j["vm"] for j in agents.jobs.values() if j["state"] == "running")


def test_move_records_mark_both_nodes_and_record_the_outcome(etcd_url: str) -> None:
    etcd, lease = _setup(etcd_url, "mv", [_vm("a", "n1"), _vm("b", "n1")], ["n1", "n2", "n3"])
    store = ClusterVMStore(etcd)
    try:
        with pytest.raises(ConflictError, match="owned by n1"):
            store.begin_move("mv", "a", "n2", "n3")
        with pytest.raises(NotFoundError):
            store.begin_move("mv", "a", "n1", "nX")
        vm = store.begin_move("mv", "a", "n1", "n2")
        assert vm.moving_to == "n2"
        with pytest.raises(ConflictError, match="already moving"):
            store.begin_move("mv", "a", "n1", "n3")
        # the destination holds it too (it fences it with its own lease)
        assert [v.name for v in store.clustered_vms("mv", "n2")] == ["a"]
        assert sorted(v.name for v in store.clustered_vms("mv", "n1")) == ["a", "b"]
        assert store.end_move("mv", "a", "n1", "n2", completed=True)
        rec = store.vm_record("mv", "a")[0]  # type: ignore[index]
        assert (rec.node, rec.moving_to) == ("n2", None)
        assert not store.end_move("mv", "a", "n1", "n2", completed=True)  # recorded once
        store.begin_move("mv", "b", "n1", "n3")
        assert store.end_move("mv", "b", "n1", "n3", completed=False)
        rec = store.vm_record("mv", "b")[0]  # type: ignore[index]
        assert (rec.node, rec.moving_to) == ("n1", None)
        # a paused node takes no VM
        node, rev = store.node_record("mv", "n3")  # type: ignore[misc]
        assert store.update_node("mv", node.model_copy(update={"paused": True}), rev)
        with pytest.raises(ConflictError, match="paused"):
            store.begin_move("mv", "b", "n1", "n3")
    finally:
        _teardown(etcd, lease, "mv")


def test_paused_nodes_and_moves_in_flight_count_in_rooms() -> None:
    st = _state(["n1", "n2", "n3"], [_vm("m", "n1", moving_to="n2", memory_mib=300)])
    st.nodes["n3"].paused = True
    free = {"n1": 1000, "n2": 1000, "n3": 5000}
    r = {x.name: x for x in rooms(st, free, in_flight=set())}
    assert set(r) == {"n1", "n2"} and r["n2"].free_mib == 700
    mr = {x.name: x for x in move_rooms(st, free, exclude={"n1"})}
    assert set(mr) == {"n2"} and mr["n2"].free_mib == 700


def test_move_refusals_name_the_field(etcd_url: str) -> None:
    vms = [_vm("a", "n1", possible=["n1", "n2"]), _vm("dead", "n3")]
    etcd, lease = _setup(etcd_url, "mr", vms, ["n1", "n2"])
    agents = MoveAgents({"n1": 4000, "n2": 4000, "n3": 4000})
    moves = ClusterMoves(lambda: ClusterVMStore(etcd), agents)
    try:

        def refused(*args: Any) -> Exception:
            with pytest.raises((RefusedError, ConflictError, NotFoundError)) as info:
                asyncio.run(moves.move("mr", *args, None))
            return info.value

        assert "not clustered" in str(refused("zz", "n2", False, False))
        assert refused("a", None, False, False).field == "to"  # neither --to nor --best
        assert "already runs on" in str(refused("a", "n1", False, False))
        assert "not a node" in str(refused("a", "n9", False, False))
        assert "no lease" in str(refused("a", "n3", False, False))  # n3 is down
        assert "has no lease" in str(refused("dead", "n1", False, False))  # the owner is down
        assert agents.moves == []
    finally:
        _teardown(etcd, lease, "mr")


def test_drain_moves_by_priority_within_concurrency_and_fails_back(etcd_url: str) -> None:
    vms = [
        _vm("low1", "n1", priority="low"), _vm("hi1", "n1", priority="high"),
        _vm("med1", "n1"), _vm("stuck", "n1", priority="low"), _vm("other", "n2"),
    ]  # fmt: skip
    etcd, lease = _setup(etcd_url, "dr", vms, ["n1", "n2", "n3"])
    store = ClusterVMStore(etcd)
    agents = MoveAgents({"n1": 4000, "n2": 2000, "n3": 4000})
    agents.store = store
    agents.refuse.add("stuck")
    for v in vms:
        agents.vms[v.node][v.name] = {"name": v.name, "uuid": f"uuid-{v.name}", "state": "running"}
    ctl = _controller(etcd_url, "dr", agents)  # n2 leads; drain_concurrency defaults to 2
    moves = ClusterMoves(lambda: ClusterVMStore(etcd), agents)
    try:
        asyncio.run(moves.drain("dr", "n1", "admin"))
        with pytest.raises(ConflictError, match="already running"):
            asyncio.run(moves.drain("dr", "n1", "admin"))

        def step() -> None:
            asyncio.run(ctl.run_once())

        step()
        # every VM is asked for at once, highest priority first, in one queue group that the
        # owner runs drain_concurrency (2) at a time; stuck's owner refuses it: reported, stays
        assert [m[1] for m in agents.moves] == ["hi1", "med1", "low1"]
        assert {g for _, g, _ in agents.groups} == {"drain:n1"}
        assert {n for _, _, n in agents.groups} == {2}
        assert {to for _, _, to, _ in agents.moves} == {"n3"}  # most room; n1 is paused
        drain = store.node_record("dr", "n1")[0].drain  # type: ignore[index]
        assert drain is not None and drain.status == "running"
        assert "pass-through" in drain.failed["stuck"]
        step()
        assert len(agents.moves) == 3  # nothing is asked twice
        agents.finish("hi1")
        agents.finish("med1")
        step()
        drain = store.node_record("dr", "n1")[0].drain  # type: ignore[index]
        assert drain is not None and drain.status == "running"
        assert drain.moved == {"hi1": "n3", "med1": "n3"}
        agents.finish("low1", ok=False)
        step()
        node = store.node_record("dr", "n1")[0]  # type: ignore[index]
        assert node.paused and node.drain is not None and node.drain.status == "failed"
        assert set(node.drain.moved) == {"hi1", "med1"}
        assert set(node.drain.failed) == {"low1", "stuck"}
        recs = {v.name: v.node for v in store.clustered_vms("dr")}
        assert recs == {"hi1": "n3", "med1": "n3", "low1": "n1", "stuck": "n1", "other": "n2"}
        kinds = [e.kind for e in store.events("dr")]
        assert "drain-started" in kinds and "drain-failed" in kinds
        # failover does not place on a paused node either
        assert "n1" not in {r.name for r in rooms(store.load("dr"), agents.free, set())}

        # resume --failback: the VMs the drain moved come back to n1
        asyncio.run(moves.resume("dr", "n1", True, "admin"))
        step()
        assert sorted(m[1] for m in agents.moves[-2:]) == ["hi1", "med1"]
        assert all(to == "n1" for _, _, to, _ in agents.moves[-2:])
        agents.finish("hi1")
        agents.finish("med1")
        step()
        node = store.node_record("dr", "n1")[0]  # type: ignore[index]
        assert not node.paused and node.drain is not None and node.drain.status == "done"
        assert {v.name: v.node for v in store.clustered_vms("dr")}["hi1"] == "n1"
    finally:
        _teardown(etcd, lease, "dr")


def test_owner_dies_mid_move_the_destination_keeps_what_it_runs(etcd_url: str) -> None:
    vms = [_vm("done", "n1"), _vm("early", "n1"), _vm("recv", "n1")]
    etcd, lease = _setup(etcd_url, "hd", vms, ["n2", "n3"])  # n1 (the owner) has no lease
    store = ClusterVMStore(etcd)
    for v, to in (("done", "n3"), ("early", "n3"), ("recv", "n3")):
        # marked while n1 was alive (bypass the paused/alive checks of a live request)
        got = store.vm_record("hd", v)
        assert got is not None
        store.update_vm("hd", got[0].model_copy(update={"moving_to": to}), got[1])
    agents = FakeAgents({"n1": 0, "n2": 4000, "n3": 4000})
    agents.vms["n3"]["done"] = {"name": "done", "uuid": "uuid-done", "state": "running"}
    agents.vms["n3"]["recv"] = {"name": "recv", "uuid": "uuid-recv", "state": "incoming"}
    ctl = _controller(etcd_url, "hd", agents)
    try:

        async def passes() -> None:
            for _ in range(3):
                await ctl.run_once()
                await _settle(ctl)

        asyncio.run(passes())
        recs = {v.name: v for v in store.clustered_vms("hd")}
        # it already ran on n3: given to n3, not restarted anywhere
        assert recs["done"].node == "n3" and recs["done"].moving_to is None
        assert ("import", "n3", "done") not in agents.calls
        assert not any(c[2] == "done" for c in agents.calls)
        # n3 never got it: the mark is cleared and failover restarts it (once)
        assert recs["early"].moving_to is None and recs["early"].node in ("n2", "n3")
        assert [c for c in agents.calls if c[2] == "early"][-1][0] == "start"
        # n3 is still receiving it: nobody restarts it elsewhere, and the wait is reported
        assert recs["recv"].node == "n1" and recs["recv"].moving_to == "n3"
        assert not any(c[2] == "recv" for c in agents.calls)
        evs = {(e.kind, e.vm) for e in store.events("hd")}
        assert {("handed-over", "done"), ("move-abandoned", "early"), ("waiting", "recv")} <= evs
    finally:
        _teardown(etcd, lease, "hd")


class FakeJobs:
    """The owner's migration jobs (LocalMoves) without QEMU."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self.refuse = False

    async def submit(self, name: str, req: MoveRequest) -> Job:
        if self.refuse:
            raise ConflictError(f"VM {name!r} is off", field="vm")
        job = Job(vm=name, source="n1", destination=req.destination.name,
                  destination_url=req.destination.url, options=req.options)  # fmt: skip
        self.jobs[job.id] = job
        return job

    def job(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def jobs_of(self, vm: str) -> list[Job]:
        return [j for j in self.jobs.values() if j.vm == vm]


def test_owner_watcher_records_outcomes_and_survives_a_restart(etcd_url: str) -> None:
    vms = [_vm("ok", "n1"), _vm("bad", "n1"), _vm("refused", "n1")]
    etcd, lease = _setup(etcd_url, "ow", vms, ["n1", "n2", "n3"])
    store = ClusterVMStore(etcd)
    jobs = FakeJobs()

    def owner() -> OwnerMoves:
        return OwnerMoves(lambda: "n1", lambda: "ow", lambda: ClusterVMStore(etcd), jobs)

    try:
        first = owner()
        j_ok = asyncio.run(first.start("ow", "ok", "n2", "https://n2:7443", False, "test"))
        assert j_ok.options.vm_only and not j_ok.options.quick
        j_bad = asyncio.run(first.start("ow", "bad", "n3", "https://n3:7443", True, "test"))
        assert store.vm_record("ow", "ok")[0].move_job == j_ok.id  # type: ignore[index]
        jobs.refuse = True
        with pytest.raises(ConflictError):
            asyncio.run(first.start("ow", "refused", "n2", "https://n2:7443", False, "test"))
        assert store.vm_record("ow", "refused")[0].moving_to is None  # type: ignore[index]
        asyncio.run(first.check_once())  # both still running: nothing recorded
        assert store.vm_record("ow", "ok")[0].moving_to == "n2"  # type: ignore[index]
        # the agent restarts: a new watcher picks the marks up from etcd
        second = owner()
        j_ok.state = JobState.COMPLETED
        j_bad.state = JobState.FAILED
        asyncio.run(second.check_once())
        ok, bad = (store.vm_record("ow", n)[0] for n in ("ok", "bad"))  # type: ignore[index]
        assert (ok.node, ok.moving_to) == ("n2", None)
        assert (bad.node, bad.moving_to) == ("n1", None)
        kinds = {(e.kind, e.vm) for e in store.events("ow")}
        assert {("moved", "ok"), ("move-failed", "bad")} <= kinds
    finally:
        _teardown(etcd, lease, "ow")


def test_resume_during_a_drain_cancels_the_moves_still_queued(etcd_url: str) -> None:
    vms = [_vm("a", "n1", priority="high"), _vm("b", "n1"), _vm("c", "n1", priority="low")]
    etcd, lease = _setup(etcd_url, "dr", vms, ["n1", "n2", "n3"])
    store = ClusterVMStore(etcd)
    agents = MoveAgents({"n1": 4000, "n2": 4000, "n3": 4000})
    agents.store = store
    for v in vms:
        agents.vms["n1"][v.name] = {"name": v.name, "uuid": f"uuid-{v.name}", "state": "running"}
    ctl = _controller(etcd_url, "dr", agents)
    moves = ClusterMoves(lambda: ClusterVMStore(etcd), agents)
    try:
        asyncio.run(moves.drain("dr", "n1", "admin"))
        asyncio.run(ctl.run_once())
        assert [m[1] for m in agents.moves] == ["a", "b", "c"]
        # the owner runs two; the third waits in its queue
        next(j for j in agents.jobs.values() if j["vm"] == "c")["state"] = "queued"
        asyncio.run(moves.resume("dr", "n1", False, "admin"))
        asyncio.run(ctl.run_once())
        assert agents.cancelled == ["c"]  # the running ones finish; the queued one is dropped
        assert store.vm_record("dr", "c")[0].moving_to is None  # type: ignore[index]
        node = store.node_record("dr", "n1")[0]  # type: ignore[index]
        assert not node.paused and node.drain is None
    finally:
        _teardown(etcd, lease, "dr")
