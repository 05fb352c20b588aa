"""The source side of a live move: an explicit phase machine with a rollback guard.

Phases: queued → checks → setup → [mirror] → precopy → [postcopy] → switchover → resume →
announce → cleanup. Until the guest runs on the destination, any failure or a cancel rolls back
to "VM running on the source, destination clean", and the job records the phase, the cause and
what the admin can do. Jobs are stored as JSON so an agent restart does not lose them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from vmferry import __version__
from vmferry.errors import ConflictError, FerryError, HostError, NotFoundError, RefusedError
from vmferry.host.events import Level
from vmferry.host.host import cpu_info
from vmferry.host.settings import HostSettings
from vmferry.host.spec import VMSpec
from vmferry.host.vms import VMManager, VMState
from vmferry.migration.converge import (
    AIM_PASSES,
    Counters,
    PassWatch,
    aimed_downtime_ms,
    bulk_copy_ending,
    xbzrle_cache_bytes,
)
from vmferry.migration.model import (
    CheckResult,
    Destination,
    IncomingPlan,
    IncomingRequest,
    Job,
    JobError,
    JobState,
    MoveRequest,
    Phase,
    PhaseRecord,
)
from vmferry.migration.qemu_ops import (
    disable_tls,
    disk_node,
    enable_tls,
    mirror_until_ready,
    nbd_client_args,
    set_capabilities,
    set_stream_limits,
)
from vmferry.migration.slots import Slots
from vmferry.migration.trace import TraceRecorder
from vmferry.qemu.qmp import EventWaiter, QmpError, QmpSession, qmp_session
from vmferry.qemu.sockets import set_nodelay, set_notsent_lowat, stream_fds
from vmferry.qemu.tls import X509Files, prepare_creds_dir

log = logging.getLogger("vmferry.migration")

POLL_S = 0.02
#: The migration link's rate assumed until QEMU has measured it (bounds the send queue).
ASSUMED_LINK_MBPS = 1000
#: The smallest send queue the engine sets: below it the writer cannot keep a link busy.
MIN_SEND_QUEUE = 256 << 10
#: How often the engine looks for new migration sockets once it found the first.
SOCKET_RESCAN_S = 0.5
#: Before switchover, a destination agent silent this long fails the move (the VM stays here).
PEER_SILENT_S = 10.0
#: How long the source keeps asking an unreachable destination to drop a failed move's skeleton.
ABORT_RETRY_S = 600.0


class Peer(Protocol):
    """The destination agent, as the source sees it."""

    async def prepare(self, req: IncomingRequest) -> IncomingPlan: ...
    async def start(self, job_id: str, address: str) -> None: ...
    async def status(self, job_id: str) -> dict[str, Any]: ...
    async def commit(
        self, job_id: str, paused: bool, started_at: float | None
    ) -> dict[str, Any]: ...
    async def abort(self, job_id: str) -> None: ...
    async def recover(self, job_id: str, address: str) -> int: ...
    async def close(self) -> None: ...


PeerFactory = Callable[[Destination], Peer]
#: Told ``("started", job)`` when a job of any kind is created and ``("ended", job)`` once it
#: completed, failed or was cancelled (the API's metrics listen; see api/metrics.py).
JobListener = Callable[[str, Job], None]


#: Pre-copy passes the auto policy accepts before it prefers post-copy.
MAX_PRECOPY_PASSES = 4


def predict_passes(remaining: int, dirty_bps: float, link_bps: float, target_ms: int) -> float:
    """How many more pre-copy passes until the rest fits in the downtime target.

    Each pass sends what the guest dirtied during the previous one, so the remainder shrinks by
    ``dirty/link`` per pass; at or above the link rate it never shrinks (``inf``).
    """
    if link_bps <= 0:
        return math.inf
    fits = link_bps * target_ms / 1000
    if remaining <= fits:
        return 0.0
    ratio = dirty_bps / link_bps
    if ratio >= 0.95:
        return math.inf
    if ratio <= 0:
        return 1.0
    return math.log(fits / remaining) / math.log(ratio)


class MoveFailed(Exception):
    """A move failed in a phase; carries the admin-facing message and fix."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix


class MoveCancelled(Exception):
    """The admin cancelled the move."""


