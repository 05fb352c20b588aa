"""Storage moves (``ferry move-storage``): a VM's files to new places on the same host.

A running or paused VM keeps running: each moving disk gets a new file (``qemu-img create``, same
format and size) opened as a new block node; QEMU mirrors the disk's current node into it
(``blockdev-mirror``, write-blocking, the same recipe live migration uses towards NBD) while the
guest reads and writes; once every mirror is in sync each device is pivoted to its new node
(``job-complete``), the job checks that QEMU's block graph uses only the new files, writes the
VM's configuration with the new paths and deletes the old files. A VM that is off or saved is
copied (``qemu-img convert``), verified (``qemu-img compare``; byte comparison for the saved
state), switched and the old files deleted.

The job is a :class:`~vmferry.migration.model.Job` of kind ``storage`` kept in the live moves'
store (:class:`~vmferry.migration.engine.Moves`), so ``ferry migration list|show|cancel`` work
for it. Phases: queued → checks → setup → mirror (copy) → switchover (pivot) → cleanup; any
failure or a cancel before the pivot rolls back: the VM stays on its old files and every file
and folder the job made is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import filecmp
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from vmferry.errors import (
    ConflictError,
    FerryError,
    InsufficientResourcesError,
    RefusedError,
)
from vmferry.host.spec import CONFIG_FILE, DiskSpec, VMSpec, state_file
from vmferry.host.storage import resolve_under_roots
from vmferry.host.vms import VMState
from vmferry.migration.engine import MoveCancelled, MoveFailed, Moves
from vmferry.migration.model import (
    FileMove,
    Job,
    JobError,
    JobState,
    MoveOptions,
    Phase,
    PhaseRecord,
    StorageMoveRequest,
    StoragePlan,
)
from vmferry.migration.qemu_ops import disk_device, disk_node, mirror_until_ready
from vmferry.migration.slots import Slots
from vmferry.qemu.qmp import QmpError, QmpSession, qmp_session

log = logging.getLogger("vmferry.migration.storage")

#: Block-job ids of storage mirrors (live migration's are ``mirror-<disk>``).
JOB_PREFIX = "store-"
LIVE_STATES = (VMState.RUNNING, VMState.PAUSED)
OFFLINE_STATES = (VMState.OFF, VMState.SAVED)


# -- the plan (pure: validates, touches nothing) ----------------------------------------------
def _field_for(kind: str, req: StorageMoveRequest, disk: str | None) -> str:
    if kind == "disk" and disk in req.disk_map:
        return f"disk_map.{disk}"
    if kind == "config" and req.config_to:
        return "config_to"
    if kind == "state" and req.state_to:
        return "state_to"
    return "to"


def plan_move(
    spec: VMSpec, req: StorageMoveRequest, roots: list[str], *, live: bool, state_exists: bool
) -> StoragePlan:
    """Where every file of ``spec`` goes; refuses bad requests naming the field and the fix."""
    if not (req.to or req.disk_map or req.config_to or req.state_to):
        raise RefusedError(
            "nothing to move: no destination given", field="to",
            fix="give --to DIR, or --disk-map DISK=PATH, --config-to DIR, --state-to DIR",
        )  # fmt: skip
    names = [d.name for d in spec.disks]
    for disk in req.disk_map:
        if disk not in names:
            raise RefusedError(
                f"VM {spec.name!r} has no disk named {disk!r}", field=f"disk_map.{disk}",
                fix="its disks: " + (", ".join(names) or "none"),
            )  # fmt: skip
    to = resolve_under_roots(req.to, roots, "to") if req.to else None
    old_dir = Path(spec.storage_dir)
    new_dir = resolve_under_roots(req.config_to, roots, "config_to") if req.config_to else None
    new_dir = new_dir or to or old_dir
    files: list[FileMove] = []
    for d in spec.disks:
        src = Path(os.path.normpath(old_dir / d.file))
        if d.name in req.disk_map:
            value = req.disk_map[d.name]
            dst = resolve_under_roots(value, roots, f"disk_map.{d.name}")
            if value.endswith("/") or dst.is_dir():
                dst = dst / src.name
        elif to is not None:
            dst = to / src.name
        else:
            continue
        if dst != src:
            files.append(FileMove(kind="disk", src=str(src), dst=str(dst), disk=d.name,
                                  fmt=d.fmt, size_bytes=d.size_mib * 2**20))  # fmt: skip
    if new_dir != old_dir:
        files.append(FileMove(kind="config", src=str(old_dir / CONFIG_FILE),
                              dst=str(new_dir / CONFIG_FILE)))  # fmt: skip
    old_state = Path(spec.state_dir) if spec.state_dir else old_dir
    if req.state_to:
        new_state = resolve_under_roots(req.state_to, roots, "state_to")
    else:
        # Without a folder of its own the saved state follows the configuration.
        new_state = to or (old_state if spec.state_dir else new_dir)
    src_state = state_file(spec)
    # A running VM has no saved state (a restore consumes it): only the folder setting moves.
    if state_exists and not live and new_state != old_state:
        files.append(FileMove(kind="state", src=str(src_state), dst=str(new_state / src_state.name),
                              size_bytes=src_state.stat().st_size))  # fmt: skip
    new_state_dir = None if new_state == new_dir else str(new_state)
    seen: dict[str, str] = {}
    for f in files:
        fld = _field_for(f.kind, req, f.disk)
        dst = Path(f.dst)
        if f.dst in seen:
            raise RefusedError(
                f"{fld}: {f.dst} is also the target of {seen[f.dst]}", field=fld,
                fix="give every file its own target",
            )  # fmt: skip
        seen[f.dst] = f.disk or f.kind
        if dst.exists() or dst.is_symlink():
            raise ConflictError(
                f"{fld}: {dst} already exists", field=fld,
                fix="pick another path, or remove that file first",
            )  # fmt: skip
        parent = next((p for p in (dst.parent, *dst.parent.parents) if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise RefusedError(f"{fld}: {parent} is not a directory", field=fld,
                               fix="give a directory (or a file path inside one)")  # fmt: skip
    if not files and new_state_dir == spec.state_dir:
        raise RefusedError(
            "nothing to move: every file already is where asked", field="to",
            fix="give a folder or path that differs from the current one",
        )  # fmt: skip
    return StoragePlan(live=live, storage_dir=str(old_dir), new_storage_dir=str(new_dir),
                       new_state_dir=new_state_dir, files=files)  # fmt: skip


def check_space(plan: StoragePlan) -> None:
    """Refuse when a target filesystem lacks room for the data that goes there."""
    need: dict[Path, int] = {}
    for f in plan.files:
        if f.kind == "config":
            continue
        dst = Path(f.dst)
        anchor = next(p for p in (dst.parent, *dst.parent.parents) if p.exists())
        st = os.stat(f.src) if os.path.exists(f.src) else None
        used = st.st_blocks * 512 if st is not None else f.size_bytes
        need[anchor] = need.get(anchor, 0) + used
    for anchor, nbytes in need.items():
        free = shutil.disk_usage(anchor).free
        if nbytes > free:
            raise InsufficientResourcesError(
                f"{anchor} has {free // 2**20} MiB free; the files that go there use "
                f"{nbytes // 2**20} MiB", field="to",
                fix="free space there or pick another storage root",
            )  # fmt: skip


def moved_spec(spec: VMSpec, plan: StoragePlan, moved_disks: set[str]) -> VMSpec:
    """``spec`` with the new folders and the paths of the disks in ``moved_disks``."""
    new_dir = Path(plan.new_storage_dir)
    targets = {f.disk: f.dst for f in plan.disks if f.disk in moved_disks}
    old_dir = Path(spec.storage_dir)
    disks = []
    for d in spec.disks:
        path = targets.get(d.name) or os.path.normpath(old_dir / d.file)
        disks.append(DiskSpec(name=d.name, file=os.path.relpath(path, new_dir),
                              size_mib=d.size_mib, fmt=d.fmt))  # fmt: skip
    return spec.model_copy(update={"storage_dir": str(new_dir), "disks": disks,
                                   "state_dir": plan.new_state_dir})  # fmt: skip


def _dst(files: list[FileMove], disk: str) -> str:
    return next(f.dst for f in files if f.disk == disk)


def node_name(disk: str, job_id: str, index: int) -> str:
    """The block node of a disk's new file (QEMU node names are at most 31 characters)."""
    name = f"drv-{disk}-{job_id[:6]}"
    return name if len(name) + 2 <= 31 else f"drv-{job_id[:8]}-{index}"


