"""Cluster lifecycle as the API calls it: create, join, leave, status, destroy, volumes.

Every etcd call blocks, so each runs in a thread. Before a node is written into a cluster its
agent is asked who it is (``GET /v1/cluster/member``): it must answer, carry the name it is
added under (its lease loop looks itself up by that name) and use the same etcd.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import BaseModel, Field, field_validator

from vmferry.cluster.etcd import EtcdUnavailable
from vmferry.cluster.member import ClusterMember, EtcdCache
from vmferry.cluster.store import (
    ClusterState,
    ClusterStore,
    ClusterVMStore,
    NodeRecord,
    check_cluster_name,
    check_node_name,
    check_volume_path,
)
from vmferry.cluster.validate import ValidateApi, validate
from vmferry.cluster.volumes import VolumeCheckResult, add_volume, volume_summary
from vmferry.errors import FerryError, HostError, RefusedError
from vmferry.host.settings import HostSettings
from vmferry.validation import AGENT_URL_RE, MAX_ITEMS, check_agent_url


class NodeRef(BaseModel):
    """A node named in a request, with the URL of its agent."""

    name: str = Field(min_length=1, max_length=63)
    url: str = Field(min_length=1, max_length=300, json_schema_extra={"pattern": AGENT_URL_RE})

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_agent_url(v)


class ClusterCreate(BaseModel):
    """``POST /v1/cluster``: refused when validation fails, unless ``force``."""

    name: str = Field(min_length=1, max_length=32)
    nodes: list[NodeRef] = Field(min_length=1, max_length=MAX_ITEMS)
    force: bool = False


class AgentApi(ValidateApi, Protocol):
    """What the service asks other agents (implemented in ``api/cluster_peer.py``)."""

    async def member(self, url: str) -> dict[str, Any]: ...


class ClusterService:
    """The cluster operations of one agent."""

    def __init__(
        self, settings: Callable[[], HostSettings], member: ClusterMember, api: AgentApi
    ) -> None:
        self._settings = settings
        self.member = member
        self.api = api
        self._etcd = EtcdCache(settings)  # one client, not one per request

    def _store(self) -> ClusterStore:
        return ClusterStore(self._etcd.get())

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except EtcdUnavailable as exc:
            raise HostError(
                f"etcd is unavailable: {exc}",
                fix="check the etcd members (quorum) and this host's cluster.etcd settings",
            ) from exc

    def _cluster(self, name: str | None) -> str:
        if name:
            return check_cluster_name(name)
        if self.member.cluster:
            return self.member.cluster
        raise RefusedError(
            f"host {self._settings().name} is in no cluster", field="name",
            fix="name the cluster, or ask a member host (--host)",
        )  # fmt: skip

    async def _check_nodes(self, nodes: list[NodeRef]) -> None:
        mine = self._settings().cluster.etcd.endpoints

        async def one(n: NodeRef) -> None:
            check_node_name(n.name)
            try:
                info = await self.api.member(n.url)
            except FerryError as exc:
                raise RefusedError(
                    f"node {n.name}'s agent at {n.url} did not answer: {exc.message}",
                    field="nodes", fix="start ferryd there, or leave the node out",
                ) from exc  # fmt: skip
            if info.get("node") != n.name:
                raise RefusedError(
                    f"the agent at {n.url} is host {info.get('node')!r}, not {n.name!r}",
                    field="nodes", fix="use each host's own name (ferry host show)",
                )  # fmt: skip
            if sorted(info.get("etcd_endpoints") or []) != sorted(mine):
                raise RefusedError(
                    f"node {n.name} uses etcd {info.get('etcd_endpoints') or 'none'}, "
                    f"this host uses {mine}",
                    field="nodes", fix="point every node's cluster.etcd at the same etcd",
                )  # fmt: skip

        await asyncio.gather(*(one(n) for n in nodes))

    # -- lifecycle ------------------------------------------------------------------------------
    async def create(self, req: ClusterCreate, by: str | None) -> dict[str, Any]:
        """Create a cluster of ``req.nodes``."""
        check_cluster_name(req.name)
        await self._check_nodes(req.nodes)
        if not req.force:
            report = await validate(self.api, {n.name: n.url for n in req.nodes}, [])
            failed = [c for c in report["checks"] if c["result"] == "fail"]
            if failed:
                raise RefusedError(
                    "validation failed: "
                    + "; ".join(f"{c['test']} ({c['scope']}): {c['message']}" for c in failed),
                    field="nodes",
                    fix="fix those (ferry cluster validate --nodes …), or pass --force",
                )
        recs = [NodeRecord(name=n.name, url=n.url) for n in req.nodes]
        state = await self._run(self._store().create, req.name, recs, by)
        return self.report(state)

    async def join(self, cluster: str, node: NodeRef) -> dict[str, Any]:
        """Add a node to a cluster."""
        check_cluster_name(cluster)
        await self._check_nodes([node])
        rec = NodeRecord(name=node.name, url=node.url)
        return self.report(await self._run(self._store().join, cluster, rec))

    async def leave(self, cluster: str | None, node: str) -> dict[str, Any]:
        """Remove a node from a cluster."""
        name = self._cluster(cluster)
        return self.report(await self._run(self._store().leave, name, node))

    async def destroy(self, cluster: str) -> dict[str, Any]:
        """Delete a cluster (its nodes become standalone hosts)."""
        nodes = await self._run(self._store().destroy, check_cluster_name(cluster))
        return {"destroyed": cluster, "nodes": nodes}

    async def status(self, cluster: str | None) -> dict[str, Any]:
        """Nodes with their lease state, the leader, volumes, clustered VMs, etcd health."""
        store = self._store()
        state = await self._run(store.load, self._cluster(cluster))
        report = self.report(state)
        report["etcd"] = await asyncio.to_thread(store.etcd.health)
        # failover (cluster/controller.py): the leader's last report and the latest events
        vstore = ClusterVMStore(store.etcd)
        rep = await self._run(vstore.report, state.info.name)
        report["controller"] = rep.model_dump() if rep else None
        events = await self._run(vstore.events, state.info.name, 20)
        report["events"] = [e.model_dump() for e in events]
        return report

    # -- validate -------------------------------------------------------------------------------
    async def validate(
        self, cluster: str | None, nodes: list[NodeRef], volumes: list[str]
    ) -> dict[str, Any]:
        """Validate the given nodes (and volumes), or an existing cluster's nodes and volumes."""
        if not nodes:
            state = await self._run(self._store().load, self._cluster(cluster))
            nodes = [NodeRef(name=n, url=r.url) for n, r in sorted(state.nodes.items())]
            volumes = volumes or sorted(state.volumes)
        for n in nodes:
            check_node_name(n.name)
        return await validate(
            self.api, {n.name: n.url for n in nodes}, [check_volume_path(v) for v in volumes]
        )

    # -- volumes --------------------------------------------------------------------------------
    async def volume_add(
        self, cluster: str | None, path: str
    ) -> tuple[dict[str, Any], list[VolumeCheckResult]]:
        """Check a path on every node, then record it as a shared volume."""
        name = self._cluster(cluster)
        try:
            state, results = await add_volume(self._store(), name, path, self.api)
        except EtcdUnavailable as exc:
            raise HostError(f"etcd is unavailable: {exc}") from exc
        return self.report(state), results

    async def volume_remove(self, cluster: str | None, path: str) -> dict[str, Any]:
        """Forget a shared volume."""
        name = self._cluster(cluster)
        return self.report(
            await self._run(self._store().remove_volume, name, check_volume_path(path))
        )

    async def volumes(self, cluster: str | None) -> list[dict[str, Any]]:
        """The cluster's shared volumes."""
        state = await self._run(self._store().load, self._cluster(cluster))
        return volume_summary(state)

    # -- report ---------------------------------------------------------------------------------
    @staticmethod
    def report(state: ClusterState) -> dict[str, Any]:
        """The JSON of ``ferry cluster status``."""
        now = time.time()
        nodes = []
        for name, rec in sorted(state.nodes.items()):
            alive = state.alive.get(name)
            fenced = state.fenced.get(name)
            nodes.append({
                "name": name,
                "url": rec.url,
                "lease": "alive" if alive else "expired",
                "lease_id": f"{alive.lease:x}" if alive else None,
                "lease_ttl_s": alive.ttl_s if alive else None,
                "up_since": alive.since if alive else None,
                "version": alive.version if alive else None,
                "leader": state.leader is not None and state.leader.node == name,
                "state": _node_state(rec, alive is not None),
                "paused": rec.paused,
                "drain": rec.drain.model_dump() if rec.drain else None,
                "clustered_vms": sorted(v.name for v in state.vms.values() if v.node == name),
                "last_fenced_at": fenced.at if fenced else None,
                "last_fenced_vms": fenced.vms if fenced else [],
            })  # fmt: skip
        return {
            "name": state.info.name,
            "created_at": state.info.created_at,
            "revision": state.revision,
            "leader": state.leader.node if state.leader else None,
            "leader_since_s": round(now - state.leader.since, 1) if state.leader else None,
            "nodes": nodes,
            "volumes": volume_summary(state),
            "vms": [v.model_dump() for v in sorted(state.vms.values(), key=lambda v: v.name)],
        }


def _node_state(rec: NodeRecord, alive: bool) -> str:
    """down | draining | failing-back | paused | up."""
    if not alive:
        return "down"
    if rec.drain is not None and rec.drain.status == "running":
        return "draining" if rec.drain.kind == "drain" else "failing-back"
    return "paused" if rec.paused else "up"
