"""Planned moves of clustered VMs: ``ferry cluster move``, ``drain`` and ``resume --failback``.

A planned move is a live move (or a quick one) that the cluster knows about, so that a VM never
runs twice and never goes missing, even when a node dies in the middle:

1. the owner marks the VM record ``moving_to = <destination>`` in one etcd transaction
   (:meth:`ClusterVMStore.begin_move`). From then on both nodes hold the VM: each fences it
   with its own lease, and the failover controller, if the owner dies, asks the destination
   first (a VM that already runs there is given to it, not restarted elsewhere);
2. the owner's agent runs the move as an ordinary migration job (engine.py or quick.py);
3. :class:`OwnerMoves` watches the job and records its outcome in etcd: the destination owns
   the VM (completed) or the owner keeps it (failed, cancelled). A hand-over that is still
   pending keeps the mark until an admin completes it. After an agent restart, the marks of
   this node's VMs are picked up again from etcd.

A drain (:class:`Drains`, run by the leader's controller) pauses a node — paused nodes receive
no VMs — and moves its clustered VMs, highest priority first, to the best possible nodes with
at most ``cluster.drain_concurrency`` moves at once (all are asked for at once, in order, in
one queue group the owner enforces, so a freed slot is used at once): running VMs live,
stopped ones by a quick move (their configuration changes owner). A VM that cannot move is
reported in the drain record and the events and keeps running where it is.
``resume --failback`` moves the VMs the drain moved back to the node the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from vmferry.cluster.etcd import EtcdUnavailable
from vmferry.cluster.placement import NodeRoom, VMDemand, order, place
from vmferry.cluster.store import (
    ClusteredVM,
    ClusterEvent,
    ClusterState,
    ClusterVMStore,
    DrainRecord,
    NodeRecord,
)
from vmferry.errors import ConflictError, FerryError, NotFoundError, RefusedError
from vmferry.migration.model import Destination, Job, JobState, MoveOptions, MoveRequest

log = logging.getLogger("vmferry.cluster.planned")

WATCH_S = 0.1


class LocalMoves(Protocol):
    """This agent's migration jobs (engine.py, quick.py), as the cluster layer needs them."""

    async def submit(self, name: str, req: MoveRequest) -> Job: ...
    def job(self, job_id: str) -> Job | None: ...
    def jobs_of(self, vm: str) -> list[Job]: ...


@dataclass
class _Watched:
    cluster: str
    vm: str
    to: str
    job_id: str | None
    reason: str
    started: float