# -- QEMU and qemu-img helpers ----------------------------------------------------------------
async def _qemu_img(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace").strip()


async def image_info(path: str) -> dict[str, Any]:
    """``qemu-img info`` of an image (shared: a running QEMU holds a lock on it)."""
    rc, out = await _qemu_img("info", "-U", "--output=json", path)
    if rc != 0:
        raise MoveFailed(f"cannot read {path}: {out}", "check that the file is a disk image")
    info: dict[str, Any] = json.loads(out)
    return info


async def _jobs(q: QmpSession) -> dict[str, dict[str, Any]]:
    return {j["device"]: j for j in await q.execute("query-block-jobs")}


async def _settle_jobs(q: QmpSession, ids: list[str], timeout: float = 30) -> None:
    """Cancel (force) and dismiss the given block jobs; idempotent."""
    for jid in ids:
        with contextlib.suppress(QmpError):
            await q.execute("block-job-cancel", {"device": jid, "force": True})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            jobs = await _jobs(q)
        except QmpError:
            return
        left = [j for j in ids if j in jobs]
        for jid in left:
            if jobs[jid].get("status") == "concluded":
                with contextlib.suppress(QmpError):
                    await q.execute("job-dismiss", {"id": jid})
        if not left:
            return
        await asyncio.sleep(0.05)


async def _files_in_use(q: QmpSession) -> set[str]:
    return {
        os.path.normpath(str(n["file"]))
        for n in await q.execute("query-named-block-nodes", {"flat": True})
        if n.get("drv") == "file" and n.get("file")
    }


async def _device_files(q: QmpSession) -> dict[str, tuple[str, str]]:
    """qdev path -> (block node, image file) its device uses now."""
    return {
        str(e.get("qdev", "")): (
            str(e["inserted"].get("node-name", "")),
            os.path.normpath(str(e["inserted"].get("file", ""))),
        )
        for e in await q.execute("query-block")
        if e.get("inserted")
    }


def _uses(devices: dict[str, tuple[str, str]], disk: str, node: str, path: str) -> bool:
    """Does the disk's device use the new node (or the new file)?"""
    dev = f"/{disk_device(disk)}/"
    return any(
        dev in f"{qdev}/" and (n == node or f == os.path.normpath(path))
        for qdev, (n, f) in devices.items()
    )


# -- the job ----------------------------------------------------------------------------------
class StorageMoves:
    """Storage moves of this host; jobs live in the live moves' store."""

    def __init__(self, moves: Moves, slots: Slots) -> None:
        self.moves = moves
        self.vms = moves.vms
        self.slots = slots
        self._requests: dict[str, StorageMoveRequest] = {}

    def _roots(self) -> list[str]:
        return self.moves._settings().storage_roots

    def _mode(self, name: str) -> bool:
        """True for a live move (running/paused VM); refuses other states."""
        state = self.vms.state(name)
        if state in LIVE_STATES:
            return True
        if state in OFFLINE_STATES:
            return False
        fix = {
            VMState.MIGRATING: "wait for its move, or cancel it: ferry migration cancel ID",
            VMState.CRASHED: f"stop it first: ferry vm stop {name}",
        }.get(state, "wait until it is running, paused, off or saved")
        raise ConflictError(f"VM {name!r} is {state.value}", field="name", fix=fix)

    def plan(self, name: str, req: StorageMoveRequest) -> StoragePlan:
        """Check a request and return its plan; changes nothing."""
        self.vms.spec(name)
        for j in self.moves.jobs.values():
            if j.vm == name and not j.state.terminal:
                raise ConflictError(
                    f"VM {name!r} is already being moved (migration {j.id})", field="name",
                    fix=f"wait for it or cancel it: ferry migration cancel {j.id}",
                )  # fmt: skip
        live = self._mode(name)
        spec = self.vms.spec(name)
        plan = plan_move(spec, req, self._roots(), live=live,
                         state_exists=state_file(spec).exists())  # fmt: skip
        check_space(plan)
        return plan

    async def submit(self, name: str, req: StorageMoveRequest) -> Job:
        """Queue a storage move of VM ``name``."""
        plan = self.plan(name, req)
        host = self.moves._settings().name
        job = Job(kind="storage", vm=name, source=host, destination=host, destination_url="",
                  options=MoveOptions(bandwidth_mbps=req.bandwidth_mbps),
                  mode="live" if plan.live else "offline", storage=plan)  # fmt: skip
        job.progress.disk_total = sum(f.size_bytes for f in plan.files)
        job.phases.append(PhaseRecord(phase=Phase.QUEUED, started_at=time.time()))
        self.moves.jobs[job.id] = job
        self._requests[job.id] = req
        self.moves._save(job)
        self.moves._tasks[job.id] = asyncio.get_running_loop().create_task(self._run(job))
        return job

    async def _queue(self, job: Job) -> None:
        waiter = asyncio.ensure_future(self.slots.acquire(job.id))
        try:
            while not waiter.done():
                job.queue_position = self.slots.position(job.id)
                self.moves._check_cancel(job)
                await asyncio.wait({waiter}, timeout=0.2)
            waiter.result()
        except BaseException:
            waiter.cancel()
            raise
        job.queue_position = None

    async def _run(self, job: Job) -> None:
        t0 = time.monotonic()
        name = job.vm
        made: list[Path] = []  # files and folders this job created, undone on rollback
        try:
            await self._queue(job)
            async with self.vms.lock(name):
                self.moves._enter(job, Phase.CHECKS)
                live = self._mode(name)
                spec = self.vms.spec(name)
                job.state = JobState.RUNNING
                self.vms.set_busy(name, VMState.MIGRATING)
                # The VM may have changed while the job waited: plan again.
                plan = plan_move(spec, self._requests.pop(job.id), self._roots(), live=live,
                                 state_exists=state_file(spec).exists())  # fmt: skip
                check_space(plan)
                job.storage, job.mode = plan, "live" if live else "offline"
                job.progress.disk_total = sum(f.size_bytes for f in plan.files)
                if live:
                    await self._live(job, spec, plan, made)
                else:
                    await self._offline(job, spec, plan, made)
                job.state = JobState.COMPLETED
                log.info("storage move %s: %s now uses %s", job.id, name, plan.new_storage_dir)
        except MoveCancelled:
            job.state = JobState.CANCELLED
            job.error = JobError(phase=job.phase, message="cancelled by the admin; the VM "
                                 "keeps its files where they were")  # fmt: skip
        except MoveFailed as exc:
            job.state = JobState.FAILED
            job.error = JobError(phase=job.phase, message=exc.message, fix=exc.fix)
        except FerryError as exc:
            job.state = JobState.FAILED
            job.error = JobError(phase=job.phase, message=exc.message, fix=exc.fix)
        except Exception as exc:
            log.exception("storage move %s failed", job.id)
            job.state = JobState.FAILED
            job.error = JobError(phase=job.phase, message=f"{exc.__class__.__name__}: {exc}")
        finally:
            self._requests.pop(job.id, None)
            self.slots.release(job.id)
            self.moves._cancel.discard(job.id)
            with contextlib.suppress(FerryError):
                self.vms.set_busy(name, None)
            now = time.time()
            if job.phases and job.phases[-1].ended_at is None:
                job.phases[-1].ended_at = now
            job.finished_at = now
            job.total_s = round(time.monotonic() - t0, 3)
            job.queue_position = None
            self.moves._save(job)
            self.moves._tasks.pop(job.id, None)

    def _rollback_phase(self, job: Job) -> None:
        failed = job.phase
        self.moves._enter(job, Phase.ROLLBACK)
        job.phase = failed  # the error names the phase that failed

    def _progress(self, job: Job) -> Any:
        last = [time.monotonic(), 0]

        def update(done: int, total: int) -> None:
            now = time.monotonic()
            p = job.progress
            # A mirror knows what it must copy (its len); a file copy reports no total.
            p.disk_transferred, p.disk_total = done, total or p.disk_total
            if now - last[0] >= 0.5:
                p.mbps = round((done - int(last[1])) * 8 / 1e6 / (now - last[0]), 1)
                last[0], last[1] = now, done
                rate = p.mbps * 1e6 / 8
                p.eta_s = round((p.disk_total - done) / rate, 1) if rate > 0 else None
            self.moves._check_cancel(job)
            self.moves._save(job, force=False)

        return update

    @staticmethod
    def _mkdirs(plan: StoragePlan, made: list[Path]) -> None:
        dirs = {Path(f.dst).parent for f in plan.files} | {Path(plan.new_storage_dir)}
        if plan.new_state_dir:
            dirs.add(Path(plan.new_state_dir))
        for d in sorted(dirs):
            missing = [p for p in (d, *d.parents) if not p.exists()]
            for p in reversed(missing):
                p.mkdir()
                made.append(p)

    @staticmethod
    def _undo(made: list[Path]) -> None:
        for p in reversed(made):
            if p.is_dir() and not p.is_symlink():
                with contextlib.suppress(OSError):
                    p.rmdir()
            else:
                p.unlink(missing_ok=True)

    # -- running VM: mirror and pivot ---------------------------------------------------------
    async def _live(self, job: Job, spec: VMSpec, plan: StoragePlan, made: list[Path]) -> None:
        disks = plan.disks
        ids = {f.disk or "": f"{JOB_PREFIX}{f.disk}" for f in disks}
        nodes = {f.disk or "": node_name(f.disk or "", job.id, i) for i, f in enumerate(disks)}
        added: list[str] = []
        old_nodes: dict[str, str] = {}
        async with qmp_session(self.vms.qmp_path(job.vm), timeout=30) as q:
            try:
                self.moves._enter(job, Phase.SETUP)
                self._mkdirs(plan, made)
                for f in disks:
                    disk = f.disk or ""
                    info = await image_info(f.src)
                    fmt = str(info.get("format", f.fmt or "qcow2"))
                    made.append(Path(f.dst))
                    rc, out = await _qemu_img("create", "-q", "-f", fmt, f.dst,
                                              str(int(info["virtual-size"])))  # fmt: skip
                    if rc != 0:
                        raise MoveFailed(f"qemu-img create {f.dst} failed: {out}")
                    await q.execute("blockdev-add", {
                        "driver": fmt, "node-name": nodes[disk], "discard": "unmap",
                        "file": {"driver": "file", "filename": f.dst,
                                 "node-name": f"{nodes[disk]}-f", "cache": {"direct": False}},
                    })  # fmt: skip
                    added.append(nodes[disk])
                    old_nodes[disk] = await disk_node(q, disk)
                self.moves._check_cancel(job)
                self.moves._enter(job, Phase.MIRROR)
                if disks:
                    speed = (job.options.bandwidth_mbps or 0) * 1_000_000 // 8 or None
                    await mirror_until_ready(
                        q, [(ids[d], old_nodes[d], nodes[d]) for d in ids], timeout=24 * 3600,
                        on_progress=self._progress(job), speed_bps=speed, auto_dismiss=False,
                    )  # fmt: skip
                    job.progress.disk_transferred = job.progress.disk_total
                self.moves._check_cancel(job)
                self.moves._enter(job, Phase.SWITCHOVER)
            except BaseException:
                self._rollback_phase(job)
                await _settle_jobs(q, list(ids.values()))
                for node in added:
                    with contextlib.suppress(QmpError):
                        await q.execute("blockdev-del", {"node-name": node})
                self._undo(made)
                raise
            pivoted, failure = await self._pivot(q, ids)
            # Whatever happened, the configuration follows what QEMU uses now.
            devices = await _device_files(q)
            pivoted = {d for d in nodes if _uses(devices, d, nodes[d], _dst(disks, d))}
            for f in disks:
                disk = f.disk or ""
                target = old_nodes[disk] if disk in pivoted else nodes[disk]
                with contextlib.suppress(QmpError):
                    await q.execute("blockdev-del", {"node-name": target})
            in_use = await _files_in_use(q)
        if failure is not None:
            for f in disks:
                if f.disk not in pivoted:
                    Path(f.dst).unlink(missing_ok=True)
                elif os.path.normpath(f.src) not in in_use:
                    Path(f.src).unlink(missing_ok=True)
            self.vms.relocate(job.vm, moved_spec(spec, plan, pivoted))
            raise MoveFailed(
                f"pivot failed ({failure}); moved: {', '.join(sorted(pivoted)) or 'none'}; the "
                "VM's configuration lists the files it uses now",
                "see ferry vm show; run move-storage again for the disks that stayed",
            )
        stale = [f.src for f in disks if os.path.normpath(f.src) in in_use]
        self._switch(job, spec, plan, pivoted)
        self.moves._enter(job, Phase.CLEANUP)
        self._delete_old(job, plan, keep=set(stale))

    async def _pivot(self, q: QmpSession, ids: dict[str, str]) -> tuple[set[str], str | None]:
        """Complete every mirror (the device switches to its new node); wait until done."""
        failure: str | None = None
        for jid in ids.values():
            try:
                await q.execute("job-complete", {"id": jid})
            except QmpError as exc:
                failure = failure or str(exc)
        done: set[str] = set()
        deadline = time.monotonic() + 60
        pending = dict(ids)
        while pending and time.monotonic() < deadline:
            jobs = await _jobs(q)
            for disk, jid in list(pending.items()):
                info = jobs.get(jid)
                if info is None or info.get("status") == "concluded":
                    if info is not None and info.get("error"):
                        failure = failure or f"{disk}: {info['error']}"
                    else:
                        done.add(disk)
                    pending.pop(disk)
                    if info is not None:
                        with contextlib.suppress(QmpError):
                            await q.execute("job-dismiss", {"id": jid})
            await asyncio.sleep(0.02)
        if pending:
            failure = failure or f"{', '.join(pending)} did not pivot within 60 s"
            await _settle_jobs(q, list(pending.values()))
        return done, failure

    def _switch(self, job: Job, spec: VMSpec, plan: StoragePlan, disks: set[str]) -> None:
        """Write the configuration with the new paths (atomically) where it now lives."""
        self.vms.relocate(job.vm, moved_spec(spec, plan, disks))

    def _delete_old(self, job: Job, plan: StoragePlan, keep: set[str]) -> None:
        for f in plan.files:
            if f.kind == "config":
                continue  # relocate() removed it
            if f.src in keep:
                job.escalations.append(f"kept {f.src}: QEMU still had it open")
                continue
            Path(f.src).unlink(missing_ok=True)
        for d in {Path(f.src).parent for f in plan.files}:
            if d != Path(plan.new_storage_dir) and d != Path(plan.new_state_dir or "/"):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only when empty: other files stay

    # -- stopped VM: copy, verify, switch ----------------------------------------------------
    async def _offline(self, job: Job, spec: VMSpec, plan: StoragePlan, made: list[Path]) -> None:
        try:
            self.moves._enter(job, Phase.SETUP)
            self._mkdirs(plan, made)
            self.moves._check_cancel(job)
            self.moves._enter(job, Phase.MIRROR)
            base = 0
            rate = (job.options.bandwidth_mbps or 0) * 1_000_000 // 8
            progress = self._progress(job)
            for f in plan.files:
                if f.kind == "config":
                    continue
                made.append(Path(f.dst))
                if f.kind == "disk":
                    await self._convert(job, f, rate, base, progress)
                    rc, out = await _qemu_img("compare", "-q", "-f", f.fmt or "qcow2",
                                              "-F", f.fmt or "qcow2", f.src, f.dst)  # fmt: skip
                    if rc != 0:
                        raise MoveFailed(
                            f"verify: {f.dst} differs from {f.src} ({out or rc})",
                            "check the target filesystem; nothing was switched",
                        )
                else:
                    await self._copy(job, f, base, progress)
                    same = await asyncio.to_thread(filecmp.cmp, f.src, f.dst, False)
                    if not same:
                        raise MoveFailed(
                            f"verify: {f.dst} differs from {f.src}",
                            "check the target filesystem; nothing was switched",
                        )
                base += f.size_bytes
            self.moves._check_cancel(job)
            self.moves._enter(job, Phase.SWITCHOVER)
            self._switch(job, spec, plan, {f.disk or "" for f in plan.disks})
        except BaseException:
            self._rollback_phase(job)
            self._undo(made)
            raise
        self.moves._enter(job, Phase.CLEANUP)
        self._delete_old(job, plan, keep=set())

    async def _convert(self, job: Job, f: FileMove, rate: int, base: int, progress: Any) -> None:
        fmt = f.fmt or "qcow2"
        args = ["convert", "-p", "-f", fmt, "-O", fmt, *(["-r", str(rate)] if rate else []),
                f.src, f.dst]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        try:
            buf = b""
            while True:
                chunk = await proc.stdout.read(256)
                if not chunk:
                    break
                buf = (buf + chunk)[-256:]
                found = re.findall(rb"\((\d+(?:\.\d+)?)/100%\)", buf)
                if found:
                    progress(base + int(f.size_bytes * float(found[-1]) / 100), 0)
                self.moves._check_cancel(job)
            rc = await proc.wait()
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        if rc != 0:
            err = (await proc.stderr.read()).decode(errors="replace") if proc.stderr else ""
            raise MoveFailed(f"qemu-img convert {f.src} → {f.dst} failed: {err.strip() or rc}")

    async def _copy(self, job: Job, f: FileMove, base: int, progress: Any) -> None:
        chunk = 8 << 20
        with open(f.src, "rb") as src, open(f.dst, "wb") as dst:
            done = 0
            while True:
                data = await asyncio.to_thread(src.read, chunk)
                if not data:
                    break
                await asyncio.to_thread(dst.write, data)
                done += len(data)
                progress(base + done, 0)
            await asyncio.to_thread(os.fsync, dst.fileno())

    # -- agent restart -------------------------------------------------------------------------
    async def recover(self) -> None:
        """Settle storage moves an earlier agent process left unfinished.

        The configuration is made to match the files the VM uses (QEMU's graph for a live VM,
        the written configuration for a stopped one); copies it does not use are removed.
        """
        for job in list(self.moves.jobs.values()):
            if job.kind != "storage" or job.state.terminal or job.storage is None:
                continue
            try:
                await self._recover_one(job, job.storage)
            except Exception as exc:  # record, never crash the agent
                log.exception("recovering storage move %s", job.id)
                job.error = JobError(phase=job.phase, message=f"recovery failed: {exc}")
            job.state = JobState.FAILED
            if job.error is None:
                job.error = JobError(
                    phase=job.phase, fix="check ferry vm show; start the move again if needed",
                    message="the agent restarted during the storage move; the VM's "
                    "configuration lists the files it uses, unused copies were removed",
                )  # fmt: skip
            job.finished_at = job.finished_at or time.time()
            self.moves._save(job)

    async def _recover_one(self, job: Job, plan: StoragePlan) -> None:
        spec = self.vms.spec(job.vm)
        sdir = Path(spec.storage_dir)
        on_new = {d.name for d in spec.disks
                  if os.path.normpath(sdir / d.file) in {f.dst for f in plan.disks}}  # fmt: skip
        using = set(on_new)
        proc = self.vms.process(job.vm)
        if plan.live and proc is not None and proc.alive():
            async with qmp_session(self.vms.qmp_path(job.vm), timeout=15) as q:
                await _settle_jobs(q, [f"{JOB_PREFIX}{f.disk}" for f in plan.disks])
                devices = await _device_files(q)
                for i, f in enumerate(plan.disks):
                    node = node_name(f.disk or "", job.id, i)
                    if _uses(devices, f.disk or "", node, f.dst):
                        using.add(f.disk or "")
                    else:
                        with contextlib.suppress(QmpError):
                            await q.execute("blockdev-del", {"node-name": node})
        if using != on_new:
            self.vms.relocate(job.vm, moved_spec(spec, plan, using))
            spec = self.vms.spec(job.vm)
        state_moved = str(state_file(spec)) in {f.dst for f in plan.files if f.kind == "state"}
        for f in plan.files:
            if f.kind == "config":
                continue
            moved = f.disk in using if f.kind == "disk" else state_moved
            Path(f.src if moved else f.dst).unlink(missing_ok=True)
