"""ferryd's ``/v1/cluster/...`` routes. Thin: validate, then call :mod:`vmferry.cluster`."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

from vmferry.api.cluster_peer import HttpClusterPeer
from vmferry.api.peer import AgentTLS
from vmferry.cluster.controller import Controller
from vmferry.cluster.member import ClusterMember, EtcdCache
from vmferry.cluster.planned import ClusterMoves, OwnerMoves
from vmferry.cluster.service import ClusterCreate, ClusterService, NodeRef
from vmferry.cluster.store import ClusterVMStore
from vmferry.cluster.validate import NodeFacts, ReachRequest, facts_here, reach
from vmferry.cluster.vms import ClusterVMs, VMAdd, VMProperties
from vmferry.cluster.volumes import VolumeCheck, VolumeCheckResult, check_here
from vmferry.errors import RefusedError
from vmferry.host import Host
from vmferry.migration.engine import Moves, job_json
from vmferry.migration.model import Job, MoveRequest
from vmferry.migration.quick import QuickMoves
from vmferry.validation import MAX_ITEMS, PathText

#: Agent calls of the failover controller may wait for an import (which asks the old owner).
CONTROLLER_CALL_S = 60.0


class ValidateRequest(BaseModel):
    """``POST /v1/cluster/validate``: a cluster's nodes and volumes, or the given ones."""

    cluster: str | None = Field(default=None, max_length=32)
    nodes: list[NodeRef] = Field(default=[], max_length=MAX_ITEMS)
    volumes: list[PathText] = Field(default=[], max_length=MAX_ITEMS)


class ClusterMoveBody(BaseModel):
    """``POST /v1/cluster/vms/{name}/move``: to a node, or the best possible one."""

    cluster: str | None = Field(default=None, max_length=32)
    to: str | None = Field(default=None, max_length=63)
    best: bool = False
    quick: bool = False


class PlannedMoveBody(BaseModel):
    """Agent → owner agent: mark and start the planned move."""

    to: str = Field(min_length=1, max_length=63)
    quick: bool = False
    reason: str = Field(default="planned move", max_length=300)
    group: str | None = Field(default=None, max_length=100)
    group_limit: int = Field(default=0, ge=0, le=64)
    cluster: str | None = Field(default=None, max_length=32)


class ResumeBody(BaseModel):
    """``POST /v1/cluster/{name}/nodes/{node}/resume``."""

    failback: bool = False


class LocalJobs:
    """This agent's move jobs as the cluster layer sees them (``cluster.planned.LocalMoves``)."""

    def __init__(self, moves: Moves, quick: QuickMoves) -> None:
        self.moves = moves
        self.quick = quick

    async def submit(self, name: str, req: MoveRequest) -> Job:
        """A live move, or a quick one when ``req.options.quick``."""
        return await (self.quick if req.options.quick else self.moves).submit(name, req)

    def job(self, job_id: str) -> Job | None:
        """A job of this host, or None."""
        return self.moves.jobs.get(job_id)

    def jobs_of(self, vm: str) -> list[Job]:
        """Every job of this host that moved ``vm``."""
        return [j for j in self.moves.jobs.values() if j.vm == vm]


class VolumePath(BaseModel):
    """``POST /v1/cluster/volumes``."""

    path: PathText
    cluster: str | None = Field(default=None, max_length=32)


