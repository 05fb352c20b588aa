"""Quick migration and VM import: hand a VM over through a shared volume.

``ferry move VM --to HOST --quick`` for a VM whose files are all on a volume both hosts see:

* **checks** — the source's own checks (migration enabled, the VM running, paused, off or
  saved) and the destination's (the incoming checks that apply, plus: every disk, the
  configuration and the saved-state folder are on storage the destination sees).
* **switchover** — a running or paused VM is saved to the shared volume (QEMU stops the guest,
  streams its memory and device state to ``saved.vmstate`` and quits); the source then marks
  the owner record released and forgets the VM. Its files stay.
* **resume** — the destination imports the VM from the volume (owner checks, QEMU's image
  locks) and restores it: the guest continues where it was, paused if it was paused. Off and
  saved VMs only change owner.
* **cleanup** — the state file is gone (a restore consumes it).

Until the destination owns the VM, any failure or a cancel rolls back: the source imports the
VM again if it had let it go and restores it. The job lives in the live-migration job store
(:class:`~vmferry.migration.engine.Moves`), so ``ferry migration list|show|cancel`` show it;
``downtime_ms`` is the guest's outage, from pausing it to it running on the destination.

``ferry vm import PATH`` registers a VM from a shared volume on any host; the same checks keep a
VM from running on two hosts (see :mod:`vmferry.host.owner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, cast

from pydantic import BaseModel, Field, field_validator

from vmferry import __version__
from vmferry.errors import ConflictError, FerryError, NotFoundError, RefusedError
from vmferry.host.host import cpu_info
from vmferry.host.owner import OwnerRecord, OwnerView, check_owner
from vmferry.host.settings import HostSettings
from vmferry.host.spec import CONFIG_FILE, VMSpec, state_file
from vmferry.host.storage import resolve_under_roots
from vmferry.host.vms import VMInfo, VMManager, VMState
from vmferry.migration.engine import MoveCancelled, MoveFailed, Moves
from vmferry.migration.incoming import IncomingMoves
from vmferry.migration.model import (
    CheckResult,
    Destination,
    IncomingRequest,
    Job,
    JobError,
    JobState,
    MoveOptions,
    MoveRequest,
    Phase,
    PhaseRecord,
)
from vmferry.qemu.qmp import QmpError, qmp_session
from vmferry.security.tickets import SignedTicket
from vmferry.validation import MAX_ITEMS, PathText, ShortText, check_agent_url

log = logging.getLogger("vmferry.migration")

QuickState = Literal["running", "paused", "off", "saved"]
MOVABLE = (VMState.RUNNING, VMState.PAUSED, VMState.OFF, VMState.SAVED)
LIVE = ("running", "paused")
#: Destination checks of a live move that also hold for a quick one.
INCOMING_CHECKS = ("migration-enabled", "agent-version", "name-free", "virtual-switches")
#: ... and those that matter only when a saved state is restored there.
STATE_CHECKS = ("cpu-vendor", "cpu-features")
OWNER_TIMEOUT_S = 10.0


class QuickRequest(BaseModel):
    """Source → destination: check (``/checks``) or take over (``/receive``) this VM."""

    job_id: str
    source: str
    source_version: str
    spec: VMSpec
    state: QuickState
    #: Restore the saved state paused; None: as the owner record says (set at the hand-over).
    paused: bool | None = None
    switch_map: dict[ShortText, ShortText] = Field(default_factory=dict, max_length=MAX_ITEMS)
    cpu_vendor: str
    cpu_flags: list[str]
    #: The user's move ticket, forwarded by the source (None: a cluster move or local start).
    ticket: SignedTicket | None = None


class ImportRequest(BaseModel):
    """``POST /v1/vms/import``: register the VM whose folder (or ``vm.json``) is at ``path``.

    ``peers`` (host name → agent URL, from the caller's client configuration) lets this agent
    ask the VM's owner whether it still has it.
    """

    path: PathText
    peers: dict[ShortText, str] = Field(default_factory=dict, max_length=MAX_ITEMS)

    @field_validator("peers")
    @classmethod
    def _peer_urls(cls, v: dict[str, str]) -> dict[str, str]:
        for url in v.values():
            check_agent_url(url)
        return v


class QuickPeer(Protocol):
    """Another agent, as quick moves and imports see it."""

    async def quick_checks(self, req: QuickRequest) -> list[CheckResult]: ...
    async def quick_receive(self, req: QuickRequest) -> dict[str, Any]: ...
    async def vm(self, name: str) -> dict[str, Any] | None: ...
    async def close(self) -> None: ...


QuickPeerFactory = Callable[[Destination], QuickPeer]


class QuickMoves:
    """Quick moves from this host, the destination side of them, and VM imports."""

    def __init__(self, moves: Moves, incoming: IncomingMoves, peers: QuickPeerFactory) -> None:
        self.moves = moves
        self.vms: VMManager = moves.vms
        self.incoming = incoming
        self._peers = peers

    def _settings(self) -> HostSettings:
        return self.moves._settings()

    # -- import (any host) -------------------------------------------------------------------
    async def import_vm(
        self,
        path: str,
        peers: dict[str, str] | None = None,
        url: str | None = None,
        *,
        expect_uuid: str | None = None,
        paused: bool | None = None,
        switch_map: dict[str, str] | None = None,
    ) -> VMInfo:
        """Register the VM at ``path`` here, unless it may be running elsewhere.

        Refused (nothing changes) for paths outside the storage roots, names or VMs already
        registered here, a VM its owner still has, and disks some QEMU holds open.
        """
        here = self._settings().name
        spec, owner = await asyncio.to_thread(self.vms.import_candidate, path)
        if expect_uuid is not None and spec.uuid != expect_uuid:
            raise ConflictError(
                f"{spec.storage_dir} holds VM {spec.name!r} with uuid {spec.uuid}, not the one "
                f"being moved ({expect_uuid})",
                field="path",
                fix="check the shared volume",
            )
        view = None
        if owner is not None and owner.host != here and not owner.released:
            view = await self._ask_owner(owner, spec, peers or {})
        note = check_owner(owner, here, spec.name, view)
        locked = await asyncio.to_thread(self.vms.disk_locks, spec)
        if locked:
            raise ConflictError(
                f"VM {spec.name!r} is open in a QEMU process (image locked): " + "; ".join(locked),
                field="path",
                fix="stop it where it runs, or hand it over: ferry move NAME --to HOST --quick",
            )
        if note:
            log.info("import of %s: %s", spec.name, note)
        return self.vms.register_import(spec, owner, paused=paused, url=url, switch_map=switch_map)

    async def _ask_owner(
        self, owner: OwnerRecord, spec: VMSpec, peers: dict[str, str]
    ) -> OwnerView:
        """What the owning host's agent says about the VM (unreachable when it cannot say)."""
        url = peers.get(owner.host) or owner.url
        if not url:
            return OwnerView(reachable=False)
        peer = self._peers(Destination(name=owner.host, url=url))
        try:
            vm = await asyncio.wait_for(peer.vm(spec.name), OWNER_TIMEOUT_S)
        except (FerryError, TimeoutError) as exc:
            log.info("owner %s of %s did not answer: %s", owner.host, spec.name, exc)
            return OwnerView(reachable=False)
        finally:
            await peer.close()
        if vm is None or vm.get("uuid") != spec.uuid:
            return OwnerView(reachable=True, state=None)
        return OwnerView(reachable=True, state=str(vm.get("state")))

    # -- destination side --------------------------------------------------------------------
    def _shared_checks(self, req: QuickRequest) -> list[CheckResult]:
        """Every file of the VM must be on storage this host sees (the same files)."""
        s = self._settings()
        spec = req.spec
        sdir = Path(spec.storage_dir)
        res: list[CheckResult] = []
        fix = (
            f"put the VM's files on a volume both hosts see (under a storage root of {s.name}: "
            f"{', '.join(s.storage_roots) or 'none'}), or move it live without --quick"
        )

        def visible(path: Path, is_dir: bool = False) -> bool:
            try:
                resolve_under_roots(str(path), s.storage_roots, "path")
            except FerryError:
                return False
            return path.is_dir() if is_dir else path.is_file()

        same = False
        if visible(sdir / CONFIG_FILE):
            with contextlib.suppress(OSError, ValueError):
                same = (
                    VMSpec.model_validate_json((sdir / CONFIG_FILE).read_text()).uuid == spec.uuid
                )
        res.append(CheckResult(
            name="shared-config", ok=same,
            message=f"{s.name} sees the VM's configuration in {sdir}" if same
            else f"configuration {sdir / CONFIG_FILE} is not on storage {s.name} sees as shared",
            fix=None if same else fix,
        ))  # fmt: skip
        for d in spec.disks:
            path = sdir / d.file
            ok = visible(path)
            res.append(CheckResult(
                name=f"shared-disk:{d.name}", ok=ok,
                message=f"{s.name} sees disk {d.name} at {path}" if ok
                else f"disk {d.name} ({path}) is not on storage {s.name} sees as shared",
                fix=None if ok else fix,
            ))  # fmt: skip
        if req.state in LIVE or req.state == "saved":
            where = state_file(spec).parent
            ok = visible(where, is_dir=True)
            res.append(CheckResult(
                name="shared-state", ok=ok,
                message=f"the saved state goes to {where}, which {s.name} sees" if ok
                else f"the saved state would go to {where}, which {s.name} does not see",
                fix=None if ok else "ferry move-storage VM --state-to DIR on a shared volume",
            ))  # fmt: skip
        return res

    def checks(self, req: QuickRequest) -> list[CheckResult]:
        """The destination's checks for a quick move (reusing the live-move checks that apply)."""
        incoming_req = IncomingRequest(
            job_id=req.job_id, source=req.source, source_version=req.source_version,
            spec=req.spec, options=MoveOptions(vm_only=True, switch_map=req.switch_map),
            transport="tcp", streams=1, postcopy=False, cpu_vendor=req.cpu_vendor,
            cpu_flags=req.cpu_flags, dry_run=True,
        )  # fmt: skip
        wanted: tuple[str, ...] = INCOMING_CHECKS
        if req.state != "off":
            wanted += STATE_CHECKS
        if req.state in LIVE:
            wanted += ("memory",)
        results, _ = self.incoming.checks(incoming_req)
        res = [r for r in results if r.name in wanted]
        for r in res:
            if r.name == "cpu-vendor" and not r.ok:
                r.fix = "a saved state restores only on the same CPU vendor; shut the VM down first"
        return res + self._shared_checks(req)

    async def receive(self, req: QuickRequest, url: str | None) -> dict[str, Any]:
        """Take the VM over: check, import it from the volume, restore a saved running VM."""
        failed = [c for c in await asyncio.to_thread(self.checks, req) if not c.ok]
        if failed:
            raise RefusedError("; ".join(c.message for c in failed), field="destination",
                               fix=failed[0].fix)  # fmt: skip
        name = req.spec.name
        t0 = time.monotonic()
        info = await self.import_vm(
            req.spec.storage_dir, {}, url, expect_uuid=req.spec.uuid, paused=req.paused,
            switch_map=req.switch_map,
        )  # fmt: skip
        timings = {"import_s": round(time.monotonic() - t0, 3)}
        if req.state in LIVE:
            t1 = time.monotonic()
            try:
                info = await self.vms.restore(name)
            except FerryError:
                with contextlib.suppress(FerryError):
                    self.vms.unregister_import(name)
                raise
            timings["restore_s"] = round(time.monotonic() - t1, 3)
            # Switches learn the guest's new port (its MAC now comes in through this host).
            with contextlib.suppress(QmpError, FerryError):
                async with qmp_session(self.vms.qmp_path(name), timeout=5) as q:
                    await q.execute(
                        "announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 50}
                    )
        log.info("took VM %s over from %s (quick move %s)", name, req.source, req.job_id)
        return {"vm": info.model_dump(mode="json"), **timings}

    # -- source side -------------------------------------------------------------------------
    def _local_checks(self, state: VMState, dest: str) -> list[CheckResult]:
        s = self._settings()
        movable = state in MOVABLE
        return [
            CheckResult(
                name="source-migration-enabled", ok=s.migration.enabled,
                message="migration is enabled on the source" if s.migration.enabled
                else f"migration is disabled on {s.name}",
                fix=None if s.migration.enabled else "ferry host set --migration-enabled",
            ),
            CheckResult(
                name="vm-state", ok=movable, message=f"VM is {state.value}",
                fix=None if movable else "a quick move takes a running, paused, off or saved "
                "VM; stop a crashed VM first (ferry vm stop NAME)",
            ),
            CheckResult(
                name="destination", ok=dest != s.name, message=f"from {s.name} to {dest}",
                fix=None if dest != s.name else "pick another host",
            ),
        ]  # fmt: skip

    @staticmethod
    def _refuse_options(opts: MoveOptions) -> None:
        for field, value in (("storage_path", opts.storage_path), ("disk_map", opts.disk_map)):
            if value:
                raise RefusedError(
                    f"{field}: a quick move leaves the VM's files where they are (on the shared "
                    "volume)",
                    field=field,
                    fix="leave it out, or move the VM live (without --quick) to copy its files",
                )

    def _request(self, job: Job, spec: VMSpec, state: VMState) -> QuickRequest:
        cpu = cpu_info()
        return QuickRequest(
            job_id=job.id, source=self._settings().name, source_version=__version__, spec=spec,
            state=cast(QuickState, state.value if state in MOVABLE else "off"),
            switch_map=job.options.switch_map, cpu_vendor=cpu["vendor"], cpu_flags=cpu["flags"],
            ticket=job.ticket,
        )  # fmt: skip

    def _new_job(self, name: str, req: MoveRequest) -> Job:
        return Job(kind="quick", vm=name, source=self._settings().name,
                   destination=req.destination.name, destination_url=req.destination.url,
                   options=req.options, mode="shared", ticket=req.ticket)  # fmt: skip

    async def what_if(self, name: str, req: MoveRequest) -> dict[str, Any]:
        """Every check of a quick move and what it would do; changes nothing."""
        spec = self.vms.spec(name)
        self._refuse_options(req.options)
        state = self.vms.state(name)
        job = self._new_job(name, req)
        checks = self._local_checks(state, req.destination.name)
        peer = self._peers(req.destination)
        try:
            checks += await peer.quick_checks(self._request(job, spec, state))
        finally:
            await peer.close()
        live = state in (VMState.RUNNING, VMState.PAUSED)
        return {
            "vm": name, "source": job.source, "destination": req.destination.name,
            "ok": all(c.ok for c in checks), "checks": [c.model_dump() for c in checks],
            "mode": "quick", "state": state.value, "storage_dir": spec.storage_dir,
            "disks": {d.name: str(Path(spec.storage_dir) / d.file) for d in spec.disks},
            "bytes_to_move": spec.memory_mib * 2**20 if live else 0,
            "note": "the guest is paused while its memory is written to the shared volume and "
            "read back on the destination" if state is VMState.RUNNING
            else "no guest outage: the VM is not running",
        }  # fmt: skip

    async def submit(self, name: str, req: MoveRequest) -> Job:
        """Queue a quick move of VM ``name`` (refused at once when a check fails here)."""
        m = self.moves
        self.vms.spec(name)
        for j in m.jobs.values():
            if j.vm == name and not j.state.terminal:
                raise ConflictError(
                    f"VM {name!r} is already being moved (migration {j.id})",
                    field="name", fix=f"watch it: ferry migration show {j.id}",
                )  # fmt: skip
        self._refuse_options(req.options)
        failing = [c for c in self._local_checks(self.vms.state(name), req.destination.name)
                   if not c.ok]  # fmt: skip
        if failing:
            raise RefusedError(failing[0].message, field="vm", fix=failing[0].fix)
        job = self._new_job(name, req)
        job.phases.append(PhaseRecord(phase=Phase.QUEUED, started_at=time.time()))
        m.jobs[job.id] = job
        m._save(job)
        m._tasks[job.id] = asyncio.get_running_loop().create_task(self._run(job, req.destination))
        return job

    async def _run(self, job: Job, dest: Destination) -> None:
        m, vms, name = self.moves, self.vms, job.vm
        t0 = time.monotonic()
        peer = self._peers(dest)
        saved = released = False
        try:
            await m._queue(job)
            job.state = JobState.RUNNING
            m._enter(job, Phase.CHECKS)
            spec = vms.spec(name)
            state = vms.state(name)
            job.vm_state, job.storage_dir = state.value, spec.storage_dir
            job.checks = self._local_checks(state, dest.name)
            job.checks += await peer.quick_checks(self._request(job, spec, state))
            failed = [c for c in job.checks if not c.ok]
            if failed:
                raise MoveFailed("; ".join(c.message for c in failed), failed[0].fix)
            m._check_cancel(job)
            m._enter(job, Phase.SWITCHOVER)
            paused_at = time.monotonic()
            if state in (VMState.RUNNING, VMState.PAUSED):
                try:
                    await vms.save(name)
                except FerryError as exc:
                    raise MoveFailed(
                        f"saving the VM failed: {exc.message}",
                        "the VM stays on the source; start the move again",
                    ) from exc
                saved = True
                size = state_file(spec).stat().st_size
                job.bytes_sent = job.progress.ram_total = job.progress.ram_transferred = size
                m._save(job)
            m._check_cancel(job)
            async with vms.lock(name):  # after any admin operation queued during the save
                now = vms.state(name)
                if now is not (VMState.SAVED if saved else state):
                    raise MoveFailed(f"VM {name!r} became {now.value} during the move",
                                     "start the move again")  # fmt: skip
                vms.set_busy(name, VMState.MIGRATING)
                await vms.hand_over(name)
                released = True
            m._enter(job, Phase.RESUME)
            result = await peer.quick_receive(self._request(job, spec, state))
            if state is VMState.RUNNING:
                job.downtime_ms = round((time.monotonic() - paused_at) * 1000)
            job.progress.ram_remaining = 0
            m._enter(job, Phase.CLEANUP)
            self._cleanup(spec, state, str(result.get("vm", {}).get("state")))
            job.state = JobState.COMPLETED
            log.info("quick move %s: %s now on %s (outage %s ms)", job.id, name, dest.name,
                     job.downtime_ms)  # fmt: skip
        except BaseException as exc:
            kept_by_dest = await self._rollback(job, peer, dest, saved, released, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._fail(job, exc, kept_by_dest)
        finally:
            m.slots.release(job.id)
            m._cancel.discard(job.id)
            with contextlib.suppress(FerryError):
                vms.set_busy(name, None)
            now_wall = time.time()  # before any await: readers see a finished job complete
            if job.phases and job.phases[-1].ended_at is None:
                job.phases[-1].ended_at = now_wall
            job.finished_at = now_wall
            job.total_s = round(time.monotonic() - t0, 3)
            job.queue_position = None
            m._save(job)
            m._tasks.pop(job.id, None)
            await peer.close()

    @staticmethod
    def _cleanup(spec: VMSpec, state: VMState, dest_state: str) -> None:
        """A restore consumes the state file; remove what a failed unlink may have left."""
        if state in (VMState.RUNNING, VMState.PAUSED) and dest_state in LIVE:
            saved = state_file(spec)
            saved.unlink(missing_ok=True)
            saved.with_suffix(".tmp").unlink(missing_ok=True)

    def _fail(self, job: Job, exc: BaseException, kept_by_dest: str | None) -> None:
        if kept_by_dest is not None:
            job.state = JobState.COMPLETED
            job.escalations.append(
                f"the destination answered late but owns the VM ({kept_by_dest})"
            )
            return
        job.state = JobState.FAILED
        if isinstance(exc, MoveCancelled):
            job.state = JobState.CANCELLED
            error = JobError(phase=job.phase, message="cancelled by the admin; the VM stays on "
                             "the source")  # fmt: skip
        elif isinstance(exc, MoveFailed | FerryError):
            error = JobError(phase=job.phase, message=exc.message, fix=exc.fix)
        else:
            log.error("quick move %s failed", job.id, exc_info=exc)
            error = JobError(phase=job.phase, message=f"{exc.__class__.__name__}: {exc}")
        if job.escalations and job.escalations[-1].startswith("rollback failed"):
            error.message += f"; {job.escalations[-1]}"
            error.fix = (
                f"the VM's files (and saved state) are in {job.storage_dir}: register it on a "
                f"host with: ferry vm import {job.storage_dir}"
            )
        job.error = error

    async def _rollback(
        self,
        job: Job,
        peer: QuickPeer,
        dest: Destination,
        saved: bool,
        released: bool,
        exc: BaseException,
    ) -> str | None:
        """Back to "VM on the source as it was". Returns the VM's state on the destination
        instead when the destination turns out to own it (its answer was lost)."""
        if job.phase is Phase.QUEUED or (job.phase is Phase.CHECKS and not saved):
            return None
        failed_phase = job.phase
        self.moves._enter(job, Phase.ROLLBACK)
        job.phase = failed_phase
        name = job.vm
        try:
            if released:
                there = await self._state_on(peer, name)
                if there is not None:
                    return there
                await self.import_vm(str(job.storage_dir), {dest.name: dest.url})
            else:
                self.vms.set_busy(name, None)
            if saved:
                await self.vms.restore(name)
        except Exception as err:  # record it; the job's error tells the admin what to do
            log.error("quick move %s: rollback failed: %s", job.id, err)
            job.escalations.append(f"rollback failed: {err}")
            return None
        log.info("quick move %s rolled back (%s); %s stays on the source", job.id, exc, name)
        return None

    async def _state_on(self, peer: QuickPeer, name: str) -> str | None:
        """The VM's state on the destination, None when it is not there (or cannot say)."""
        try:
            vm = await asyncio.wait_for(peer.vm(name), OWNER_TIMEOUT_S)
        except (FerryError, TimeoutError):
            return None
        if vm is None or vm.get("state") in (None, "incoming"):
            return None
        return str(vm["state"])

    # -- agent restart -----------------------------------------------------------------------
    async def recover(self) -> None:
        """Settle quick moves an earlier agent process left unfinished."""
        for job in list(self.moves.jobs.values()):
            if job.kind != "quick" or job.state.terminal:
                continue
            peer = self._peers(Destination(name=job.destination, url=job.destination_url))
            try:
                await self._recover_one(job, peer)
            except Exception as exc:  # record, never crash the agent
                log.exception("recovering quick move %s", job.id)
                job.state = JobState.FAILED
                job.error = JobError(
                    phase=job.phase,
                    message=f"recovery failed: {exc}",
                    fix=f"ferry vm import {job.storage_dir} on one host",
                )
            finally:
                await peer.close()
                job.finished_at = job.finished_at or time.time()
                self.moves._save(job)

    async def _recover_one(self, job: Job, peer: QuickPeer) -> None:
        name = job.vm
        msg = "the source agent restarted during the quick move"
        try:
            state: VMState | None = self.vms.state(name)
        except NotFoundError:
            state = None
        if state is None and job.phase not in (Phase.QUEUED, Phase.CHECKS):
            there = await self._state_on(peer, name)
            if there is not None:
                job.state = JobState.COMPLETED
                job.escalations.append(f"finished while the agent restarted ({there} there)")
                return
            if job.storage_dir:
                await self.import_vm(job.storage_dir, {job.destination: job.destination_url})
                state = self.vms.state(name)
        if state is VMState.SAVED and job.vm_state in LIVE:
            await self.vms.restore(name)
        elif state in (VMState.RUNNING, VMState.PAUSED) and job.vm_state == "running":
            # The save was cut short: QEMU may have stopped the guest; let it run again.
            with contextlib.suppress(QmpError):
                async with qmp_session(self.vms.qmp_path(name), timeout=5) as q:
                    if await q.status() in ("paused", "postmigrate", "finish-migrate"):
                        await q.execute("cont")
        job.state = JobState.FAILED
        job.error = JobError(phase=job.phase, message=f"{msg}; it was undone and the VM stays on "
                             "the source", fix="start the move again")  # fmt: skip