class OwnerMoves:
    """The owner's side of planned moves: mark, start, and record the outcome."""

    def __init__(
        self,
        node: Callable[[], str],
        cluster: Callable[[], str | None],
        store: Callable[[], ClusterVMStore],
        moves: LocalMoves,
    ) -> None:
        self._node = node
        self._cluster = cluster
        self._store = store
        self.moves = moves
        self.watched: dict[str, _Watched] = {}
        self._task: asyncio.Task[None] | None = None
        self._recovered: set[str] = set()

    def start_loop(self) -> None:
        """Start watching this node's planned moves."""
        self._task = asyncio.create_task(self._loop(), name="cluster-planned-moves")

    async def stop(self) -> None:
        """Stop watching (the moves themselves go on; a restart picks them up)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def start(
        self,
        cluster: str,
        vm: str,
        to: str,
        to_url: str,
        quick: bool,
        reason: str,
        group: str | None = None,
        group_limit: int = 0,
    ) -> Job:
        """Mark and start the move of this node's clustered VM ``vm`` to node ``to`` (in a
        queue group: at most ``group_limit`` of the group's moves run at once)."""
        store, here = self._store(), self._node()
        await asyncio.to_thread(store.begin_move, cluster, vm, here, to)
        w = _Watched(cluster, vm, to, None, reason, time.time())
        opts = MoveOptions(
            quick=quick, vm_only=not quick, queue_group=group, group_limit=group_limit
        )
        try:
            job = await self.moves.submit(
                vm, MoveRequest(destination=Destination(name=to, url=to_url), options=opts)
            )
        except BaseException:
            with contextlib.suppress(EtcdUnavailable):
                await asyncio.to_thread(store.end_move, cluster, vm, here, to, False)
            raise
        w.job_id = job.id
        self.watched[vm] = w
        with contextlib.suppress(EtcdUnavailable):  # the watcher finds the job by VM otherwise
            await asyncio.to_thread(store.set_move_job, cluster, vm, to, job.id)
        log.info("planned move of %s to %s: migration %s (%s)", vm, to, job.id, reason)
        return job

    async def _loop(self) -> None:
        while True:
            try:
                await self.check_once()
            except EtcdUnavailable as exc:
                log.warning("planned moves: etcd unavailable: %s", exc)
            except Exception:  # the loop must never die
                log.exception("planned moves: pass failed")
            await asyncio.sleep(WATCH_S)

    async def check_once(self) -> None:
        """Record the outcome of every watched move that ended (after a restart, first pick
        up the marks an earlier agent left on this node's VMs)."""
        cluster = self._cluster()
        if cluster is None:
            return
        store, here = self._store(), self._node()
        if cluster not in self._recovered:
            for vm in await asyncio.to_thread(store.clustered_vms, cluster, here):
                if vm.node == here and vm.moving_to and vm.name not in self.watched:
                    self.watched[vm.name] = _Watched(
                        cluster, vm.name, vm.moving_to, vm.move_job, "planned move", time.time()
                    )
            self._recovered.add(cluster)
        for name, w in list(self.watched.items()):
            job = self.moves.job(w.job_id) if w.job_id else self._latest_job(name, w.to)
            if job is not None and (not job.state.terminal or job.handover_pending):
                continue  # still moving, or the guest runs there and an admin completes it
            completed = job is not None and job.state is JobState.COMPLETED
            ok = await asyncio.to_thread(store.end_move, w.cluster, name, here, w.to, completed)
            del self.watched[name]
            if not ok:
                log.info("planned move of %s: the record no longer shows it (changed)", name)
                continue
            ev = _move_event(name, here, w, job, completed)
            with contextlib.suppress(EtcdUnavailable):
                await asyncio.to_thread(store.add_event, w.cluster, ev)
            log.warning("planned move of %s to %s: %s", name, w.to, ev.reason)

    def _latest_job(self, vm: str, to: str) -> Job | None:
        jobs = [j for j in self.moves.jobs_of(vm) if j.destination == to]
        return max(jobs, key=lambda j: j.created_at) if jobs else None


def _move_event(vm: str, here: str, w: _Watched, job: Job | None, completed: bool) -> ClusterEvent:
    timings: dict[str, float] = {}
    if job is not None:
        if job.total_s is not None:
            timings["total_s"] = job.total_s
        if job.downtime_ms is not None:
            timings["qemu_downtime_ms"] = float(job.downtime_ms)
    if completed:
        return ClusterEvent(
            kind="moved",
            vm=vm,
            node=w.to,
            from_node=here,
            timings=timings,
            reason=f"{w.reason}; migration {job.id if job else '?'}",
        )
    why = job.error.message if job and job.error else "the migration job was not found"
    state = job.state.value if job else "lost"
    return ClusterEvent(
        kind="move-failed",
        vm=vm,
        node=here,
        from_node=here,
        timings=timings,
        reason=f"{w.reason}: move to {w.to} {state}: {why}; it stays on {here}",
    )