class Moves:
    """Outgoing live moves of this host."""

    def __init__(
        self,
        vms: VMManager,
        settings: Callable[[], HostSettings],
        slots: Slots,
        state_dir: Path,
        peers: PeerFactory,
        tls: X509Files | None = None,
    ) -> None:
        self.vms = vms
        self._settings = settings
        self.slots = slots
        #: The agent's own certificate: what the source QEMU presents (TLS client).
        self._tls = tls
        self._creds_dir = state_dir / "tls" / "qemu"
        self.dir = state_dir / "migrations"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._peers = peers
        self.jobs: dict[str, Job] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel: set[str] = set()
        #: The auto policy's view of each running pre-copy (migration/converge.py).
        self._watch: dict[str, PassWatch] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._last_save = 0.0
        #: Samples of every job's figures (``<id>.trace.json``, migration/trace.py).
        self.trace = TraceRecorder(self.dir)
        self.listeners: list[JobListener] = []
        for path in sorted(self.dir.glob("*.json")):
            if path.name.endswith(".trace.json"):
                continue
            try:
                job = Job.model_validate_json(path.read_text())
            except ValueError:
                continue
            self.jobs[job.id] = job
        #: Jobs whose outcome event is written (those found ended on disk had theirs).
        self._ended: set[str] = {j.id for j in self.jobs.values() if j.state.terminal}
        self._announced: set[str] = set(self.jobs)

    def _tell(self, what: str, job: Job) -> None:
        for listener in self.listeners:
            try:
                listener(what, job)
            except Exception:  # an observer must never fail a move
                log.exception("job listener failed on %s of %s", what, job.id)

    # -- records ---------------------------------------------------------------------------
    def _save(self, job: Job, force: bool = True) -> None:
        if job.id not in self._announced:
            self._announced.add(job.id)
            self._tell("started", job)
        self.trace.sample(job)
        now = time.monotonic()
        if not force and now - self._last_save < 0.5:
            return
        self._last_save = now
        tmp = self.dir / f"{job.id}.tmp"
        tmp.write_text(job.model_dump_json(indent=1))
        os.replace(tmp, self.dir / f"{job.id}.json")
        if job.state.terminal and job.finished_at is not None:
            self._outcome(job)

    def _enter(self, job: Job, phase: Phase) -> None:
        now = time.time()
        if job.phases and job.phases[-1].ended_at is None:
            job.phases[-1].ended_at = now
        job.phases.append(PhaseRecord(phase=phase, started_at=now))
        job.phase = phase
        self._save(job)
        log.info("move %s of %s: %s", job.id, job.vm, phase.value)
        self.vms.events.record(
            "migration-phase", f"{job.kind} move {job.id} of {job.vm} to {job.destination}: "
            f"{phase.value}", vm=job.vm, job=job.id, level="debug" if job.kind != "live"
            or phase not in (Phase.SWITCHOVER, Phase.POSTCOPY) else "info",
            data={"phase": phase.value, "kind": job.kind},
        )  # fmt: skip

    def _outcome(self, job: Job) -> None:
        """One event when a job ends: completed, failed (with why) or cancelled."""
        if job.id in self._ended:
            return
        self._ended.add(job.id)
        state = job.state.value
        why = f": {job.error.message}" if job.error else ""
        took = f" in {job.total_s:.1f} s" if job.total_s is not None else ""
        levels: dict[str, Level] = {"completed": "info", "cancelled": "warning"}
        level = levels.get(state, "error")
        self.vms.events.record(
            f"migration-{state}", f"{job.kind} move {job.id} of {job.vm} to {job.destination} "
            f"{state}{took}{why}", vm=job.vm, job=job.id,
            level=level,
            data={"kind": job.kind, "total_s": job.total_s, "downtime_ms": job.downtime_ms,
                  "qemu_downtime_ms": job.qemu_downtime_ms, "phase": job.phase.value,
                  "fix": job.error.fix if job.error else None},
        )  # fmt: skip
        self._tell("ended", job)

    def all(self) -> list[Job]:
        """All jobs, newest first."""
        return sorted(self.jobs.values(), key=lambda j: j.created_at, reverse=True)

    def get(self, job_id: str) -> Job:
        """One job."""
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"no migration {job_id!r} on this host", field="id",
                                fix="see ferry migration list")  # fmt: skip
        if job.state is JobState.QUEUED:
            job.queue_position = self.slots.position(job.id) or job.queue_position
        return job

    # -- submit / cancel -------------------------------------------------------------------
    def _local_checks(
        self, spec: VMSpec, req: MoveRequest, in_job: bool = False
    ) -> list[CheckResult]:
        s = self._settings()
        state = self.vms.state(spec.name)
        if in_job and state is VMState.MIGRATING:
            state = VMState.RUNNING  # our own job marked it
        res = [
            CheckResult(
                name="source-migration-enabled",
                ok=s.migration.enabled,
                message="live migration is enabled on the source"
                if s.migration.enabled
                else f"live migration is disabled on {s.name}",
                fix=None if s.migration.enabled else "ferry host set --migration-enabled",
            ),
            CheckResult(
                name="vm-state",
                ok=state in (VMState.RUNNING, VMState.PAUSED),
                message=f"VM {spec.name!r} is {state.value}",
                fix=None
                if state in (VMState.RUNNING, VMState.PAUSED)
                else "a live move needs the VM running or paused; start it first",
            ),
            CheckResult(
                name="pass-through",
                ok=True,
                message="no pass-through disks (every disk is a file vmferry can copy)",
            ),
            CheckResult(
                name="destination",
                ok=req.destination.name != s.name,
                message=f"from {s.name} to {req.destination.name}",
                fix=None if req.destination.name != s.name else "pick another host",
            ),
            self._encryption_check(req),
        ]
        return res

    def _encryption_check(self, req: MoveRequest) -> CheckResult:
        """TLS needs this agent's certificate; clear text needs a network marked trusted."""
        s = self._settings()
        if req.options.encryption:
            ok = self._tls is not None
            return CheckResult(
                name="encryption",
                ok=ok,
                message=f"{s.name} sends the memory stream and disk copy encrypted (TLS, its "
                "host certificate)"
                if ok
                else f"{s.name}'s agent has no certificate for QEMU's TLS",
                fix=None if ok else "start ferryd with --tls-cert, --tls-key and --tls-ca",
            )
        trusted = s.migration.trusted_networks
        return CheckResult(
            name="encryption",
            ok=bool(trusted),
            message=f"unencrypted (--no-encryption): {s.name} trusts {', '.join(trusted)}"
            if trusted
            else "encryption: --no-encryption is allowed only over a migration network marked "
            f"trusted, and {s.name} trusts none of its migration networks",
            fix=None
            if trusted
            else f"mark the network trusted: ferry --host {s.name} host migration-network add "
            "CIDR --trusted; or move without --no-encryption",
        )

    def _incoming_request(self, job: Job, spec: VMSpec, dry_run: bool) -> IncomingRequest:
        s = self._settings()
        transport = (
            "tcp" if job.options.qemu_defaults else (job.options.transport or s.migration.transport)
        )
        cpu = cpu_info()
        return IncomingRequest(
            job_id=job.id,
            source=s.name,
            source_version=__version__,
            spec=spec,
            options=job.options,
            transport=transport,
            streams=job.options.streams or s.migration.streams,
            postcopy=job.options.policy != "precopy"
            and transport == "tcp"
            and spec.allow_postcopy
            and not job.options.qemu_defaults,
            cpu_vendor=cpu["vendor"],
            cpu_flags=cpu["flags"],
            dry_run=dry_run,
            ticket=job.ticket,
        )

    async def what_if(self, name: str, req: MoveRequest) -> dict[str, Any]:
        """Run every check and return the plan with a predicted time; change nothing."""
        spec = self.vms.spec(name)
        job = Job(vm=name, source=self._settings().name, destination=req.destination.name,
                  destination_url=req.destination.url, options=req.options,
                  ticket=req.ticket)  # fmt: skip
        checks = self._local_checks(spec, req)
        peer = self._peers(req.destination)
        try:
            plan = await peer.prepare(self._incoming_request(job, spec, dry_run=True))
        finally:
            await peer.close()
        checks += plan.checks
        disk_bytes = sum(d.size_mib for d in spec.disks if d.name in plan.mirrored) * 2**20
        ram_bytes = spec.memory_mib * 2**20
        link_mbps = req.options.bandwidth_mbps or self._settings().migration.bandwidth_mbps or 1000
        predicted = (disk_bytes + ram_bytes) * 8 / (link_mbps * 1e6)
        return {
            "vm": name,
            "source": self._settings().name,
            "destination": req.destination.name,
            "ok": all(c.ok for c in checks),
            "checks": [c.model_dump() for c in checks],
            "mode": plan.mode,
            "encrypted": req.options.encryption,
            "storage_dir": plan.storage_dir,
            "disks": plan.disks,
            "bytes_to_move": disk_bytes + ram_bytes,
            "link_mbps_assumed": link_mbps,
            "predicted_s": round(predicted, 1),
            "note": "memory is counted at its full size; an idle guest moves faster",
        }

    async def submit(self, name: str, req: MoveRequest) -> Job:
        """Queue a move of VM ``name`` and start working on it."""
        spec = self.vms.spec(name)
        for j in self.jobs.values():
            if j.vm == name and not j.state.terminal:
                raise ConflictError(
                    f"VM {name!r} is already being moved (migration {j.id})",
                    field="name", fix=f"watch it: ferry migration show {j.id}",
                )  # fmt: skip
        failing = [c for c in self._local_checks(spec, req) if not c.ok]
        if failing:
            field = "encryption" if failing[0].name == "encryption" else "vm"
            raise RefusedError(failing[0].message, field=field, fix=failing[0].fix)
        job = Job(vm=name, source=self._settings().name, destination=req.destination.name,
                  destination_url=req.destination.url, options=req.options,
                  ticket=req.ticket)  # fmt: skip
        job.phases.append(PhaseRecord(phase=Phase.QUEUED, started_at=time.time()))
        self.jobs[job.id] = job
        self._save(job)
        self._tasks[job.id] = asyncio.get_running_loop().create_task(
            self._run(job, req.destination)
        )
        return job

    def cancel(self, job_id: str) -> Job:
        """Ask a move to stop; refused once the guest already runs on the destination."""
        job = self.get(job_id)
        if job.state.terminal:
            raise ConflictError(f"migration {job_id} already {job.state.value}", field="id")
        if job.kind == "storage" and job.phase in (Phase.SWITCHOVER, Phase.CLEANUP):
            raise ConflictError(
                f"storage move {job_id} is past the pivot ({job.phase.value}): the VM already "
                "uses its new files", field="id", fix="let it finish, then move the storage back",
            )  # fmt: skip
        if job.phase in (Phase.POSTCOPY, Phase.RESUME, Phase.ANNOUNCE, Phase.CLEANUP) or (
            job.phase is Phase.SWITCHOVER and job.postcopy_used
        ):
            raise ConflictError(
                f"migration {job_id} is past the point of no return ({job.phase.value}): "
                "the guest already runs on the destination",
                field="id", fix="let it finish, then move the VM back",
            )  # fmt: skip
        self._cancel.add(job_id)
        return job

    def _check_cancel(self, job: Job) -> None:
        if job.id in self._cancel:
            raise MoveCancelled()

    # -- the phase machine -----------------------------------------------------------------
    async def _run(self, job: Job, dest: Destination) -> None:
        t0 = time.monotonic()
        peer = self._peers(dest)
        name = job.vm
        prepared = False
        plan: IncomingPlan | None = None
        job.state = JobState.QUEUED
        job.queue_position = self.slots.position(job.id)
        try:
            await self._queue(job)
            async with self.vms.lock(name):
                job.state = JobState.RUNNING
                self.vms.set_busy(name, VMState.MIGRATING)
                spec = self.vms.spec(name)
                qmp = self.vms.qmp_path(name)
                async with qmp_session(qmp, timeout=15) as q:
                    was_paused = await q.status() == "paused"
                    job.was_paused = was_paused
                    try:
                        self._enter(job, Phase.CHECKS)
                        plan = await self._checks(job, spec, peer)
                        self._enter(job, Phase.SETUP)
                        plan = await self._setup(job, spec, peer)
                        prepared = True
                        address = await self._choose_address(job, plan)
                        await self._stream_security(job, q, plan)
                        await peer.start(job.id, address)
                        if plan.mirrored:
                            self._enter(job, Phase.MIRROR)
                            await self._mirror(job, q, plan, address)
                        self._enter(job, Phase.PRECOPY)
                        await self._precopy(job, q, plan, address, peer)
                    except BaseException as exc:
                        await self._rollback(job, q, peer, was_paused, prepared, exc)
                        raise
                    self._enter(job, Phase.RESUME)
                    started = self.vms.started_at(name)
                    result = await self._commit(job, peer, was_paused, started)
                    self._enter(job, Phase.ANNOUNCE)
                    job.progress.ram_remaining = 0
                self._enter(job, Phase.CLEANUP)
                await self.vms.release(name, delete_files=job.mode == "shared-nothing")
                job.state = JobState.COMPLETED
                log.info("move %s: %s now runs on %s (%s)", job.id, name, dest.name, result)
        except MoveCancelled:
            job.state = JobState.CANCELLED
            job.error = JobError(phase=job.phase, message="cancelled by the admin; "
                                 "the VM keeps running on the source")  # fmt: skip
        except MoveFailed as exc:
            job.state = JobState.FAILED
            job.error = JobError(phase=job.phase, message=exc.message, fix=exc.fix)
        except FerryError as exc:
            job.state = JobState.FAILED
            job.error = JobError(phase=job.phase, message=exc.message, fix=exc.fix)
        except Exception as exc:
            log.exception("move %s failed", job.id)
            job.state = JobState.FAILED
            job.error = JobError(phase=job.phase, message=f"{exc.__class__.__name__}: {exc}")
        finally:
            self.slots.release(job.id)
            self._cancel.discard(job.id)
            self._watch.pop(job.id, None)
            with contextlib.suppress(FerryError):
                self.vms.set_busy(name, VMState.HANDOVER if job.handover_pending else None)
            now = time.time()  # before any await: readers see a finished job complete
            if job.phases and job.phases[-1].ended_at is None:
                job.phases[-1].ended_at = now
            job.finished_at = now
            job.total_s = round(time.monotonic() - t0, 3)
            job.queue_position = None
            self._save(job)
            self._tasks.pop(job.id, None)
            await peer.close()

    async def _commit(
        self, job: Job, peer: Peer, paused: bool, started: float | None
    ) -> dict[str, Any]:
        """Hand the VM to the destination; retried, since the guest already runs there."""
        last: FerryError | None = None
        deadline = time.monotonic() + job.options.commit_retry_s  # covers an agent restart
        attempt = 0
        while True:
            try:
                return await peer.commit(job.id, paused, started)
            except FerryError as exc:
                last = exc
                attempt += 1
                log.warning("move %s: commit attempt %d failed: %s", job.id, attempt, exc)
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(min(5.0, 0.5 * attempt))
        assert last is not None
        job.handover_pending = True
        raise MoveFailed(
            f"the guest runs on {job.destination} but the destination agent did not take it "
            f"over: {last.message}; the source QEMU is kept paused",
            f"check ferryd on {job.destination}, then: ferry migration complete {job.id}",
        )

    async def _queue(self, job: Job) -> None:
        opts = job.options
        waiter = asyncio.ensure_future(
            self.slots.acquire(job.id, opts.queue_group, opts.group_limit)
        )
        try:
            while not waiter.done():
                job.queue_position = self.slots.position(job.id)
                self._check_cancel(job)
                await asyncio.wait({waiter}, timeout=0.2)
            waiter.result()
        except BaseException:
            waiter.cancel()
            raise
        job.queue_position = None

    async def _checks(self, job: Job, spec: VMSpec, peer: Peer) -> IncomingPlan:
        req = MoveRequest(destination=Destination(name=job.destination, url=job.destination_url),
                          options=job.options)  # fmt: skip
        checks = self._local_checks(spec, req, in_job=True)
        plan = await peer.prepare(self._incoming_request(job, spec, dry_run=True))
        job.checks = checks + plan.checks
        job.mode = plan.mode
        failed = [c for c in job.checks if not c.ok]
        if failed:
            raise MoveFailed("; ".join(c.message for c in failed), failed[0].fix)
        return plan

    async def _setup(self, job: Job, spec: VMSpec, peer: Peer) -> IncomingPlan:
        """Ask the destination for a skeleton VM; wait while it is busy with other moves."""
        req = self._incoming_request(job, spec, dry_run=False)
        while True:
            self._check_cancel(job)
            try:
                plan = await peer.prepare(req)
                break
            except ConflictError as exc:
                if exc.field != "busy":
                    raise
                job.queue_position = 0  # waiting for the destination
                await asyncio.sleep(1.0)
        job.queue_position = None
        job.mode = plan.mode
        job.transport = req.transport
        return plan

    async def _stream_security(self, job: Job, q: QmpSession, plan: IncomingPlan) -> None:
        """TLS on the source QEMU (client side), or clear text when the move asked for it."""
        if plan.encrypted != job.options.encryption:
            raise MoveFailed(
                f"{job.destination} prepared an {'encrypted' if plan.encrypted else 'unencrypted'}"
                " stream, not what the move asked for",
                f"upgrade vmferry on {job.destination}",
            )
        if job.options.encryption:
            if self._tls is None:
                raise MoveFailed(
                    "this agent has no certificate for QEMU's TLS",
                    "start ferryd with --tls-cert, --tls-key and --tls-ca",
                )
            creds = await asyncio.to_thread(prepare_creds_dir, self._tls, self._creds_dir)
            await enable_tls(q, creds, "client", _tls_hostname(job))
        else:
            await disable_tls(q)
        job.encrypted = job.options.encryption
        self._save(job)

    async def _choose_address(self, job: Job, plan: IncomingPlan) -> str:
        """The first destination migration address this host can open a connection to."""
        tried = []
        candidates = plan.candidates
        if not job.options.encryption:
            s = self._settings()
            candidates = [a for a in candidates if s.migration.trusted(a)]
            if not candidates:
                raise MoveFailed(
                    "encryption: --no-encryption is allowed only over a migration network "
                    f"marked trusted; {s.name} trusts none of the destination's addresses "
                    f"({', '.join(plan.candidates)})",
                    f"mark that network trusted: ferry --host {s.name} host migration-network "
                    "add CIDR --trusted; or move without --no-encryption",
                )
        for addr in candidates:
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection(addr, plan.port), 3.0)
                w.close()
                job.address = addr
                return addr
            except (OSError, TimeoutError) as exc:
                tried.append(f"{addr} ({exc.__class__.__name__})")
        raise MoveFailed(
            "no migration network available: tried " + (", ".join(tried) or "nothing"),
            "check the migration networks on both hosts: ferry host migration-network list",
        )

    async def _mirror(self, job: Job, q: QmpSession, plan: IncomingPlan, address: str) -> None:
        mirrors = []
        for disk in plan.mirrored:
            await q.execute("blockdev-add", nbd_client_args(
                f"nbd-{disk}", disk, address, plan.nbd_port, bool(job.encrypted),
                _tls_hostname(job),
            ))  # fmt: skip
            # The disk's node changes name after a storage move: look it up by its device.
            mirrors.append((f"mirror-{disk}", await disk_node(q, disk), f"nbd-{disk}"))

        def progress(done: int, total: int) -> None:
            job.progress.disk_transferred, job.progress.disk_total = done, total
            self._check_cancel(job)
            self._save(job, force=False)

        await mirror_until_ready(q, mirrors, timeout=24 * 3600, on_progress=progress)

    async def _recover_postcopy(self, job: Job, q: QmpSession, peer: Peer, address: str) -> None:
        """The link broke in post-copy: both halves wait; reconnect when the link is back.

        The guest is paused (its memory is split between the hosts) until QEMU's post-copy
        recovery succeeds; vmferry retries for ``recover_timeout_s``.
        """
        job.escalations.append("post-copy link broke; recovering")
        self._save(job)
        deadline = time.monotonic() + job.options.recover_timeout_s
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            try:
                port = await peer.recover(job.id, address)
                await q.execute("migrate", {"uri": f"tcp:{address}:{port}", "resume": True})
            except (FerryError, QmpError) as exc:
                log.info("move %s: post-copy recovery attempt failed: %s", job.id, exc)
                continue
            st = "none"
            for _ in range(100):
                st = (await q.execute("query-migrate")).get("status")
                if st in ("postcopy-active", "completed"):
                    job.escalations.append("post-copy recovered")
                    return
                if st == "postcopy-paused":
                    break
                await asyncio.sleep(0.1)
            if st != "postcopy-paused":
                # The handshake hangs (e.g. one channel half-open): pause again and retry.
                log.warning("move %s: post-copy recovery stuck in %s; pausing to retry", job.id, st)
                with contextlib.suppress(QmpError):
                    await q.execute("migrate-pause")
        raise MoveFailed(
            f"post-copy could not reconnect within {job.options.recover_timeout_s:.0f} s; the "
            "guest stays paused with its memory split between the hosts",
            "restore the migration link; QEMU keeps both halves, recovery can be retried",
        )

    async def _precopy(
        self, job: Job, q: QmpSession, plan: IncomingPlan, address: str, peer: Peer
    ) -> None:
        s = self._settings().migration
        opts = job.options
        spec = self.vms.spec(job.vm)
        req = self._incoming_request(job, spec, True)
        # Pre-copy uses XBZRLE where it pays (migration/converge.py); post-copy never needs it.
        xbzrle = not opts.qemu_defaults and opts.policy != "postcopy" and req.transport == "tcp"
        await set_capabilities(
            q, req.transport, req.streams, req.postcopy, incoming=False,
            pause_before_switchover=bool(plan.mirrored),
            auto_converge=not opts.qemu_defaults and (opts.policy == "precopy" or not req.postcopy),
            xbzrle_cache=xbzrle_cache_bytes(spec.memory_mib << 20) if xbzrle else None,
        )  # fmt: skip
        self._watch[job.id] = pw = PassWatch(xbzrle=xbzrle)
        if not opts.qemu_defaults:
            pw.limit_ms = aimed_downtime_ms(opts.downtime_target_ms, s.downtime_aim)
            await set_stream_limits(q, opts.bandwidth_mbps or s.bandwidth_mbps, pw.limit_ms)
        await q.execute("migrate", {"uri": f"tcp:{address}:{plan.port}"})
        started = time.monotonic()
        watch = _PeerWatch(peer, job.id)
        # The benchmark's baseline ("QEMU's defaults") keeps QEMU's own sockets as they are.
        tune = asyncio.ensure_future(self._tune_sockets(
            job, plan.port, s.send_queue_ms, opts.bandwidth_mbps or s.bandwidth_mbps))  # fmt: skip
        try:
            # woken at once by QEMU's MIGRATION events (pre-switchover pauses the guest)
            with q.waiter("MIGRATION") as events:
                await self._precopy_loop(job, q, plan, peer, address, req, watch, started, events)
        finally:
            watch.close()
            tune.cancel()

    async def _tune_sockets(self, job: Job, port: int, ms: float, cap_mbps: int | None) -> None:
        """Tune the source QEMU's migration sockets (qemu/sockets.py) while it copies.

        Nagle's algorithm off at once (QEMU leaves it on for the main channel: TLS handshake
        messages and the stream's first sections would wait for the destination's delayed
        acknowledgement, 40 ms each, while the guest stalls). From the end of the first scan
        of memory on, at most ``ms`` of unsent data at the stream's rate: what the sockets
        hold when QEMU stops the guest is sent during the pause. Runs until pre-copy ends."""
        proc = self.vms.process(job.vm)
        if proc is None or job.options.qemu_defaults:
            return
        pid, started = proc.pid, time.monotonic()
        quick: set[int] = set()  # socket inodes with Nagle off
        bounded: dict[int, int] = {}  # socket inode -> send-queue bound in bytes
        fds: dict[int, int] = {}
        scanned = 0.0
        while True:
            now = time.monotonic()
            # /proc/PID/net/tcp lists every TCP socket of the host: read it often only until
            # QEMU's first connection shows up, then now and then for the channels it adds
            # (post-copy preempt, multifd, a recovered stream).
            if not quick or now - scanned >= SOCKET_RESCAN_S:
                fds, scanned = stream_fds(pid, port), now
            try:
                new = [fd for fd, ino in fds.items() if ino not in quick]
                if new:
                    set_nodelay(pid, new)
                    quick.update(fds.values())
                bound = self._send_queue_bound(job, ms, cap_mbps)
                # (re)bounded when the rate moved by more than a quarter
                stale = [fd for fd, ino in fds.items() if bound
                         and not 0.8 * bound <= bounded.get(ino, 0) <= 1.25 * bound]  # fmt: skip
                if stale:
                    set_notsent_lowat(pid, stale, bound)
                    bounded.update({fds[fd]: bound for fd in stale})
                    log.info("move %s: migration socket(s) queue at most %d KiB unsent",
                             job.id, bound >> 10)  # fmt: skip
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.ENOTSOCK):
                    scanned = 0.0  # QEMU closed a socket since the last look: look again
                    await asyncio.sleep(POLL_S)
                    continue
                if exc.errno != errno.ESRCH:  # not "QEMU is gone"
                    log.warning("move %s: cannot tune the migration sockets (%s); the "
                                "move's start and switchover may stall the guest longer",
                                job.id, exc)  # fmt: skip
                return
            # The first socket is looked for closely: QEMU starts its TLS handshake at once.
            await asyncio.sleep(0.002 if not quick and time.monotonic() - started < 1 else POLL_S)

    @staticmethod
    def _send_queue_bound(job: Job, ms: float, cap_mbps: int | None) -> int:
        """The send-queue bound in bytes once the first scan of memory nearly ended, else 0."""
        p = job.progress
        rate_mbps = p.mbps if p.mbps > 0 else float(cap_mbps or ASSUMED_LINK_MBPS)
        rate_bps = rate_mbps * 1e6 / 8
        if ms <= 0 or not bulk_copy_ending(
            p.passes, p.ram_total, p.ram_transferred, p.ram_remaining, rate_bps
        ):
            return 0
        return max(MIN_SEND_QUEUE, int(rate_bps * ms / 1000))

    async def _precopy_loop(
        self, job: Job, q: QmpSession, plan: IncomingPlan, peer: Peer, address: str,
        req: IncomingRequest, watch: _PeerWatch, started: float, events: EventWaiter,
    ) -> None:  # fmt: skip
        opts = job.options
        last_bytes, last_progress = -1, time.monotonic()
        forced = False
        while True:
            try:
                info = await q.execute("query-migrate")
            except QmpError as exc:
                if job.phase is not Phase.PRECOPY:
                    raise
                # QEMU's monitor can stall while its migration stream is blocked on a dead link
                raise MoveFailed(
                    f"no progress: the source QEMU stopped answering ({exc}) while it copied "
                    "memory; the migration link seems down",
                    "check the migration network between the hosts; the VM keeps running on "
                    "the source",
                ) from exc
            status = info.get("status", "none")
            self._record(job, info)
            moved = job.progress.ram_transferred + job.progress.disk_transferred
            if moved != last_bytes:
                last_bytes, last_progress = moved, time.monotonic()
            if job.first_pass_bytes is None and job.progress.passes >= 2:
                job.first_pass_bytes = int(info.get("ram", {}).get("normal-bytes", 0))
            if status == "completed":
                for _ in range(20):  # QEMU fills in the final figures a moment later
                    if info.get("downtime") is not None and info.get("total-time") is not None:
                        break
                    await asyncio.sleep(0.01)
                    info = await q.execute("query-migrate")
                job.qemu_stats = info
                job.qemu_downtime_ms = info.get("downtime")
                job.bytes_sent = int(info.get("ram", {}).get("transferred", 0))
                if job.phase is not Phase.SWITCHOVER:
                    self._enter(job, Phase.SWITCHOVER)
                return
            if status in ("failed", "cancelled"):
                raise MoveFailed(
                    f"QEMU reports the migration {status}: {info.get('error-desc', 'no detail')}",
                    "see the destination agent's log; the VM keeps running on the source",
                )
            if status == "pre-switchover":
                self._enter(job, Phase.SWITCHOVER)
                await self._finish_mirror(q, plan)
                await q.execute("migrate-continue", {"state": "pre-switchover"})
            elif status == "postcopy-active" and job.phase is not Phase.POSTCOPY:
                self._enter(job, Phase.POSTCOPY)
            elif status == "postcopy-paused":
                await self._recover_postcopy(job, q, peer, address)
                last_progress = time.monotonic()
            if job.phase is Phase.PRECOPY:
                self._check_cancel(job)
                watch.check(job.destination)
                if time.monotonic() - last_progress > opts.stall_timeout_s:
                    raise MoveFailed(
                        f"no progress for {opts.stall_timeout_s:.0f} s: the migration link "
                        "seems down",
                        "check the migration network between the hosts",
                    )
                elapsed = time.monotonic() - started
                if opts.timeout_s is not None and elapsed > opts.timeout_s and not forced:
                    if opts.on_timeout == "abort":
                        raise MoveFailed(
                            f"did not finish within --timeout {opts.timeout_s:.0f} s",
                            "use --on-timeout force, a higher --timeout, or --policy auto",
                        )
                    forced = True
                    await self._force(job, q, req.postcopy)
                else:
                    await self._converge(job, q, info, req.postcopy, opts.policy)
            await events.wait(POLL_S)

    def _record(self, job: Job, info: dict[str, Any]) -> None:
        ram = info.get("ram", {})
        p = job.progress
        p.ram_total = int(ram.get("total", p.ram_total))
        p.ram_transferred = int(ram.get("transferred", p.ram_transferred))
        p.ram_remaining = int(ram.get("remaining", p.ram_remaining))
        p.passes = int(ram.get("dirty-sync-count", p.passes))
        p.mbps = float(ram.get("mbps", p.mbps))
        page = int(ram.get("page-size", 4096))
        p.dirty_rate_bps = float(ram.get("dirty-pages-rate", 0)) * page
        throttle = info.get("cpu-throttle-percentage")
        p.throttle_pct = int(throttle) if throttle is not None else None
        p.expected_downtime_ms = info.get("expected-downtime", p.expected_downtime_ms)
        rate = p.mbps * 1e6 / 8
        p.eta_s = round(p.ram_remaining / rate, 1) if rate > 0 else None
        self._save(job, force=False)

    async def _converge(
        self, job: Job, q: QmpSession, info: dict[str, Any], postcopy: bool, policy: str
    ) -> None:
        """Follow the passes; tell QEMU what XBZRLE achieves; escalate to post-copy when
        pre-copy is predicted not to reach the downtime target."""
        watch = self._watch.get(job.id)
        if watch is None:
            return
        p = job.progress
        page = int(info.get("ram", {}).get("page-size", 4096))
        now = time.monotonic()
        judged = watch.verdict is not None
        if watch.observe(p.passes, p.ram_remaining, Counters.of(info), now, page):
            if not judged:
                job.escalations.append(watch.notes[-1])
            bps = watch.switchover_bps()
            if bps is not None:
                # QEMU plans the switchover from the bytes it put on the wire, which deltas
                # make look tiny: without this it would never switch over.
                await q.execute("migrate-set-parameters", {"avail-switchover-bandwidth": bps})
                log.info("move %s: pass %d, switchover bandwidth %d B/s", job.id, p.passes, bps)
        target = job.options.downtime_target_ms
        if 0 < watch.limit_ms < target and (p.passes > AIM_PASSES or watch.verdict):
            # aiming low pays for a guest that dirties little; one that keeps rewriting a
            # working set (XBZRLE pays on it) would only run more passes for it
            await q.execute("migrate-set-parameters", {"downtime-limit": target})
            why = ("XBZRLE pays: the guest keeps rewriting a working set" if watch.verdict
                   else "the rest stayed above the aim")  # fmt: skip
            job.escalations.append(
                f"downtime limit {watch.limit_ms} -> {target} ms at pass {p.passes}: {why}"
            )
            watch.limit_ms = target
        if not postcopy or job.postcopy_used:
            return
        if policy == "postcopy":
            due = p.passes >= 2
        else:
            needed = predict_passes(
                watch.pass_remaining or p.ram_remaining,
                p.dirty_rate_bps,
                watch.rate_for(p.mbps * 1e6 / 8),
                job.options.downtime_target_ms,
            )
            stuck = watch.stalled(job.options.downtime_target_ms, now)
            due = (
                p.passes >= 2 and p.mbps > 0 and not watch.undecided()
                and (needed > MAX_PRECOPY_PASSES or stuck)
            )  # fmt: skip
        if due:
            await q.execute("migrate-start-postcopy")
            job.postcopy_used = True
            job.escalations.append(
                f"post-copy after pass {p.passes} (dirty {p.dirty_rate_bps / 1e6:.0f} MB/s, "
                f"link {p.mbps:.0f} Mbit/s)"
            )

    async def _force(self, job: Job, q: QmpSession, postcopy: bool) -> None:
        if postcopy and not job.postcopy_used:
            await q.execute("migrate-start-postcopy")
            job.postcopy_used = True
            job.escalations.append("timeout: forced post-copy")
        else:
            await q.execute("migrate-set-parameters", {"downtime-limit": 60_000})
            job.escalations.append("timeout: forced switchover (downtime limit lifted)")

    async def _finish_mirror(self, q: QmpSession, plan: IncomingPlan) -> None:
        """At pre-switchover: complete the copies without pivoting, drop the NBD clients."""
        for disk in plan.mirrored:
            await q.execute("block-job-cancel", {"device": f"mirror-{disk}"})
        deadline = time.monotonic() + 60
        while True:
            left = [j["device"] for j in await q.execute("query-block-jobs")
                    if j["device"].startswith("mirror-")]  # fmt: skip
            if not left:
                break
            if time.monotonic() > deadline:
                raise MoveFailed("disk mirrors did not finish at switchover")
            await asyncio.sleep(0.005)
        for disk in plan.mirrored:
            await q.execute("blockdev-del", {"node-name": f"nbd-{disk}"})

    async def _rollback(
        self,
        job: Job,
        q: QmpSession,
        peer: Peer,
        was_paused: bool,
        prepared: bool,
        exc: BaseException,
    ) -> None:
        """Back to "VM running on the source, destination clean"."""
        failed_phase = job.phase
        self._enter(job, Phase.ROLLBACK)
        job.phase = failed_phase  # the error names the phase that failed
        with contextlib.suppress(QmpError):
            info = await q.execute("query-migrate")
            if info.get("status") in ("active", "setup", "pre-switchover", "device"):
                await q.execute("migrate_cancel")
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    st = (await q.execute("query-migrate")).get("status")
                    if st in ("cancelled", "failed", "completed", "none"):
                        break
                    await asyncio.sleep(0.05)
        await _drop_mirrors(q)
        with contextlib.suppress(QmpError):
            await disable_tls(q)  # a later save (migrate fd:) must not expect TLS
        with contextlib.suppress(QmpError):
            st = await q.status()
            # Never resume the source once post-copy started: the guest already ran on the
            # destination and the two copies of its memory differ.
            if (
                not job.postcopy_used
                and not was_paused
                and st in ("paused", "postmigrate", "finish-migrate")
            ):
                await q.execute("cont")
        if prepared and job.postcopy_used:
            # Past post-copy the destination holds part of the guest's memory: never
            # destroy it. The admin resolves it with both halves intact.
            log.error("move %s failed during post-copy; the destination keeps its half", job.id)
        elif prepared:
            try:
                await peer.abort(job.id)
            except FerryError as err:
                log.warning("move %s: destination cleanup failed, retrying: %s", job.id, err)
                dest = Destination(name=job.destination, url=job.destination_url)
                task = asyncio.ensure_future(self._abort_later(job.id, dest))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
        log.info("move %s rolled back (%s); %s stays on the source", job.id, exc, job.vm)

    async def complete(self, job_id: str) -> Job:
        """Finish a hand-over that failed after QEMU completed (``ferry migration complete``)."""
        job = self.get(job_id)
        if not job.handover_pending:
            raise ConflictError(
                f"move {job_id} has no unfinished hand-over (it is {job.state.value})",
                field="job_id",
                fix="ferry migration list shows the moves whose state is failed with a hand-over",
            )
        peer = self._peers(Destination(name=job.destination, url=job.destination_url))
        try:
            async with self.vms.lock(job.vm):
                started = self.vms.started_at(job.vm)
                quick = job.options.model_copy(update={"commit_retry_s": 5.0})
                try:
                    await self._commit(job.model_copy(update={"options": quick}), peer,
                                       job.was_paused, started)  # fmt: skip
                except MoveFailed as exc:
                    raise HostError(exc.message, fix=exc.fix) from exc
                self._enter(job, Phase.CLEANUP)
                await self.vms.release(job.vm, delete_files=job.mode == "shared-nothing")
        finally:
            await peer.close()
        job.handover_pending = False
        job.state = JobState.COMPLETED
        job.error = None
        job.escalations.append("hand-over completed by the admin")
        job.finished_at = time.time()
        self._save(job)
        log.info("move %s: hand-over of %s to %s completed", job.id, job.vm, job.destination)
        return job

    async def _abort_later(self, job_id: str, dest: Destination) -> None:
        """Keep asking a destination that was unreachable to remove its skeleton VM."""
        peer = self._peers(dest)
        deadline = time.monotonic() + ABORT_RETRY_S
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(2.0)
                try:
                    await peer.abort(job_id)
                except FerryError:
                    continue
                log.info("move %s: destination %s cleaned up", job_id, dest.name)
                return
            log.error("move %s: destination %s never answered; its skeleton VM may remain",
                      job_id, dest.name)  # fmt: skip
        finally:
            await peer.close()

    # -- agent restart -------------------------------------------------------------------------
    async def recover(self) -> None:
        """Settle jobs an earlier agent process left unfinished."""
        for job in list(self.jobs.values()):
            if job.handover_pending:
                with contextlib.suppress(FerryError):
                    self.vms.set_busy(job.vm, VMState.HANDOVER)  # never resume that copy
            if job.state.terminal:
                continue
            if job.kind == "storage":
                continue  # settled by migration.storage.StorageMoves.recover
            peer = self._peers(Destination(name=job.destination, url=job.destination_url))
            try:
                await self._recover_one(job, peer)
            except Exception as exc:  # record, never crash the agent
                log.exception("recovering move %s", job.id)
                job.state = JobState.FAILED
                job.error = JobError(phase=job.phase, message=f"recovery failed: {exc}")
            finally:
                await peer.close()
                job.finished_at = job.finished_at or time.time()
                self._save(job)

    async def _recover_one(self, job: Job, peer: Peer) -> None:
        try:
            qmp = self.vms.qmp_path(job.vm)
        except NotFoundError:
            job.state = JobState.FAILED
            job.error = JobError(phase=job.phase, message="the VM is no longer on this host")
            return
        proc = self.vms.process(job.vm)
        if proc is None or not proc.alive():
            job.state = JobState.FAILED
            job.error = JobError(phase=job.phase, message="the source QEMU is gone")
            with contextlib.suppress(FerryError):
                await peer.abort(job.id)
            return
        async with qmp_session(qmp) as q:
            mig = (await q.execute("query-migrate")).get("status")
            st = await q.status()
            if mig == "completed" and st == "postmigrate":
                self._enter(job, Phase.RESUME)
                await peer.commit(job.id, False, None)
                self._enter(job, Phase.CLEANUP)
                await self.vms.release(job.vm, delete_files=job.mode == "shared-nothing")
                job.state = JobState.COMPLETED
                return
            await self._rollback(job, q, peer, False, True, RuntimeError("agent restarted"))
            job.state = JobState.FAILED
            job.error = JobError(
                phase=job.phase,
                message="the source agent restarted during the move; the move was undone and "
                "the VM keeps running on the source",
                fix="start the move again",
            )