def add_cluster_routes(
    app: FastAPI, host: Host, tls: AgentTLS | None, jobs: LocalJobs
) -> ClusterMember:
    """Add the cluster routes; the returned member is started and stopped by the lifespan
    (with ``app.state.cluster_controller`` and ``app.state.planned_moves``)."""
    member = ClusterMember(host.vms, lambda: host.settings, host.state_dir)
    service = ClusterService(lambda: host.settings, member, HttpClusterPeer(tls))

    @app.get("/v1/cluster/member")
    async def cluster_member() -> dict[str, Any]:
        return {**member.status(), "etcd_endpoints": host.settings.cluster.etcd.endpoints}

    @app.post("/v1/cluster", status_code=201)
    async def cluster_create(req: ClusterCreate, request: Request) -> dict[str, Any]:
        return await service.create(req, getattr(request.state, "identity", None))

    @app.get("/v1/cluster")
    async def cluster_status(name: str | None = None) -> dict[str, Any]:
        return await service.status(name)

    @app.post("/v1/cluster/{name}/nodes")
    async def cluster_join(name: str, node: NodeRef) -> dict[str, Any]:
        return await service.join(name, node)

    @app.delete("/v1/cluster/{name}/nodes/{node}")
    async def cluster_leave(name: str, node: str) -> dict[str, Any]:
        return await service.leave(name, node)

    @app.get("/v1/cluster/volumes")
    async def cluster_volumes(cluster: str | None = None) -> list[dict[str, Any]]:
        return await service.volumes(cluster)

    @app.post("/v1/cluster/volumes", status_code=201)
    async def cluster_volume_add(body: VolumePath) -> dict[str, Any]:
        state, results = await service.volume_add(body.cluster, body.path)
        return {"cluster": state, "checks": [r.model_dump() for r in results]}

    @app.delete("/v1/cluster/volumes")
    async def cluster_volume_remove(path: str, cluster: str | None = None) -> dict[str, Any]:
        return await service.volume_remove(cluster, path)

    @app.post("/v1/cluster/volume-check")
    async def cluster_volume_check(check: VolumeCheck) -> VolumeCheckResult:
        s = host.settings
        return await asyncio.to_thread(check_here, s.name, check, s.storage_roots)

    @app.get("/v1/cluster/facts")
    async def cluster_facts() -> NodeFacts:
        return await asyncio.to_thread(facts_here, host.settings)

    @app.post("/v1/cluster/reach")
    async def cluster_reach(req: ReachRequest) -> dict[str, bool]:
        if len(req.addresses) > 64:
            raise RefusedError("at most 64 addresses", field="addresses")
        for a in req.addresses:
            try:
                ipaddress.ip_address(a)
            except ValueError as exc:
                raise RefusedError(f"{a!r} is not an IP address", field="addresses") from exc
        return await asyncio.to_thread(reach, req.addresses)

    @app.post("/v1/cluster/validate")
    async def cluster_validate(req: ValidateRequest) -> dict[str, Any]:
        return await service.validate(req.cluster, req.nodes, req.volumes)

    # -- clustered VMs and failover (cluster/vms.py, cluster/controller.py) ----------------------
    cvms = ClusterVMs(host.vms, lambda: host.settings, member)
    host.vms.on_guest_power_off(cvms.guest_powered_off)
    controller = Controller(
        member, lambda: host.settings, HttpClusterPeer(tls, timeout=CONTROLLER_CALL_S)
    )

    @app.get("/v1/cluster/vms")
    async def cluster_vm_list(cluster: str | None = None) -> list[dict[str, Any]]:
        return await cvms.listing(cluster)

    @app.post("/v1/cluster/vms", status_code=201)
    async def cluster_vm_add(req: VMAdd, request: Request) -> dict[str, Any]:
        return await cvms.add(req, getattr(request.state, "identity", None))

    @app.patch("/v1/cluster/vms/{name}")
    async def cluster_vm_set(
        name: str, props: VMProperties, request: Request, cluster: str | None = None
    ) -> dict[str, Any]:
        return await cvms.set(name, props, cluster, getattr(request.state, "identity", None))

    @app.delete("/v1/cluster/vms/{name}")
    async def cluster_vm_remove(
        name: str, request: Request, cluster: str | None = None
    ) -> dict[str, Any]:
        return await cvms.remove(name, cluster, getattr(request.state, "identity", None))

    @app.get("/v1/cluster/events")
    async def cluster_events(cluster: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        return await cvms.events(cluster, limit)

    @app.get("/v1/cluster/controller")
    async def cluster_controller(cluster: str | None = None) -> dict[str, Any]:
        return {"report": await cvms.controller(cluster), "here": controller.status()}

    app.state.cluster_controller = controller
    app.state.cluster_vms = cvms

    # -- planned moves, drain, resume (cluster/planned.py) ---------------------------------------
    etcd_cache = EtcdCache(lambda: host.settings)
    owner = OwnerMoves(lambda: host.settings.name, lambda: member.cluster,
                       lambda: ClusterVMStore(etcd_cache.get()), jobs)  # fmt: skip
    planned = ClusterMoves(lambda: ClusterVMStore(etcd_cache.get()), HttpClusterPeer(tls))
    app.state.planned_moves = owner

    @app.post("/v1/cluster/vms/{name}/move", status_code=202)
    async def cluster_vm_move(name: str, body: ClusterMoveBody, request: Request) -> dict[str, Any]:
        return await planned.move(cvms._cluster(body.cluster), name, body.to, body.best,
                                  body.quick, getattr(request.state, "identity", None))  # fmt: skip

    @app.post("/v1/cluster/vms/{name}/planned-move", status_code=202)
    async def cluster_vm_planned_move(name: str, body: PlannedMoveBody) -> dict[str, Any]:
        cluster = cvms._cluster(body.cluster)
        state = await cvms._run(ClusterVMStore(etcd_cache.get()).load, cluster)
        node = state.nodes.get(body.to)
        if node is None:
            raise RefusedError(f"{body.to!r} is not a node of cluster {cluster!r}", field="to")
        job = await owner.start(
            cluster, name, body.to, node.url, body.quick, body.reason, body.group,
            body.group_limit,
        )  # fmt: skip
        return {"job": job_json(job)}

    @app.post("/v1/cluster/{name}/nodes/{node}/drain", status_code=202)
    async def cluster_drain(name: str, node: str, request: Request) -> dict[str, Any]:
        rec = await planned.drain(name, node, getattr(request.state, "identity", None))
        controller.wake()  # when this node leads, start at once rather than on the next tick
        return rec

    @app.post("/v1/cluster/{name}/nodes/{node}/resume")
    async def cluster_resume(
        name: str, node: str, body: ResumeBody, request: Request
    ) -> dict[str, Any]:
        rec = await planned.resume(
            name, node, body.failback, getattr(request.state, "identity", None)
        )
        controller.wake()
        return rec

    # after the fixed paths above: /v1/cluster/{name} would also match /v1/cluster/volumes
    @app.delete("/v1/cluster/{name}")
    async def cluster_destroy(name: str) -> dict[str, Any]:
        return await service.destroy(name)

    app.state.cluster_member = member
    return member