# -- the leader's side: drains and failbacks ------------------------------------------------------
class MoveCalls(Protocol):
    """What the drain asks the agents (``api/cluster_peer.py``)."""

    async def host_info(self, url: str) -> dict[str, Any]: ...
    async def vm(self, url: str, name: str) -> dict[str, Any] | None: ...
    async def start_planned_move(
        self,
        url: str,
        vm: str,
        to: str,
        quick: bool,
        reason: str,
        group: str | None = None,
        group_limit: int = 0,
    ) -> dict[str, Any]: ...
    async def migration(self, url: str, job_id: str) -> dict[str, Any]: ...
    async def cancel_migration(self, url: str, job_id: str) -> dict[str, Any]: ...


async def free_memory(calls: MoveCalls, state: ClusterState) -> dict[str, int]:
    """Free memory for VMs of each alive node whose agent answers (others are left out)."""

    async def one(node: str) -> tuple[str, int | None]:
        try:
            info = await calls.host_info(state.nodes[node].url)
            return node, int(info["memory_free_for_vms_mib"])
        except (FerryError, KeyError, ValueError, TypeError) as exc:
            log.warning("node %s did not report its memory: %s", node, exc)
            return node, None

    got = await asyncio.gather(*(one(n) for n in state.nodes if n in state.alive))
    return {n: free for n, free in got if free is not None}


def move_rooms(state: ClusterState, free_mib: dict[str, int], exclude: set[str]) -> list[NodeRoom]:
    """Nodes that may receive a planned move: alive, unpaused, answered, not in ``exclude``;
    less the memory promised to moves and restarts already heading there (pure)."""
    out = {
        n: NodeRoom(n, free, Counter())
        for n, free in free_mib.items()
        if n in state.alive and n not in exclude and not state.nodes[n].paused
    }
    for vm in state.vms.values():
        for n in {vm.node, vm.moving_to} - {None}:
            room = out.get(str(n))
            if room is not None and vm.anti_affinity:
                room.groups[vm.anti_affinity] += 1
        if vm.moving_to in out:
            out[str(vm.moving_to)].free_mib -= vm.memory_mib
        if vm.restart_pending and vm.node in out:
            out[vm.node].free_mib -= vm.memory_mib
    return sorted(out.values(), key=lambda r: r.name)


def move_demand(vm: ClusteredVM) -> VMDemand:
    """The placement view of a VM to move: a planned move ignores ``no-auto-start``."""
    prio = "low" if vm.priority == "no-auto-start" else vm.priority
    return VMDemand(
        name=vm.name,
        memory_mib=vm.memory_mib,
        priority=prio,
        preferred=tuple(vm.preferred),
        possible=tuple(vm.possible),
        anti_affinity=vm.anti_affinity,
    )


def move_targets(
    state: ClusterState, vms: list[ClusteredVM], away_from: str, free: dict[str, int]
) -> dict[str, tuple[str | None, str]]:
    """Where each of ``vms`` (all on ``away_from``) goes and why, or None and why not. One
    placement, so each decision counts the memory and groups of the ones before it (pure)."""
    p = place([move_demand(v) for v in vms], move_rooms(state, free, {away_from}))
    out: dict[str, tuple[str | None, str]] = {d.vm: (d.node, d.reason) for d in p.decisions}
    for v in vms:
        if v.name not in out:
            out[v.name] = (None, p.unplaced.get(v.name) or p.skipped.get(v.name) or "")
    return out


def best_node(state: ClusterState, vm: ClusteredVM, free: dict[str, int]) -> tuple[str, str]:
    """The best possible node for a planned move of ``vm`` and why; RefusedError if none."""
    to, why = move_targets(state, [vm], vm.node, free)[vm.name]
    if to is None:
        raise RefusedError(
            f"no node can take VM {vm.name!r}: {why or 'no node can take it'}",
            field="vm",
            fix="free memory on a node, or check its possible owners",
        )
    return to, why


def _drain(rec: NodeRecord) -> DrainRecord:
    assert rec.drain is not None
    return rec.drain


@dataclass
class _Active:
    vm: str
    drain_node: str  # the node drained (or failed back to)
    owner_url: str
    to: str
    job_id: str