class _PeerWatch:
    """Asks the destination agent how it is, once a second, without holding up the poll loop."""

    def __init__(self, peer: Peer, job_id: str) -> None:
        self.peer, self.job_id = peer, job_id
        self.ok_at = time.monotonic()
        self.task: asyncio.Task[dict[str, Any]] | None = None
        self.next_at = 0.0

    def check(self, dest: str) -> None:
        """Raise MoveFailed when the destination is gone; start the next question when due."""
        now = time.monotonic()
        if self.task is not None and self.task.done():
            exc = self.task.exception()
            if exc is None:
                status = self.task.result()
                if not status.get("alive", True):
                    raise MoveFailed(
                        f"the destination QEMU on {dest} is gone",
                        "see the destination agent's log; the VM keeps running on the source",
                    )
                self.ok_at = now
            elif not isinstance(exc, FerryError):
                log.warning("move %s: destination status: %s", self.job_id, exc)
            self.task = None
        if now - self.ok_at > PEER_SILENT_S:
            raise MoveFailed(
                f"the destination agent on {dest} has not answered for {PEER_SILENT_S:.0f} s",
                f"check ferryd on {dest}; the VM keeps running on the source",
            )
        if self.task is None and now >= self.next_at:
            self.next_at = now + 1.0
            self.task = asyncio.ensure_future(self.peer.status(self.job_id))

    def close(self) -> None:
        """Stop asking."""
        if self.task is not None:
            self.task.cancel()
            self.task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _tls_hostname(job: Job) -> str | None:
    """The name the destination QEMU's certificate must carry: the host part of the
    destination agent's URL, which the agents' own mutual TLS already checks."""
    return urlsplit(job.destination_url).hostname


async def _drop_mirrors(q: QmpSession) -> None:
    """Cancel every move mirror job and delete every NBD client node (idempotent)."""
    with contextlib.suppress(QmpError):
        for j in await q.execute("query-block-jobs"):
            if j["device"].startswith("mirror-"):
                with contextlib.suppress(QmpError):
                    await q.execute("block-job-cancel", {"device": j["device"], "force": True})
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            jobs = await q.execute("query-block-jobs")
        except QmpError:
            break
        if not any(j["device"].startswith("mirror-") for j in jobs):
            break
        await asyncio.sleep(0.05)
    with contextlib.suppress(QmpError):
        for node in await q.execute("query-named-block-nodes", {"flat": True}):
            if str(node.get("node-name", "")).startswith("nbd-"):
                with contextlib.suppress(QmpError):
                    await q.execute("blockdev-del", {"node-name": node["node-name"]})


def job_json(job: Job) -> dict[str, Any]:
    """A job as plain JSON (for the API)."""
    data: dict[str, Any] = json.loads(job.model_dump_json())
    return data
