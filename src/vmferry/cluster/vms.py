"""Clustered VMs: ``ferry cluster vm add|remove|set|list`` (the records in etcd; no downtime).

Adding a VM writes one etcd record naming this node as its owner; the node's lease loop picks it
up on its next tick (it is then fenced with the node and guarded by the fence guard), and the
leader's controller restarts it elsewhere if the node's lease expires. The VM keeps running
throughout. A clustered VM's folder and disks must be on one of the cluster's shared volumes,
because failover imports it from there on another node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from vmferry.cluster.etcd import EtcdUnavailable
from vmferry.cluster.member import ClusterMember, EtcdCache
from vmferry.cluster.placement import PRIORITIES, Priority
from vmferry.cluster.store import (
    CLUSTER_RE,
    ClusteredVM,
    ClusterEvent,
    ClusterState,
    ClusterVMStore,
    check_node_name,
)
from vmferry.errors import ConflictError, FerryError, HostError, NotFoundError, RefusedError
from vmferry.host.settings import HostSettings
from vmferry.host.vms import VMManager
from vmferry.validation import MAX_ITEMS, ShortText

log = logging.getLogger(__name__)


class VMProperties(BaseModel):
    """The properties ``cluster vm add`` and ``cluster vm set`` take (None: leave as is)."""

    priority: Priority | None = None
    preferred: list[ShortText] | None = Field(default=None, max_length=MAX_ITEMS)
    possible: list[ShortText] | None = Field(default=None, max_length=MAX_ITEMS)
    anti_affinity: str | None = Field(default=None, max_length=64)


class VMAdd(VMProperties):
    """``POST /v1/cluster/vms``: make a VM of this host clustered."""

    name: str = Field(min_length=1, max_length=63)
    cluster: str | None = Field(default=None, max_length=32)


def _within(path: str, root: str) -> bool:
    p, r = os.path.realpath(path), os.path.realpath(root)
    return p == r or p.startswith(r.rstrip("/") + "/")


class ClusterVMs:
    """Clustered-VM requests handled by one agent."""

    def __init__(
        self, vms: VMManager, settings: Callable[[], HostSettings], member: ClusterMember
    ) -> None:
        self.vms = vms
        self._settings = settings
        self.member = member
        self._etcd = EtcdCache(settings)  # one client, not one per request

    def _store(self) -> ClusterVMStore:
        return ClusterVMStore(self._etcd.get())

    def _cluster(self, name: str | None) -> str:
        if name:
            if not CLUSTER_RE.match(name):
                raise RefusedError(f"cluster name {name!r} is not valid", field="cluster")
            return name
        if self.member.cluster:
            return self.member.cluster
        raise RefusedError(
            f"host {self._settings().name} is in no cluster", field="cluster",
            fix="ask a member host (--host), or join it to a cluster first",
        )  # fmt: skip

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except EtcdUnavailable as exc:
            raise HostError(
                f"etcd is unavailable: {exc}",
                fix="check the etcd members (quorum) and this host's cluster.etcd settings",
            ) from exc

    @staticmethod
    def _apply(vm: ClusteredVM, props: VMProperties, state: ClusterState) -> ClusteredVM:
        """``vm`` with ``props`` applied, checked against the cluster's members."""
        upd: dict[str, Any] = {}
        members = sorted(state.nodes)
        for fld in ("preferred", "possible"):
            names = getattr(props, fld)
            if names is None:
                continue
            names = [n.strip() for n in names if n.strip()]
            for n in names:
                check_node_name(n, fld)
                if n not in state.nodes:
                    raise RefusedError(
                        f"{fld}: {n!r} is not a node of cluster {state.info.name!r}",
                        field=fld, fix="members: " + ", ".join(members),
                    )  # fmt: skip
            if len(set(names)) != len(names):
                raise RefusedError(f"{fld}: a node is named twice", field=fld)
            upd[fld] = names
        if props.priority is not None:
            upd["priority"] = props.priority
        if props.anti_affinity is not None:
            group = props.anti_affinity.strip()
            upd["anti_affinity"] = group or None  # "" clears it
        new = vm.model_copy(update=upd)
        if new.possible and new.preferred and not set(new.preferred) <= set(new.possible):
            raise RefusedError(
                "a preferred owner is not a possible owner: "
                + ", ".join(sorted(set(new.preferred) - set(new.possible))),
                field="preferred", fix="add it to --possible too, or leave it out",
            )  # fmt: skip
        return new

    # -- requests -------------------------------------------------------------------------------
    async def add(self, req: VMAdd, by: str | None) -> dict[str, Any]:
        """Make this host's VM ``req.name`` clustered, owned by this host (it keeps running)."""
        cluster = self._cluster(req.cluster)
        here = self._settings().name
        try:
            spec = self.vms.spec(req.name)
        except NotFoundError as exc:
            raise NotFoundError(
                f"host {here} has no VM named {req.name!r}", field="name",
                fix="ask the host that runs it: ferry --host HOST cluster vm add NAME",
            ) from exc  # fmt: skip
        store = self._store()
        state: ClusterState = await self._run(store.load, cluster)
        if here not in state.nodes:
            raise RefusedError(
                f"host {here} is not a node of cluster {cluster!r}", field="cluster",
                fix=f"ferry --host {here} cluster join {cluster}",
            )  # fmt: skip
        vols = sorted(state.volumes)
        paths = [spec.storage_dir] + [str(Path(spec.storage_dir) / d.file) for d in spec.disks]
        vol = next((v for v in vols if all(_within(p, v) for p in paths)), None)
        if vol is None:
            raise RefusedError(
                f"VM {req.name!r} is not on a shared volume of cluster {cluster!r} "
                f"(its folder is {spec.storage_dir}; shared volumes: {', '.join(vols) or 'none'})",
                field="name",
                fix="move its storage onto one (ferry move-storage NAME --to VOLUME/NAME), "
                "or add a shared volume (ferry cluster volume add PATH)",
            )  # fmt: skip
        base = ClusteredVM(
            name=req.name, node=here, uuid=spec.uuid, storage_dir=spec.storage_dir,
            memory_mib=spec.memory_mib,
        )  # fmt: skip
        vm = self._apply(base, req, state)
        await self._run(store.add_vm, cluster, vm)
        await self._event(store, cluster, "added", vm, by, f"on volume {vol}")
        return self._row(vm, state)

    async def set(self, name: str, props: VMProperties, cluster: str | None,
                  by: str | None) -> dict[str, Any]:  # fmt: skip
        """Change a clustered VM's properties."""
        cluster = self._cluster(cluster)
        store = self._store()
        state = await self._run(store.load, cluster)
        got = await self._run(store.vm_record, cluster, name)
        if got is None:
            raise self._not_clustered(name, cluster, state)
        vm, rev = got
        new = self._apply(vm, props, state)
        if not await self._run(store.update_vm, cluster, new, rev):
            raise ConflictError(f"clustered VM {name!r} changed meanwhile; try again",
                                field="name")  # fmt: skip
        changes = {k: v for k, v in new.model_dump().items() if vm.model_dump()[k] != v}
        await self._event(store, cluster, "changed", new, by, _fmt(changes) or "no change")
        return self._row(new, state)

    async def remove(self, name: str, cluster: str | None, by: str | None) -> dict[str, Any]:
        """Stop clustering the VM (it keeps running where it is)."""
        cluster = self._cluster(cluster)
        store = self._store()
        got = await self._run(store.vm_record, cluster, name)
        if got is None:
            state = await self._run(store.load, cluster)
            raise self._not_clustered(name, cluster, state)
        if not await self._run(store.remove_clustered_vm, cluster, name):
            raise ConflictError(f"clustered VM {name!r} changed meanwhile; try again")
        await self._event(store, cluster, "removed", got[0], by, "no longer clustered")
        return {"removed": name, "node": got[0].node}

    async def listing(self, cluster: str | None) -> list[dict[str, Any]]:
        """Every clustered VM with its owner and the owner's lease state."""
        store = self._store()
        state = await self._run(store.load, self._cluster(cluster))
        return [self._row(v, state) for v in sorted(state.vms.values(), key=lambda v: v.name)]

    async def events(self, cluster: str | None, limit: int) -> list[dict[str, Any]]:
        """The cluster's last events, oldest first."""
        store = self._store()
        evs = await self._run(store.events, self._cluster(cluster), max(1, min(limit, 500)))
        return [e.model_dump() for e in evs]

    async def controller(self, cluster: str | None) -> dict[str, Any] | None:
        """The leader's last controller report."""
        rep = await self._run(self._store().report, self._cluster(cluster))
        return rep.model_dump() if rep else None

    async def is_clustered(self, name: str) -> bool:
        """Whether this node's cluster has VM ``name`` clustered (etcd first; when etcd does not
        answer, this node's cached list)."""
        cluster = self.member.cluster
        if cluster is None:
            return False
        try:
            store = self._store()
            return await asyncio.to_thread(store.vm_record, cluster, name) is not None
        except EtcdUnavailable:
            return name in self.member.clustered

    async def record_wanted(
        self, name: str, running: bool, by: str | None, why: str | None = None
    ) -> bool | None:
        """Record whether the admin wants clustered VM ``name`` running (start, restore) or off
        (stop, shutdown, save): failover keeps an unwanted VM off. Returns the VM's previous
        ``keep_off`` (to undo it if the action fails); None when the VM is not a clustered VM
        this node owns, or etcd does not answer (logged: the action goes on, and failover
        treats the VM as before). ``why`` replaces the event's default reason."""
        cluster = self.member.cluster
        if cluster is None:
            return None
        try:
            store = self._store()
            for _ in range(5):  # another writer (the member, the controller) may race us
                got = await asyncio.to_thread(store.vm_record, cluster, name)
                if got is None or got[0].node != self.member.node:
                    return None  # not clustered, or not this node's to say
                vm, rev = got
                if vm.keep_off == (not running):
                    return vm.keep_off
                new = vm.model_copy(update={"keep_off": not running})
                if await asyncio.to_thread(store.update_vm, cluster, new, rev):
                    why = why or ("stopped by the admin: failover keeps it off" if new.keep_off
                                  else "started by the admin: failover starts it")  # fmt: skip
                    await self._event(store, cluster, "changed", new, by, why)
                    return vm.keep_off
        except EtcdUnavailable as exc:
            log.warning("VM %s: cannot record in etcd that it should %s (%s); failover treats "
                        "it as before", name, "run" if running else "stay off", exc)  # fmt: skip
            return None
        log.warning("VM %s: its cluster record kept changing; keep_off not recorded", name)
        return None

    async def guest_powered_off(self, name: str) -> None:
        """A clustered VM whose guest powered itself off stays off through a failover, as one
        the admin stopped (the host's monitor calls this; ``start`` clears it)."""
        await self.record_wanted(
            name, False, None, "powered off from inside the guest: failover keeps it off"
        )

    async def planned_move(self, name: str) -> tuple[str, str | None] | None:
        """(owner node, node it is moving to) of clustered VM ``name``; None when it is not
        clustered or etcd does not answer (a move is then refused, not trusted)."""
        cluster = self.member.cluster
        if cluster is None:
            return None
        try:
            got = await asyncio.to_thread(self._store().vm_record, cluster, name)
        except EtcdUnavailable:
            return None
        return None if got is None else (got[0].node, got[0].moving_to)

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _not_clustered(name: str, cluster: str, state: ClusterState) -> FerryError:
        return NotFoundError(
            f"VM {name!r} is not clustered in {cluster!r}", field="name",
            fix="clustered VMs: " + (", ".join(sorted(state.vms)) or "none"),
        )  # fmt: skip

    @staticmethod
    def _row(vm: ClusteredVM, state: ClusterState) -> dict[str, Any]:
        return {**vm.model_dump(), "owner_lease": "alive" if vm.node in state.alive else "expired"}

    async def _event(self, store: ClusterVMStore, cluster: str, kind: str, vm: ClusteredVM,
                     by: str | None, reason: str) -> None:  # fmt: skip
        ev = ClusterEvent(kind=kind, vm=vm.name, node=vm.node, by=by, reason=reason)
        with contextlib.suppress(EtcdUnavailable):  # the change is recorded; the event best effort
            await asyncio.to_thread(store.add_event, cluster, ev)


def _fmt(changes: dict[str, Any]) -> str:
    return "; ".join(f"{k}={v}" for k, v in changes.items())


__all__ = ["PRIORITIES", "ClusterVMs", "VMAdd", "VMProperties"]