class Drains:
    """Runs on the leader (called by the controller each pass): works through drain records."""

    def __init__(
        self, me: Callable[[], str], calls: MoveCalls, concurrency: Callable[[], int]
    ) -> None:
        self._me = me
        self.calls = calls
        self._concurrency = concurrency
        self.active: dict[str, _Active] = {}
        #: A drain or failback is running: the controller passes more often (FAST_TICK).
        self.busy = False

    def forget(self) -> None:
        """This node is no longer the leader: a new one picks the drains up from etcd."""
        self.active.clear()
        self.busy = False

    async def step(
        self,
        store: ClusterVMStore,
        cluster: str,
        state: ClusterState,
        free: Callable[[], Awaitable[dict[str, int]]],
    ) -> None:
        """One pass over every running drain and failback."""
        running = {n for n, r in state.nodes.items() if r.drain and r.drain.status == "running"}
        self.busy = bool(running)
        for vm, a in list(self.active.items()):
            if a.drain_node not in running:  # resumed meanwhile: moves under way finish,
                del self.active[vm]  # the ones still queued at the owner are cancelled
                with contextlib.suppress(FerryError):
                    job = await self.calls.migration(a.owner_url, a.job_id)
                    if job.get("state") == "queued":
                        await self.calls.cancel_migration(a.owner_url, a.job_id)
        for name, rec in sorted(state.nodes.items()):
            if rec.drain is not None and rec.drain.status == "running":
                await self._one(store, cluster, state, name, free)

    async def _one(
        self,
        store: ClusterVMStore,
        cluster: str,
        state: ClusterState,
        node: str,
        free: Callable[[], Awaitable[dict[str, int]]],
    ) -> None:
        got = await asyncio.to_thread(store.node_record, cluster, node)
        if got is None or got[0].drain is None or got[0].drain.status != "running":
            return
        rec, rev = got
        drain = _drain(rec)
        changed = await self._poll(drain, self._mine(node))
        mine = self._mine(node)
        for vm in self._lost(state, node, drain, mine):
            drain.failed[vm.name] = "its move ended while another node led the cluster"
            changed = True
        # Every VM left is asked for at once, in order, in one queue group per drain: the owner
        # runs at most drain_concurrency of them at a time and starts the next the moment one
        # ends (migration/slots.py), with no wait for this loop.
        wave = self._todo(state, node, drain, mine)
        starts: list[tuple[ClusteredVM, str]] = []
        if wave:
            targets = self._targets(state, wave, node, drain, await free())
            for vm in wave:
                to, why = targets[vm.name]
                drain.attempted.append(vm.name)
                changed = True
                if to is None:
                    await self._cannot_move(store, cluster, drain, vm, node, why)
                else:
                    starts.append((vm, to))
        if starts:  # record the attempts first: a new leader must not start them again
            if not await asyncio.to_thread(store.update_node, cluster, rec, rev):
                return  # changed meanwhile (a resume?): look again next pass
            changed = False
            for vm, to in starts:
                err = await self._start(state, vm, to, node, drain.kind, self._concurrency())
                if err is not None:
                    await self._cannot_move(store, cluster, drain, vm, node, err)
                    changed = True
            if changed:
                fresh = await asyncio.to_thread(store.node_record, cluster, node)
                if fresh is None or fresh[0].drain is None:
                    return
                failed = drain.failed
                rec, rev = fresh
                drain = _drain(rec)
                drain.failed.update(failed)
        mine = self._mine(node)
        moving = [v for v in state.vms.values() if v.moving_to and node in (v.node, v.moving_to)]
        if not self._todo(state, node, drain, mine) and not mine and not moving and not starts:
            drain.status = "failed" if drain.failed else "done"
            drain.finished_at = time.time()
            changed = True
            what = drain.kind
            reason = f"{what} of {node} {drain.status}: {len(drain.moved)} moved" + (
                f"; could not move: {', '.join(sorted(drain.failed))} (they keep running)"
                if drain.failed
                else ""
            )
            await self._event(store, cluster, f"{what}-{drain.status}", None, node, reason)
        if changed:
            await asyncio.to_thread(store.update_node, cluster, rec, rev)

    def _mine(self, node: str) -> dict[str, _Active]:
        """The moves this leader started for the drain (failback) of ``node``, by VM."""
        return {a.vm: a for a in self.active.values() if a.drain_node == node}

    @staticmethod
    def _candidates(state: ClusterState, node: str, drain: DrainRecord) -> list[ClusteredVM]:
        if drain.kind == "drain":
            return [v for v in state.vms.values() if v.node == node]
        return [
            state.vms[n]
            for n in drain.bring_back
            if n in state.vms and state.vms[n].node != node and state.vms[n].node in state.alive
        ]

    def _todo(
        self, state: ClusterState, node: str, drain: DrainRecord, mine: dict[str, _Active]
    ) -> list[ClusteredVM]:
        """The VMs this drain (failback) still has to start a move for, in order."""
        cands = {
            v.name: v
            for v in self._candidates(state, node, drain)
            if v.moving_to is None and v.name not in mine and v.name not in drain.attempted
        }
        return [cands[d.name] for d in order(move_demand(v) for v in cands.values())]

    def _lost(
        self, state: ClusterState, node: str, drain: DrainRecord, mine: dict[str, _Active]
    ) -> list[ClusteredVM]:
        """Attempted under an earlier leader, not moving now, and not where it should be."""
        done = set(drain.moved) | set(drain.failed)
        return [
            v
            for v in self._candidates(state, node, drain)
            if v.name in drain.attempted
            and v.name not in done
            and v.name not in mine
            and v.moving_to is None
        ]

    @staticmethod
    def _targets(state: ClusterState, vms: list[ClusteredVM], node: str, drain: DrainRecord,
                 free: dict[str, int]) -> dict[str, tuple[str | None, str]]:  # fmt: skip
        """Where each VM of one wave goes, and why (None: it cannot move). One placement for
        the wave, so each decision counts the memory and groups of the ones before it."""
        if drain.kind == "failback":
            return {v.name: (None, f"{node} is not a possible owner of it")
                    if v.possible and node not in v.possible else (node, "failback")
                    for v in vms}  # fmt: skip
        return {
            name: (to, why if to else f"no node can take it: {why or 'no node can take it'}")
            for name, (to, why) in move_targets(state, vms, node, free).items()
        }

    async def _start(
        self, state: ClusterState, vm: ClusteredVM, to: str, node: str, kind: str, limit: int
    ) -> str | None:
        owner = state.nodes.get(vm.node)
        if owner is None:
            return f"its owner {vm.node} is not a member"
        try:
            info = await self.calls.vm(owner.url, vm.name)
            quick = info is not None and info.get("state") not in ("running", "paused")
            res = await self.calls.start_planned_move(
                owner.url, vm.name, to, quick, f"{kind} of {node}", f"{kind}:{node}", limit
            )
        except FerryError as exc:
            return exc.message
        self.active[vm.name] = _Active(vm.name, node, owner.url, to, str(res["job"]["id"]))
        return None

    async def _poll(self, drain: DrainRecord, mine: dict[str, _Active]) -> bool:
        changed = False
        for name, a in mine.items():
            try:
                job = await self.calls.migration(a.owner_url, a.job_id)
            except NotFoundError:
                job = {"state": "failed", "error": {"message": "the migration job is gone"}}
            except FerryError:
                continue  # ask again next pass
            st = str(job.get("state"))
            if st in ("queued", "running"):
                continue
            if st == "completed":
                drain.moved[name] = a.to
            else:
                drain.failed[name] = str((job.get("error") or {}).get("message") or st)
            self.active.pop(name, None)
            changed = True
        return changed

    async def _cannot_move(
        self,
        store: ClusterVMStore,
        cluster: str,
        drain: DrainRecord,
        vm: ClusteredVM,
        node: str,
        why: str,
    ) -> None:
        """Record in the drain and the events that ``vm`` cannot move (it stays where it is)."""
        drain.failed[vm.name] = why
        reason = f"{drain.kind} of {node}: {why}; it stays on {vm.node}"
        await self._event(store, cluster, "move-failed", vm.name, vm.node, reason)

    async def _event(
        self, store: ClusterVMStore, cluster: str, kind: str, vm: str | None, node: str, reason: str
    ) -> None:
        ev = ClusterEvent(kind=kind, vm=vm, node=node, reason=reason, by=self._me())
        with contextlib.suppress(EtcdUnavailable):
            await asyncio.to_thread(store.add_event, cluster, ev)


