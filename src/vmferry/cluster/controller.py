"""The failover controller: runs on the elected leader and restarts a dead node's clustered VMs.

Every ``TICK`` the leader reads the cluster (one etcd range read). A node whose ``alive`` key is
gone has lost its lease: etcd deleted the key when the lease expired, and the node stopped its
clustered VMs at least 0.5 s before that (self-fencing, or its fence guard). For each clustered VM
such a node owned:

1. :func:`plan` (pure) lists what needs a node, what waits for a restart, what is in flight;
2. the alive nodes' agents report their free memory; :func:`vmferry.cluster.placement.place`
   (pure) picks the best possible node, highest priority first;
3. one etcd transaction gives the VM to that node — it holds only while the old owner still has
   no lease, the VM record is unchanged and this node still holds the leader key — with
   ``restart_pending`` set;
4. the new node's agent imports the VM's configuration from the shared volume (``vm import``,
   which also refuses while any QEMU holds the VM's disks) and starts it — unless the admin had
   stopped it (``keep_off``: it stays off there); then ``restart_pending`` is cleared. At most
   ``cluster.failover_concurrency`` restarts run at once.

A VM that cannot be placed stays owned by the dead node and is reported (event + controller
report) and placed on a later pass once a node has room; a failed restart stays pending on its
node and is retried after ``RETRY_S``. Events record what moved where, why and how long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmferry.cluster.etcd import EtcdUnavailable
from vmferry.cluster.member import ClusterMember, EtcdCache
from vmferry.cluster.placement import NodeRoom, Placement, VMDemand, place
from vmferry.cluster.planned import Drains, MoveCalls, free_memory
from vmferry.cluster.store import (
    ClusteredVM,
    ClusterEvent,
    ClusterState,
    ClusterVMStore,
    ControllerReport,
)
from vmferry.errors import FerryError, NotFoundError
from vmferry.host.settings import HostSettings

log = logging.getLogger("vmferry.cluster.controller")

TICK = 1.0
#: How often the leader checks (cheaply) whether a node lost its lease between passes.
ALIVE_CHECK_S = 0.2
#: While a drain or failback runs, a pass every FAST_TICK: a freed move slot is used at once.
FAST_TICK = 0.1
RETRY_S = 10.0


class AgentCalls(MoveCalls, Protocol):
    """What the controller asks the nodes' agents (``api/cluster_peer.py``): what a drain asks
    (:class:`vmferry.cluster.planned.MoveCalls`), and import and start for failover."""

    async def import_vm(self, url: str, path: str) -> dict[str, Any]: ...
    async def start_vm(self, url: str, name: str) -> dict[str, Any]: ...


@dataclass
class Plan:
    """What one pass has to do (see :func:`plan`)."""

    dead: list[str] = field(default_factory=list)
    #: VMs whose owner has no lease: they need a new node.
    orphans: list[ClusteredVM] = field(default_factory=list)
    #: VMs given to an alive node whose restart has not been seen to succeed.
    retries: list[ClusteredVM] = field(default_factory=list)
    #: VMs that cannot be failed over at all, with why (e.g. no folder recorded).
    broken: dict[str, str] = field(default_factory=dict)
    #: VMs whose owner died during a planned move to a node that is alive: ask that node first.
    handoffs: list[ClusteredVM] = field(default_factory=list)


def plan(state: ClusterState, in_flight: Iterable[str], now: float = 0.0,
         retry_at: dict[str, float] | None = None) -> Plan:  # fmt: skip
    """Which clustered VMs need a node, which need their restart retried (pure)."""
    busy = set(in_flight)
    retry_at = retry_at or {}
    alive = {n for n in state.nodes if n in state.alive}
    out = Plan(dead=sorted(n for n in state.nodes if n not in alive))
    for vm in sorted(state.vms.values(), key=lambda v: v.name):
        if vm.name in busy:
            continue
        if vm.node not in alive:
            if vm.moving_to in alive:
                out.handoffs.append(vm)
            elif not vm.storage_dir:
                out.broken[vm.name] = "no folder on a shared volume is recorded for it"
            else:
                out.orphans.append(vm)
        elif vm.restart_pending and retry_at.get(vm.name, 0.0) <= now:
            out.retries.append(vm)
    return out


def rooms(
    state: ClusterState, free_mib: dict[str, int], in_flight: Iterable[str]
) -> list[NodeRoom]:
    """The alive, unpaused nodes that answered with their free memory, less what is promised to
    VMs not yet started there (restarts, planned moves heading there), with the anti-affinity
    groups each node already holds (pure)."""
    busy = set(in_flight)
    out: dict[str, NodeRoom] = {n: NodeRoom(n, free, Counter()) for n, free in free_mib.items()
                                if n in state.alive and not _paused(state, n)}  # fmt: skip
    for vm in state.vms.values():
        moving = out.get(vm.moving_to) if vm.moving_to else None
        if moving is not None:
            moving.free_mib -= vm.memory_mib
            if vm.anti_affinity:
                moving.groups[vm.anti_affinity] += 1
        room = out.get(vm.node)
        if room is None:
            continue
        if vm.anti_affinity:
            room.groups[vm.anti_affinity] += 1
        if vm.restart_pending or vm.name in busy:
            room.free_mib -= vm.memory_mib  # promised, its QEMU is not counted by the agent yet
    return sorted(out.values(), key=lambda r: r.name)


def _paused(state: ClusterState, node: str) -> bool:
    rec = state.nodes.get(node)
    return rec is not None and rec.paused


def demand(vm: ClusteredVM) -> VMDemand:
    """The placement view of a clustered VM."""
    return VMDemand(
        name=vm.name, memory_mib=vm.memory_mib, priority=vm.priority,
        preferred=tuple(vm.preferred), possible=tuple(vm.possible),
        anti_affinity=vm.anti_affinity,
    )  # fmt: skip


class Controller:
    """Runs while this node is the leader: failover of clustered VMs."""

    def __init__(
        self, member: ClusterMember, settings: Callable[[], HostSettings], calls: AgentCalls
    ) -> None:
        self.member = member
        self._settings = settings
        self.calls = calls
        self.in_flight: set[str] = set()
        self.retry_at: dict[str, float] = {}
        self.last_seen_alive: dict[str, float] = {}
        self.noticed_dead: dict[str, float] = {}
        self._reported: dict[str, str] = {}
        self._last_report: ControllerReport | None = None
        self._task: asyncio.Task[None] | None = None
        self._restarts: set[asyncio.Task[None]] = set()
        self._sem: asyncio.Semaphore | None = None
        self._etcd = EtcdCache(settings)
        self.last_error: str | None = None
        self.last_pass: dict[str, Any] = {}
        self._wake = asyncio.Event()
        self._alive_seen: set[str] | None = None
        self._pass_revision = 0  # the store revision the last pass read
        self.drains = Drains(lambda: member.node, calls,
                             lambda: self._settings().cluster.drain_concurrency)  # fmt: skip

    # -- tasks ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the loop (it acts only while this node is the leader)."""
        self._task = asyncio.create_task(self._loop(), name="cluster-controller")

    async def stop(self) -> None:
        """Stop the loop and any restart in progress."""
        tasks = [t for t in [self._task, *self._restarts] if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._task = None
        self._etcd.close()

    def _store(self) -> ClusterVMStore:
        return ClusterVMStore(self._etcd.get())

    def wake(self) -> None:
        """Run the next pass now (a drain or resume was just recorded)."""
        self._wake.set()

    def _is_leader(self) -> bool:
        m = self.member
        return bool(m.cluster and m.lease and m.leader == m.node)

    async def _loop(self) -> None:
        while True:
            t0 = time.monotonic()
            try:
                if self._is_leader():
                    await self.run_once()
                else:
                    self.last_seen_alive.clear()
                    self.noticed_dead.clear()
                    self.drains.forget()
                    self._alive_seen = None
                self.last_error = None
            except EtcdUnavailable as exc:
                self.last_error = str(exc)
            except NotFoundError:  # the cluster was destroyed meanwhile
                pass
            except Exception as exc:  # the loop must never die
                log.exception("controller pass failed")
                self.last_error = f"{exc.__class__.__name__}: {exc}"
            tick = FAST_TICK if self.drains.busy else TICK
            await self._wait_next(t0 + tick)
            self._wake.clear()

    async def _wait_next(self, until: float) -> None:
        """Sleep until ``until``, a wake-up, or — on the leader — a change of the alive nodes
        or of a node record (checked every ``ALIVE_CHECK_S`` with keys-only reads): a lost
        lease is acted on within ``ALIVE_CHECK_S`` rather than a whole ``TICK``, and so is a
        drain or resume asked of another node's agent."""
        while (left := until - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(left, ALIVE_CHECK_S))
                return
            cluster = self.member.cluster
            if not self._is_leader() or cluster is None or self._alive_seen is None:
                continue
            try:
                alive, nodes_changed = await asyncio.to_thread(
                    self._store().leader_check, cluster, self._pass_revision
                )
            except (EtcdUnavailable, FerryError):
                return  # the full pass reports it
            if alive != self._alive_seen or nodes_changed:
                return

    # -- one pass -------------------------------------------------------------------------------
    async def run_once(self) -> Placement | None:
        """One controller pass; the placement it made (None when nothing needed a node)."""
        cluster = self.member.cluster
        if cluster is None:
            return None
        store = self._store()
        state, revs, leader_rev = await asyncio.to_thread(store.load_full, cluster)
        if state.leader is None or state.leader.node != self.member.node or leader_rev is None:
            return None
        now = time.time()
        self._alive_seen, self._pass_revision = set(state.alive), state.revision
        for n in state.nodes:
            if n in state.alive:
                self.last_seen_alive[n] = now
                self.noticed_dead.pop(n, None)
            elif n not in self.noticed_dead:
                self.noticed_dead[n] = now
                log.warning("cluster %s: node %s has no lease", cluster, n)
        p = plan(state, self.in_flight, time.monotonic(), self.retry_at)
        for name, why in p.broken.items():
            await self._report_once(store, cluster, name, "unplaced", why, state.vms[name].node)
        for vm in p.retries:
            self._spawn(store, cluster, vm, state, decided_at=now, decide_ms=0.0)
        for vm in p.handoffs:
            await self._handoff(store, cluster, vm, state, revs[vm.name], leader_rev)
        result: Placement | None = None
        if p.orphans:
            free = await self._free_memory(state)
            t0 = time.perf_counter()
            result = place([demand(v) for v in p.orphans], rooms(state, free, self.in_flight))
            decide_ms = (time.perf_counter() - t0) * 1000
            decided_at = time.time()
            batch: list[tuple[ClusteredVM, int, str, ClusterEvent]] = []
            for d in result.decisions:
                vm = state.vms[d.vm]
                new = vm.model_copy(update={"node": d.node, "restart_pending": True})
                timings = self._detect_timings(vm.node, decided_at, decide_ms)
                ev = ClusterEvent(
                    kind="failover", vm=d.vm, node=d.node, from_node=vm.node,
                    by=self.member.node, timings=timings,
                    reason=f"node {vm.node} lost its lease; priority {d.priority}; {d.reason}",
                )  # fmt: skip
                batch.append((new, revs[d.vm], vm.node, ev))
            # one transaction per 50 VMs: each holds only while the old owner has no lease, the
            # record is unchanged and this node still leads (else VM by VM, see reassign_many)
            done = set(await asyncio.to_thread(store.reassign_many, cluster, batch, leader_rev))
            for new, _, dead, ev in batch:
                if new.name not in done:  # the old owner came back, the record changed, or
                    log.info("failover of %s not recorded: the cluster changed", new.name)
                    continue  # we lost the lead
                self._reported.pop(new.name, None)
                self._local(ev)
                log.warning("failover: %s from %s to %s (%s)", new.name, dead, new.node, ev.reason)
                self._spawn(store, cluster, new, state, decided_at, decide_ms)
            for name, why in result.unplaced.items():
                await self._report_once(store, cluster, name, "unplaced", why, state.vms[name].node)
            for name, why in result.skipped.items():
                await self._report_once(store, cluster, name, "skipped", why, state.vms[name].node)
        if self.drains.busy or any(r.drain is not None and r.drain.status == "running"
                                   for r in state.nodes.values()):  # fmt: skip
            await self.drains.step(store, cluster, state, lambda: self._free_memory(state))
        rep = ControllerReport(
            leader=self.member.node, at=now, dead_nodes=p.dead,
            unplaced={**p.broken, **(result.unplaced if result else {})},
            skipped=result.skipped if result else {}, in_flight=sorted(self.in_flight),
        )  # fmt: skip
        if self._last_report is None or _differs(rep, self._last_report):
            await asyncio.to_thread(store.put_report, cluster, rep)
            self._last_report = rep
        self.last_pass = {"at": now, "dead": p.dead, "orphans": [v.name for v in p.orphans]}
        return result

    async def _handoff(self, store: ClusterVMStore, cluster: str, vm: ClusteredVM,
                       state: ClusterState, rev: int, leader_rev: int) -> None:  # fmt: skip
        """The owner died during a planned move: the destination has the VM running (give it
        to it), has nothing (clear the mark; failover restarts it next pass) or still receives
        it (wait: restarting it elsewhere could run it twice)."""
        to = str(vm.moving_to)
        node = state.nodes.get(to)
        if node is None:
            return
        try:
            have = await self.calls.vm(node.url, vm.name)
        except FerryError as exc:
            await self._report_once(store, cluster, vm.name, "waiting",
                                    f"its move to {to} was in progress; {to} did not answer: "
                                    f"{exc.message}", vm.node)  # fmt: skip
            return
        if have is not None and vm.uuid and have.get("uuid") not in (None, vm.uuid):
            have = None  # another VM of that name: not ours
        state_there = have.get("state") if have else None
        if state_there in ("running", "paused"):
            new = vm.model_copy(update={"node": to, "moving_to": None, "move_job": None,
                                        "restart_pending": False})  # fmt: skip
            kind, why = "handed-over", (f"node {vm.node} lost its lease during a planned move; "
                                        f"the VM already ran on {to}")  # fmt: skip
        elif have is None:
            new = vm.model_copy(update={"moving_to": None, "move_job": None})
            kind, why = "move-abandoned", (f"node {vm.node} lost its lease during a planned move "
                                           f"to {to}, which does not have the VM; failover "
                                           "restarts it")  # fmt: skip
        else:
            await self._report_once(store, cluster, vm.name, "waiting",
                                    f"its owner {vm.node} died while moving it to {to}, where "
                                    f"it is {state_there}; waiting for {to} to take it or drop "
                                    "it", vm.node)  # fmt: skip
            return
        if not await asyncio.to_thread(store.reassign, cluster, new, rev, vm.node, leader_rev):
            return
        self._reported.pop(vm.name, None)
        ev = ClusterEvent(kind=kind, vm=vm.name, node=new.node, from_node=vm.node,
                          by=self.member.node, reason=why)  # fmt: skip
        await self._event(store, cluster, ev)
        log.warning("cluster %s: %s: %s", cluster, vm.name, why)

    async def _event(self, store: ClusterVMStore, cluster: str, ev: ClusterEvent) -> None:
        """A cluster event: in etcd (``cluster events``) and in this agent's event log."""
        await asyncio.to_thread(store.add_event, cluster, ev)
        self._local(ev)

    def _local(self, ev: ClusterEvent) -> None:
        events = getattr(getattr(self.member, "vms", None), "events", None)
        if events is not None:
            level = "warning" if ev.kind in ("failover", "unplaced", "restart-failed") else "info"
            events.record(
                f"cluster-{ev.kind}", f"{ev.vm or ''}: {ev.reason}".strip(": "), level=level,
                vm=ev.vm, data={"node": ev.node, "from": ev.from_node, **ev.timings},
            )  # fmt: skip

    def _detect_timings(self, node: str, decided_at: float, decide_ms: float) -> dict[str, float]:
        seen = self.last_seen_alive.get(node)
        noticed = self.noticed_dead.get(node, decided_at)
        t: dict[str, float] = {"noticed_at": noticed, "decided_at": decided_at,
                               "decision_ms": round(decide_ms, 3)}  # fmt: skip
        if seen is not None:  # the lease expired between these two reads of the cluster
            t["last_seen_alive_at"] = seen
        return t

    async def _free_memory(self, state: ClusterState) -> dict[str, int]:
        """Free memory for VMs of each alive node that answers (others get nothing)."""
        return await free_memory(self.calls, state)

    async def _report_once(
        self, store: ClusterVMStore, cluster: str, vm: str, kind: str, why: str, node: str
    ) -> None:
        """An event for a VM that cannot be restarted, once per distinct reason."""
        if self._reported.get(vm) == f"{kind}:{why}":
            return
        self._reported[vm] = f"{kind}:{why}"
        ev = ClusterEvent(kind=kind, vm=vm, from_node=node, reason=why, by=self.member.node)
        await self._event(store, cluster, ev)
        log.warning("failover: %s %s: %s", vm, kind, why)

    # -- restart on the new node ----------------------------------------------------------------
    def _spawn(
        self, store: ClusterVMStore, cluster: str, vm: ClusteredVM, state: ClusterState,
        decided_at: float, decide_ms: float,
    ) -> None:  # fmt: skip
        node = state.nodes.get(vm.node)
        if node is None:
            return
        self.in_flight.add(vm.name)
        task = asyncio.create_task(
            self._restart(store, cluster, vm, node.url, decided_at, decide_ms),
            name=f"failover-{vm.name}",
        )
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    async def _restart(
        self, store: ClusterVMStore, cluster: str, vm: ClusteredVM, url: str,
        decided_at: float, decide_ms: float,
    ) -> None:  # fmt: skip
        if self._sem is None:
            self._sem = asyncio.Semaphore(self._settings().cluster.failover_concurrency)
        try:
            async with self._sem:
                t0 = time.time()
                try:
                    steps = await self._import_and_start(vm, url)
                except FerryError as exc:
                    self.retry_at[vm.name] = time.monotonic() + RETRY_S
                    ev = ClusterEvent(
                        kind="restart-failed", vm=vm.name, node=vm.node, by=self.member.node,
                        reason=f"{exc.message} (retried in {RETRY_S:.0f} s)",
                    )  # fmt: skip
                    await self._event(store, cluster, ev)
                    log.error("failover: restart of %s on %s failed: %s", vm.name, vm.node, exc)
                    return
                started = time.time()
                got = await asyncio.to_thread(store.vm_record, cluster, vm.name)
                if got is not None and got[0].node == vm.node and got[0].restart_pending:
                    done = got[0].model_copy(update={"restart_pending": False})
                    await asyncio.to_thread(store.update_vm, cluster, done, got[1])
                self.retry_at.pop(vm.name, None)
                timings = {
                    "decided_at": decided_at, "started_at": started,
                    "decision_ms": round(decide_ms, 3), "restart_s": round(started - t0, 3),
                    "decided_to_started_s": round(started - decided_at, 3),
                    **steps,
                }  # fmt: skip
                if vm.keep_off:
                    ev = ClusterEvent(kind="rehomed", vm=vm.name, node=vm.node,
                                      by=self.member.node, timings=timings,
                                      reason=f"imported from {vm.storage_dir}; kept off: the "
                                      "admin had stopped it")  # fmt: skip
                else:
                    ev = ClusterEvent(
                        kind="restarted",
                        vm=vm.name,
                        node=vm.node,
                        by=self.member.node,
                        timings=timings,
                        reason=f"imported from {vm.storage_dir} and started",
                    )
                await self._event(store, cluster, ev)
                log.warning("failover: %s %s on %s", vm.name,
                            "is kept off" if vm.keep_off else "runs", vm.node)  # fmt: skip
        except EtcdUnavailable as exc:
            log.error("failover of %s: etcd unavailable: %s", vm.name, exc)
            self.retry_at[vm.name] = time.monotonic() + RETRY_S
        finally:
            self.in_flight.discard(vm.name)

    async def _import_and_start(self, vm: ClusteredVM, url: str) -> dict[str, float]:
        """Import the VM on the node at ``url`` (unless it has it) and start it (unless it runs,
        or the admin had stopped it: ``keep_off``); the seconds each step took."""
        steps: dict[str, float] = {}
        t0 = time.monotonic()
        have = await self.calls.vm(url, vm.name)
        if have is not None and vm.uuid and have.get("uuid") != vm.uuid:
            raise FerryError(
                f"node {vm.node} has another VM named {vm.name!r}",
                fix="rename or delete that VM there",
            )
        if have is None:
            assert vm.storage_dir is not None  # plan() leaves out VMs without one
            have = await self.calls.import_vm(url, vm.storage_dir)
        t1 = time.monotonic()
        steps["import_s"] = round(t1 - t0, 3)
        if not vm.keep_off and have.get("state") not in ("running", "starting"):
            await self.calls.start_vm(url, vm.name)
        steps["start_s"] = round(time.monotonic() - t1, 3)
        return steps

    def status(self) -> dict[str, Any]:
        """This agent's controller view (for ``/v1/cluster/member``)."""
        return {
            "active": self._is_leader(),
            "in_flight": sorted(self.in_flight),
            "last_pass": self.last_pass,
            "error": self.last_error,
        }


def _differs(a: ControllerReport, b: ControllerReport) -> bool:
    keep = {"dead_nodes", "unplaced", "skipped", "in_flight", "leader"}
    return a.model_dump(include=keep) != b.model_dump(include=keep)
