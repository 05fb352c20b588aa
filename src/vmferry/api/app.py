"""The FastAPI application of ferryd. Thin: validate, authorize, call :class:`Host`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from vmferry import __version__
from vmferry.api.cluster_routes import LocalJobs, add_cluster_routes
from vmferry.api.delegation import MoveAuthority
from vmferry.api.diagnostics import add_diagnostics_routes
from vmferry.api.limits import install_input_limits
from vmferry.api.metrics import AgentMetrics, install_metrics
from vmferry.api.peer import AgentTLS, HttpPeer
from vmferry.api.security import install_security
from vmferry.errors import FerryError, HostError, RefusedError
from vmferry.host import Host, HostSettings, HostSettingsUpdate, VMCreate, VMInfo
from vmferry.host.events import Event, Level
from vmferry.host.vms import VMState
from vmferry.migration.engine import Moves, job_json
from vmferry.migration.incoming import IncomingMoves
from vmferry.migration.model import (
    CheckResult,
    IncomingPlan,
    IncomingRequest,
    MoveRequest,
    StorageMoveRequest,
)
from vmferry.migration.quick import ImportRequest, QuickMoves, QuickRequest
from vmferry.migration.slots import Slots
from vmferry.migration.storage import StorageMoves
from vmferry.migration.trace import trace_json
from vmferry.qemu.tls import X509Files

log = logging.getLogger("vmferry.api")

VM_ACTIONS = ("start", "stop", "shutdown", "pause", "resume", "save", "restore")


#: What an action says about whether the admin wants the VM running (None: nothing).
_WANTED: dict[str, bool] = {
    "start": True, "restore": True, "stop": False, "shutdown": False, "save": False,
}  # fmt: skip


class VMAction(BaseModel):
    """``POST /v1/vms/{name}/actions``: one verb, with a timeout for shutdown."""

    action: Literal["start", "stop", "shutdown", "pause", "resume", "save", "restore"]
    timeout: float = Field(default=60.0, gt=0, le=3600)


def _error(exc: FerryError) -> JSONResponse:
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    field = ".".join(loc) or "body"
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return field, f"{field}: {msg}"


def _own_url(request: Request) -> str:
    """This agent's URL as the caller reached it (recorded as the VM owner's address)."""
    return str(request.base_url).rstrip("/")


class StartIncoming(BaseModel):
    """Source → destination: the address the source reached."""

    address: str


class CommitIncoming(BaseModel):
    """Source → destination: the stream completed."""

    paused: bool = False
    started_at: float | None = None


def create_app(
    host: Host, *, require_client_cert: bool = True, tls: AgentTLS | None = None
) -> FastAPI:
    """Build the API for ``host``. Client certificates are required unless told otherwise."""
    slots = Slots(lambda: host.settings.migration.max_concurrent)
    # agent -> agent calls check peers' server certificates against this agent's CRL too
    tls = tls.with_state_dir(host.state_dir) if tls else None
    # QEMU encrypts migration streams and NBD copies with the agent's own certificate.
    x509 = X509Files(tls.cert, tls.key, tls.ca) if tls else None
    incoming = IncomingMoves(host.vms, lambda: host.settings, slots, x509)
    moves = Moves(
        host.vms, lambda: host.settings, slots, host.state_dir, lambda d: HttpPeer(d, tls), x509
    )
    storage = StorageMoves(moves, Slots(lambda: host.settings.storage.max_concurrent))
    quick = QuickMoves(moves, incoming, lambda d: HttpPeer(d, tls))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await host.apply_switches()
        host.vms.start_monitor()
        incoming.load()
        await moves.recover()
        await storage.recover()
        await quick.recover()
        cluster_member.start()  # lease, leader, self-fencing (cluster/member.py)
        app.state.cluster_controller.start()  # failover while leader (cluster/controller.py)
        app.state.planned_moves.start_loop()  # outcomes of planned moves (cluster/planned.py)
        log.info("ferryd %s serving host %s", __version__, host.settings.name)
        yield
        await app.state.planned_moves.stop()
        await app.state.cluster_controller.stop()
        await cluster_member.stop()
        await host.vms.stop_monitor()

    app = FastAPI(title="vmferry agent", version=__version__, lifespan=lifespan)
    cluster_member = add_cluster_routes(app, host, tls, LocalJobs(moves, quick))
    add_diagnostics_routes(app, host, tls)  # ferry doctor's probes (api/diagnostics.py)
    # GET /metrics for Prometheus (api/metrics.py, docs/observability.md)
    queues = {"migration": slots, "storage": storage.slots}
    install_metrics(app, AgentMetrics(host.vms, moves, queues, cluster_member))

    # identity, revocation, roles, throttling, audit log (api/security.py, docs/security.md)
    sec = install_security(app, host.state_dir, tls, require_client_cert)
    # who may start a move here, which moves this host receives (api/delegation.py)
    authority = MoveAuthority(
        lambda: host.settings, host.state_dir, tls.ca if tls else None,
        tls.cert if tls else None, lambda: sec.crl.current, app.state.cluster_vms.planned_move,
    )  # fmt: skip
    app.state.move_authority = authority
    install_input_limits(app)  # 413 over 1 MiB, error bodies (api/limits.py)

    @app.exception_handler(FerryError)
    async def ferry_error(request: Request, exc: FerryError) -> JSONResponse:
        if request.method not in ("GET", "HEAD", "OPTIONS") and 400 <= exc.status < 500:
            who = getattr(request.state, "identity", None)
            on_vm = request.url.path.startswith("/v1/vms/")
            vm = request.path_params.get("name") if on_vm else None
            host.vms.events.record(
                "refused", f"{request.method} {request.url.path}: {exc.message}",
                level="warning", vm=vm, data={"field": exc.field, "fix": exc.fix, "by": who,
                                              "status": exc.status},
            )  # fmt: skip
        return _error(exc)

    @app.get("/v1/events")
    async def events(
        vm: str | None = Query(default=None, max_length=63),
        job: str | None = Query(default=None, max_length=64),
        level: Level | None = None,
        kind: str | None = Query(default=None, max_length=64),
        since: float | None = None,
        after: int | None = Query(default=None, ge=0, le=2**63 - 1),  # an SQLite INTEGER
        limit: int = Query(default=100, ge=1, le=10_000),
    ) -> list[Event]:
        return await asyncio.to_thread(
            host.vms.events.query, vm=vm, job=job, level=level, kind=kind, since=since,
            after=after, limit=limit,
        )  # fmt: skip

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(HostError(f"internal error in ferryd: {exc.__class__.__name__}: {exc}"))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        field, message = _validation_message(exc)
        return JSONResponse(
            {"error": {"code": "refused", "message": message, "field": field, "fix": None}},
            status_code=400,
        )

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "host": host.settings.name, "version": __version__}

    @app.get("/v1/host")
    async def host_info() -> dict[str, Any]:
        return await host.info()

    @app.get("/v1/host/settings")
    async def get_settings() -> HostSettings:
        return host.settings

    @app.patch("/v1/host/settings")
    async def patch_settings(update: HostSettingsUpdate) -> HostSettings:
        return await host.update_settings(update)

    @app.get("/v1/vms")
    async def list_vms() -> list[VMInfo]:
        return host.vms.list()

    @app.post("/v1/vms", status_code=201)
    async def create_vm(req: VMCreate) -> VMInfo:
        return await host.vms.create(req)

    @app.get("/v1/vms/{name}")
    async def show_vm(name: str) -> VMInfo:
        return host.vms.info(name)

    @app.get("/v1/vms/{name}/console")
    async def vm_console(name: str, lines: int = 50) -> dict[str, list[str]]:
        if not 1 <= lines <= 10_000:
            raise RefusedError("lines must be 1..10000", field="lines")
        return {"lines": host.vms.console(name, lines)}

    @app.delete("/v1/vms/{name}", status_code=204)
    async def delete_vm(name: str) -> Response:
        await host.vms.delete(name)
        return Response(status_code=204)

    @app.post("/v1/vms/{name}/actions")
    async def vm_action(name: str, act: VMAction, request: Request) -> VMInfo:
        vms = host.vms
        handlers = {
            "start": vms.start,
            "stop": vms.stop,
            "pause": vms.pause,
            "resume": vms.resume,
            "save": vms.save,
            "restore": vms.restore,
        }
        # A clustered VM the admin turns off stays off through a failover (cluster/vms.py):
        # recorded before the action, undone if the action fails.
        wanted = _WANTED.get(act.action)
        cvms = app.state.cluster_vms
        before = None
        if wanted is not None:
            before = await cvms.record_wanted(
                name, wanted, getattr(request.state, "identity", None)
            )
        try:
            if act.action == "shutdown":
                return await vms.shutdown(name, act.timeout)
            return await handlers[act.action](name)
        except BaseException:
            # undone unless the VM is in the wanted state anyway (a stop of a VM already off)
            if wanted is not None and before is not None and before != (not wanted):
                with contextlib.suppress(FerryError):
                    off = vms.info(name).state in (VMState.OFF, VMState.SAVED, VMState.CRASHED)
                    if off == wanted:
                        await cvms.record_wanted(name, not wanted, None)
            raise

    # -- moves (source side) -----------------------------------------------------------------
    @app.post("/v1/vms/{name}/move", status_code=202)
    async def move_vm(name: str, req: MoveRequest, request: Request) -> dict[str, Any]:
        server = request.scope.get("server")
        await authority.check_start(
            request.state.principal, server[0] if server else None, vm=name,
            destination=req.destination.name, service="quick" if req.options.quick else "live",
            ticket=req.ticket, what_if=req.what_if,
        )  # fmt: skip
        if not req.what_if and await app.state.cluster_vms.is_clustered(name):
            raise RefusedError(
                f"VM {name!r} is clustered in {cluster_member.cluster}: the cluster must know "
                "where it runs", field="name",
                fix=f"ferry cluster move {name} --to NODE (or --best)",
            )  # fmt: skip
        if req.options.quick:  # save to the shared volume, restore on the destination
            if req.what_if:
                return await quick.what_if(name, req)
            return job_json(await quick.submit(name, req))
        if req.what_if:
            return await moves.what_if(name, req)
        return job_json(await moves.submit(name, req))

    @app.post("/v1/vms/{name}/move-storage", status_code=202)
    async def move_storage(name: str, req: StorageMoveRequest) -> dict[str, Any]:
        return job_json(await storage.submit(name, req))

    @app.get("/v1/migrations")
    async def list_migrations() -> list[dict[str, Any]]:
        return [j.summary() for j in moves.all()]

    @app.get("/v1/migrations/{job_id}")
    async def show_migration(job_id: str) -> dict[str, Any]:
        return job_json(moves.get(job_id))

    @app.get("/v1/migrations/{job_id}/trace")
    async def migration_trace(job_id: str) -> dict[str, Any]:
        job = moves.get(job_id)  # phase timeline, passes and samples (migration/trace.py)
        return trace_json(job, moves.trace.load(job_id))

    @app.post("/v1/migrations/{job_id}/complete")
    async def complete_migration(job_id: str) -> dict[str, Any]:
        return job_json(await moves.complete(job_id))

    @app.post("/v1/migrations/{job_id}/cancel")
    async def cancel_migration(job_id: str) -> dict[str, Any]:
        return job_json(moves.cancel(job_id))

    # -- moves (destination side; called by the source agent) --------------------------------
    @app.post("/v1/migrations/incoming")
    async def incoming_prepare(req: IncomingRequest, request: Request) -> IncomingPlan:
        await authority.check_incoming(
            request.state.principal, vm=req.spec.name, source=req.source, service="live",
            ticket=req.ticket, dry_run=req.dry_run,
        )  # fmt: skip
        return await incoming.prepare(req)

    @app.post("/v1/migrations/incoming/{job_id}/start", status_code=204)
    async def incoming_start(job_id: str, body: StartIncoming) -> Response:
        await incoming.start(job_id, body.address)
        return Response(status_code=204)

    @app.get("/v1/migrations/incoming/{job_id}")
    async def incoming_status(job_id: str) -> dict[str, Any]:
        return await incoming.status(job_id)

    @app.post("/v1/migrations/incoming/{job_id}/commit")
    async def incoming_commit(job_id: str, body: CommitIncoming) -> dict[str, Any]:
        return await incoming.commit(job_id, body.paused, body.started_at)

    @app.post("/v1/migrations/incoming/{job_id}/recover")
    async def incoming_recover(job_id: str, body: StartIncoming) -> dict[str, int]:
        return {"port": await incoming.recover(job_id, body.address)}

    @app.post("/v1/migrations/incoming/{job_id}/abort", status_code=204)
    async def incoming_abort(job_id: str) -> Response:
        await incoming.abort(job_id)
        return Response(status_code=204)

    # -- quick moves and imports (migration/quick.py) -----------------------------------------
    @app.post("/v1/vms/import", status_code=201)
    async def import_vm(body: ImportRequest, request: Request) -> VMInfo:
        return await quick.import_vm(body.path, body.peers, _own_url(request))

    @app.post("/v1/migrations/incoming/quick/checks")
    async def quick_checks(req: QuickRequest, request: Request) -> list[CheckResult]:
        await authority.check_incoming(
            request.state.principal, vm=req.spec.name, source=req.source, service="quick",
            ticket=req.ticket, dry_run=True,
        )  # fmt: skip
        return await asyncio.to_thread(quick.checks, req)

    @app.post("/v1/migrations/incoming/quick/receive")
    async def quick_receive(req: QuickRequest, request: Request) -> dict[str, Any]:
        await authority.check_incoming(
            request.state.principal, vm=req.spec.name, source=req.source, service="quick",
            ticket=req.ticket, dry_run=False,
        )  # fmt: skip
        return await quick.receive(req, _own_url(request))

    app.state.quick = quick
    app.state.moves = moves
    app.state.storage = storage
    app.state.incoming = incoming
    return app