class ClusterMoves:
    """``ferry cluster move|drain|resume`` as any member's agent handles them."""

    def __init__(self, store: Callable[[], ClusterVMStore], calls: MoveCalls) -> None:
        self._store = store
        self.calls = calls

    async def move(
        self, cluster: str, name: str, to: str | None, best: bool, quick: bool, by: str | None
    ) -> dict[str, Any]:
        """Start a planned move of clustered VM ``name`` to ``to`` or the best possible node."""
        store = self._store()
        state = await asyncio.to_thread(store.load, cluster)
        vm = state.vms.get(name)
        if vm is None:
            raise NotFoundError(
                f"VM {name!r} is not clustered in {cluster!r}",
                field="vm",
                fix="clustered VMs: " + (", ".join(sorted(state.vms)) or "none"),
            )
        if vm.node not in state.alive:
            raise ConflictError(
                f"VM {name!r}'s owner {vm.node} has no lease",
                field="vm",
                fix="failover restarts it on another node; see ferry cluster status",
            )
        if vm.moving_to:
            raise ConflictError(
                f"VM {name!r} is already moving to {vm.moving_to}",
                field="vm",
                fix=f"wait for migration {vm.move_job} to end",
            )
        if bool(to) == bool(best):
            raise RefusedError(
                "name a destination node or ask for the best one",
                field="to",
                fix=f"ferry cluster move {name} --to NODE | --best",
            )
        if to:
            why = self._refuse_target(state, vm, to)
            if why is not None:
                raise why
            reason = f"move to {to}"
        else:
            to, placed = best_node(state, vm, await free_memory(self.calls, state))
            reason = f"move to the best possible node ({placed})"
        owner_url = state.nodes[vm.node].url
        if by:
            reason += f", by {by}"
        job = (await self.calls.start_planned_move(owner_url, name, to, quick, reason))["job"]
        return {
            "vm": name,
            "from": vm.node,
            "to": to,
            "quick": quick,
            "reason": reason,
            "owner_url": owner_url,
            "job": job,
        }

    @staticmethod
    def _refuse_target(state: ClusterState, vm: ClusteredVM, to: str) -> FerryError | None:
        members = ", ".join(sorted(state.nodes))
        if to not in state.nodes:
            return NotFoundError(
                f"{to!r} is not a node of cluster {state.info.name!r}",
                field="to",
                fix=f"members: {members}",
            )
        if to == vm.node:
            return RefusedError(f"VM {vm.name!r} already runs on {to}", field="to")
        if to not in state.alive:
            return ConflictError(
                f"node {to} has no lease (down or isolated)",
                field="to",
                fix="pick another node, or --best",
            )
        if state.nodes[to].paused:
            return ConflictError(
                f"node {to} is paused and takes no VMs",
                field="to",
                fix=f"pick another node, or ferry cluster resume {to}",
            )
        if vm.possible and to not in vm.possible:
            return RefusedError(
                f"{to} is not a possible owner of {vm.name!r} ({', '.join(vm.possible)})",
                field="to",
                fix=f"ferry cluster vm set {vm.name} --possible …",
            )
        return None

    async def drain(self, cluster: str, node: str, by: str | None) -> dict[str, Any]:
        """Pause ``node`` and have the leader move its clustered VMs away."""
        store = self._store()
        rec, rev = await self._node(store, cluster, node)
        state = await asyncio.to_thread(store.load, cluster)
        if node not in state.alive:
            raise ConflictError(
                f"node {node} has no lease",
                field="node",
                fix="its clustered VMs fail over by themselves",
            )
        if rec.drain is not None and rec.drain.status == "running":
            raise ConflictError(
                f"a {rec.drain.kind} of {node} is already running",
                field="node",
                fix="watch it: ferry cluster status",
            )
        others = [n for n in state.alive if n != node and not state.nodes[n].paused]
        if not others:
            raise ConflictError(
                f"no other node is up and unpaused to take {node}'s VMs",
                field="node",
                fix="resume or add a node first",
            )
        new = rec.model_copy(update={"paused": True, "drain": DrainRecord(by=by)})
        if not await asyncio.to_thread(store.update_node, cluster, new, rev):
            raise ConflictError(f"node {node} changed meanwhile; try again", field="node")
        vms = sorted(v.name for v in state.vms.values() if v.node == node)
        await self._event(
            store,
            cluster,
            "drain-started",
            node,
            f"{node} paused; moving {len(vms)} clustered VM(s): {', '.join(vms) or 'none'}",
            by,
        )
        return new.model_dump()

    async def resume(
        self, cluster: str, node: str, failback: bool, by: str | None
    ) -> dict[str, Any]:
        """Unpause ``node``; with ``failback``, move back the VMs its last drain moved away."""
        store = self._store()
        rec, rev = await self._node(store, cluster, node)
        prev = rec.drain
        if not rec.paused and not failback:
            raise ConflictError(f"node {node} is not paused", field="node")
        drain = None
        if failback:
            back = sorted(prev.moved) if prev is not None and prev.kind == "drain" else []
            if not back:
                raise ConflictError(
                    f"no drain of {node} moved VMs away",
                    field="failback",
                    fix=f"ferry cluster resume {node} (without --failback)",
                )
            drain = DrainRecord(kind="failback", by=by, bring_back=back)
        new = rec.model_copy(update={"paused": False, "drain": drain})
        if not await asyncio.to_thread(store.update_node, cluster, new, rev):
            raise ConflictError(f"node {node} changed meanwhile; try again", field="node")
        what = f"; failing back {', '.join(drain.bring_back)}" if drain else ""
        if prev is not None and prev.status == "running":
            what += f"; the running {prev.kind} stops starting moves"
        await self._event(store, cluster, "resumed", node, f"{node} resumed{what}", by)
        return new.model_dump()

    @staticmethod
    async def _node(store: ClusterVMStore, cluster: str, node: str) -> tuple[NodeRecord, int]:
        got = await asyncio.to_thread(store.node_record, cluster, node)
        if got is None:
            state = await asyncio.to_thread(store.load, cluster)
            raise NotFoundError(
                f"{node!r} is not a node of cluster {cluster!r}",
                field="node",
                fix="members: " + ", ".join(sorted(state.nodes)),
            )
        return got

    @staticmethod
    async def _event(
        store: ClusterVMStore, cluster: str, kind: str, node: str, reason: str, by: str | None
    ) -> None:
        ev = ClusterEvent(kind=kind, node=node, reason=reason, by=by)
        with contextlib.suppress(EtcdUnavailable):
            await asyncio.to_thread(store.add_event, cluster, ev)


__all__ = [
    "ClusterMoves",
    "Drains",
    "LocalMoves",
    "MoveCalls",
    "OwnerMoves",
    "best_node",
    "move_rooms",
]
