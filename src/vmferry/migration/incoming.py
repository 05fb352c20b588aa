"""The destination side of a live move: check, prepare a skeleton VM, receive, commit or undo."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from vmferry import __version__
from vmferry.errors import ConflictError, HostError, NotFoundError, RefusedError
from vmferry.host.settings import HostSettings
from vmferry.host.spec import CONFIG_FILE, DiskSpec, NicSpec, VMSpec
from vmferry.host.storage import resolve_under_roots
from vmferry.host.vms import VMManager, VMState
from vmferry.migration.model import CheckResult, IncomingPlan, IncomingRequest
from vmferry.migration.qemu_ops import (
    disable_tls,
    enable_tls,
    nbd_server_args,
    set_capabilities,
)
from vmferry.migration.slots import Slots
from vmferry.qemu.qmp import QmpError, QmpSession, qmp_session
from vmferry.qemu.sockets import listener_fds, set_nodelay
from vmferry.qemu.tls import X509Files, host_identity, prepare_creds_dir

log = logging.getLogger("vmferry.migration")


def version_tuple(v: str) -> tuple[int, ...]:
    """``"1.2.3"`` → ``(1, 2, 3)`` (non-numeric parts count as 0)."""
    return tuple(int(p) if p.isdigit() else 0 for p in v.split("."))


def local_addresses() -> list[tuple[str, str]]:
    """(address, interface) of every IPv4 address of this network namespace."""
    out: list[tuple[str, str]] = []
    with IPRoute() as ipr:
        names = {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
        for a in ipr.get_addr(family=2):
            out.append((str(a.get_attr("IFA_ADDRESS")), names.get(int(a["index"]), "?")))
    return out


def migration_addresses(networks: list[str], addrs: list[tuple[str, str]]) -> list[str]:
    """This host's addresses inside the migration networks, in the networks' order."""
    out: list[str] = []
    for net in networks:
        for addr, _ifname in addrs:
            ip = ipaddress.ip_address(addr)
            if ip.is_loopback:
                continue
            if (net == "any" or ip in ipaddress.ip_network(net)) and addr not in out:
                out.append(addr)
    return out


@dataclass
class Incoming:
    """One VM being received."""

    req: IncomingRequest
    plan: IncomingPlan
    created: list[Path] = field(default_factory=list)
    created_dir: Path | None = None
    listeners: list[asyncio.Server] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    #: Held open from the start of the stream on the VM's second QMP socket: during post-copy
    #: QEMU's main loop can block on a missing page, and then only a session negotiated earlier
    #: can still send the out-of-band ``migrate-recover``.
    oob: contextlib.AsyncExitStack | None = None
    oob_session: QmpSession | None = None


class IncomingMoves:
    """Receives VMs on this host."""

    def __init__(
        self,
        vms: VMManager,
        settings: Callable[[], HostSettings],
        slots: Slots,
        tls: X509Files | None = None,
    ) -> None:
        self.vms = vms
        self._settings = settings
        self.slots = slots
        #: The agent's own certificate: what the destination QEMU presents (TLS server).
        self._tls = tls
        self.active: dict[str, Incoming] = {}
        self._dir = vms.state_dir / "incoming"

    # -- records: an agent restart must not forget a VM it is receiving ----------------------
    def _record_path(self, job_id: str) -> Path:
        return self._dir / f"{job_id}.json"

    def _persist(self, inc: Incoming) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        data = {
            "req": inc.req.model_dump(mode="json"),
            "plan": inc.plan.model_dump(mode="json"),
            "created": [str(f) for f in inc.created],
            "created_dir": str(inc.created_dir) if inc.created_dir else None,
        }
        path = self._record_path(inc.req.job_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    def _drop_record(self, job_id: str) -> None:
        self._record_path(job_id).unlink(missing_ok=True)

    def load(self) -> list[str]:
        """Take back the moves an earlier agent process was receiving (at start-up).

        The source decides how each ends (commit or abort); until then the VM stays
        ``incoming``. A record whose VM is no longer incoming here is stale and dropped.
        """
        taken: list[str] = []
        for path in sorted(self._dir.glob("*.json")) if self._dir.exists() else []:
            try:
                data = json.loads(path.read_text())
                inc = Incoming(
                    req=IncomingRequest.model_validate(data["req"]),
                    plan=IncomingPlan.model_validate(data["plan"]),
                    created=[Path(f) for f in data["created"]],
                    created_dir=Path(data["created_dir"]) if data["created_dir"] else None,
                )
                state = self.vms.state(inc.req.spec.name)
            except (OSError, ValueError, KeyError, NotFoundError) as exc:
                log.warning("dropping incoming record %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
                continue
            if state is not VMState.INCOMING:
                path.unlink(missing_ok=True)
                continue
            self.slots.try_acquire(inc.req.job_id)
            self.active[inc.req.job_id] = inc
            taken.append(inc.req.job_id)
            log.info("resuming incoming move %s of %s", inc.req.job_id, inc.req.spec.name)
        return taken

    # -- checks ------------------------------------------------------------------------------
    def _plan_storage(
        self, req: IncomingRequest, settings: HostSettings
    ) -> tuple[str, str, dict[str, str], list[str]]:
        """Decide where every file goes: (mode, storage_dir, disk -> file, mirrored disks)."""
        spec, opts = req.spec, req.options
        roots = settings.storage_roots
        src_dir = Path(spec.storage_dir)
        visible = (
            any(src_dir == Path(r) or Path(r) in src_dir.parents for r in roots)
            and (src_dir / CONFIG_FILE).exists()
            and VMSpec.model_validate_json((src_dir / CONFIG_FILE).read_text()).uuid == spec.uuid
        )
        if opts.vm_only:
            if not visible:
                raise RefusedError(
                    f"--vm-only: this host does not see {src_dir} under its storage roots",
                    field="vm_only",
                    fix="put the VM on a shared volume both hosts see, or move its storage too",
                )
            return "shared", str(src_dir), {d.name: str(src_dir / d.file) for d in spec.disks}, []
        if visible and not opts.storage_path and not opts.disk_map:
            return "shared", str(src_dir), {d.name: str(src_dir / d.file) for d in spec.disks}, []
        target = resolve_under_roots(opts.storage_path or spec.name, roots, "storage_path")
        disks: dict[str, str] = {}
        for d in spec.disks:
            mapped = opts.disk_map.get(d.name) or opts.disk_map.get(str(src_dir / d.file))
            if mapped:
                disks[d.name] = str(resolve_under_roots(mapped, roots, f"disk_map[{d.name}]"))
            else:
                # d.file may be a relative path out of the folder (after a storage move).
                disks[d.name] = str(target / Path(d.file).name)
        return "shared-nothing", str(target), disks, [d.name for d in spec.disks]

    def checks(self, req: IncomingRequest) -> tuple[list[CheckResult], IncomingPlan | None]:
        """Every destination-side check, and the storage plan when the checks allow one."""
        s = self._settings()
        spec = req.spec
        res: list[CheckResult] = []

        def add(name: str, ok: bool, msg: str, fix: str | None = None) -> None:
            res.append(CheckResult(name=name, ok=ok, message=msg, fix=None if ok else fix))

        add(
            "migration-enabled",
            s.migration.enabled,
            "live migration is enabled on the destination"
            if s.migration.enabled
            else f"live migration is disabled on {s.name}",
            f"ferry --host {s.name} host set --migration-enabled",
        )
        newer = version_tuple(req.source_version) <= version_tuple(__version__)
        add(
            "agent-version",
            newer,
            f"destination vmferry {__version__} >= source {req.source_version}"
            if newer
            else f"destination runs vmferry {__version__}, older than the source's "
            f"{req.source_version}; moving to an older version is refused",
            "upgrade vmferry on the destination",
        )
        exists = spec.name in {v.name for v in self.vms.list()}
        add(
            "name-free",
            not exists,
            f"no VM named {spec.name!r} on the destination"
            if not exists
            else f"the destination already has a VM named {spec.name!r}",
            "rename or delete the VM on the destination",
        )
        wanted = {req.options.switch_map.get(n.switch, n.switch) for n in spec.nics}
        missing = sorted(w for w in wanted if w not in s.switches)
        add(
            "virtual-switches",
            not missing,
            "every virtual switch exists on the destination"
            if not missing
            else f"the destination has no virtual switch named {', '.join(missing)} "
            f"(it has: {', '.join(sorted(s.switches)) or 'none'})",
            "create it there, or map it: --switch-map OLD=NEW",
        )
        here = _cpu()
        vendor_ok = here["vendor"] == req.cpu_vendor
        add(
            "cpu-vendor",
            vendor_ok,
            f"CPU vendor {here['vendor']} on both hosts"
            if vendor_ok
            else f"CPU vendor differs: source {req.cpu_vendor}, destination {here['vendor']}",
            "live migration needs the same CPU vendor; use a quick or cold move",
        )
        if spec.cpu_model in ("host", "max"):
            lacking = sorted(set(req.cpu_flags) - set(here["flags"]))
            add(
                "cpu-features",
                not lacking,
                "the destination CPU offers every feature of the VM's CPU"
                if not lacking
                else f"the destination CPU lacks {len(lacking)} feature(s) the VM uses: "
                + ", ".join(lacking[:12]),
                "turn on processor compatibility (a baseline CPU model such as qemu64)",
            )
        else:
            add(
                "cpu-features",
                True,
                f"the VM uses the named CPU model {spec.cpu_model}, checked by QEMU at setup",
            )
        free = self.vms.free_memory_mib()
        add(
            "memory",
            spec.memory_mib <= free,
            f"{spec.memory_mib} MiB needed, {free} MiB free on the destination",
            "free memory on the destination or pick another host",
        )
        plan: IncomingPlan | None = None
        try:
            mode, sdir, disks, mirrored = self._plan_storage(req, s)
        except RefusedError as exc:
            add("storage", False, exc.message, exc.fix)
        else:
            need = sum(d.size_mib for d in spec.disks if d.name in mirrored) * 2**20
            probe = Path(sdir)
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            free_disk = shutil.disk_usage(probe).free
            add(
                "disk-space",
                need <= free_disk,
                f"{need // 2**20} MiB of disks to copy, {free_disk // 2**20} MiB free at {sdir}",
                "free space there or choose --storage-path elsewhere",
            )
            clash = [f for f in disks.values() if mode != "shared" and Path(f).exists()]
            add(
                "storage",
                not clash,
                f"{mode}: VM files go to {sdir}"
                if not clash
                else f"destination files already exist: {', '.join(clash)}",
                "choose another --storage-path",
            )
            cands = migration_addresses(s.migration.networks, local_addresses())
            add(
                "migration-network",
                bool(cands),
                f"destination listens on {', '.join(cands)}"
                if cands
                else "no migration network available: the destination has no address in "
                + ", ".join(s.migration.networks),
                f"ferry --host {s.name} host migration-network add CIDR",
            )
            if req.options.encryption:
                add(
                    "encryption",
                    self._tls is not None,
                    f"{s.name} receives the memory stream and disk copy encrypted (TLS, its "
                    "host certificate)"
                    if self._tls is not None
                    else f"{s.name}'s agent has no certificate for QEMU's TLS",
                    "start ferryd with --tls-cert, --tls-key and --tls-ca",
                )
            elif cands:
                cands = [c for c in cands if s.migration.trusted(c)]
                add(
                    "encryption",
                    bool(cands),
                    f"unencrypted (--no-encryption) over trusted network(s) at {', '.join(cands)}"
                    if cands
                    else "encryption: --no-encryption is allowed only over a migration network "
                    f"marked trusted, and {s.name} trusts none of its migration networks",
                    f"mark the network trusted: ferry --host {s.name} host migration-network "
                    "add CIDR --trusted; or move without --no-encryption",
                )
            plan = IncomingPlan(
                job_id=req.job_id,
                mode="shared" if mode == "shared" else "shared-nothing",
                storage_dir=sdir,
                disks=disks,
                mirrored=mirrored,
                candidates=cands,
                encrypted=req.options.encryption,
            )
        if plan is not None:
            plan.checks = res
        return res, plan

    # -- prepare / start / commit / abort ----------------------------------------------------
    def _ports(self) -> tuple[int, int]:
        s = self._settings().migration
        used = {p for inc in self.active.values() for p in (inc.plan.port, inc.plan.nbd_port)}
        for port in range(s.port_min, s.port_max, 2):
            if port not in used and port + 1 not in used:
                return port, port + 1
        raise ConflictError("no free port in the migration port range", field="port_min")

    async def prepare(self, req: IncomingRequest) -> IncomingPlan:
        """Check, then build the skeleton VM waiting for the stream (or just plan: dry run)."""
        results, plan = await asyncio.to_thread(self.checks, req)
        failed = [r for r in results if not r.ok]
        if req.dry_run or plan is None or failed:
            if plan is None:
                plan = IncomingPlan(
                    job_id=req.job_id, mode="shared", storage_dir="", disks={}, mirrored=[],
                    candidates=[], checks=results,
                )  # fmt: skip
            if failed and not req.dry_run:
                raise RefusedError(
                    "; ".join(r.message for r in failed), field="destination", fix=failed[0].fix
                )
            return plan
        if req.job_id in self.active:
            raise ConflictError(f"move {req.job_id} is already being received")
        if not self.slots.try_acquire(req.job_id):
            raise ConflictError(
                f"the destination is at its limit of {self._settings().migration.max_concurrent}"
                " concurrent moves",
                field="busy",
                fix="the move waits in the queue and retries",
            )
        inc = Incoming(req=req, plan=plan)
        try:
            plan.port, plan.nbd_port = self._ports()
            self.active[req.job_id] = inc
            self._persist(inc)
            await self._build(inc)
            self._persist(inc)
        except BaseException:
            await self.abort(req.job_id)
            raise
        return plan

    async def _build(self, inc: Incoming) -> None:
        req, plan = inc.req, inc.plan
        spec = req.spec
        sdir = Path(plan.storage_dir)
        if plan.mode != "shared":
            if not sdir.exists():
                inc.created_dir = sdir
                sdir.mkdir(parents=True)
            for d in spec.disks:
                if d.name not in plan.mirrored:
                    continue
                target = Path(plan.disks[d.name])
                target.parent.mkdir(parents=True, exist_ok=True)
                inc.created.append(target)
                await _qemu_img_create(target, d.size_mib)
        new_spec = spec.model_copy(
            update={
                "storage_dir": str(sdir),
                # A saved-state folder elsewhere on the source means nothing here.
                "state_dir": spec.state_dir if plan.mode == "shared" else None,
                "disks": [
                    DiskSpec(
                        name=d.name,
                        file=os.path.relpath(plan.disks[d.name], sdir),
                        size_mib=d.size_mib,
                        fmt=d.fmt,
                    )
                    for d in spec.disks
                ],
                "nics": [
                    NicSpec(switch=req.options.switch_map.get(n.switch, n.switch), mac=n.mac)
                    for n in spec.nics
                ],
            }
        )
        write = plan.mode != "shared"
        if write:
            inc.created.append(sdir / CONFIG_FILE)
        self.vms.register_incoming(new_spec, write_config=write)
        cfg = await self.vms.launch_incoming(spec.name)
        async with qmp_session(cfg.qmp_socket) as q:
            await set_capabilities(q, req.transport, req.streams, req.postcopy, incoming=True)
            if plan.encrypted:
                if self._tls is None:
                    raise HostError("this agent has no certificate for QEMU's TLS")
                creds = await asyncio.to_thread(
                    prepare_creds_dir, self._tls, self.vms.state_dir / "tls" / "qemu"
                )
                # Only the source host's certificate may connect (migration port and NBD);
                # the API checked that the caller's certificate is that host's (delegation).
                await enable_tls(q, creds, "server", peer_identity=host_identity(req.source))
            else:
                await disable_tls(q)
        for addr in plan.candidates:
            with contextlib.suppress(OSError):
                server = await asyncio.start_server(
                    _close_at_once, host=addr, port=plan.port, reuse_address=True
                )
                inc.listeners.append(server)
        if not inc.listeners:
            raise HostError(
                f"cannot listen on any migration address ({', '.join(plan.candidates)}) "
                f"port {plan.port}"
            )

    def _get(self, job_id: str) -> Incoming:
        inc = self.active.get(job_id)
        if inc is None:
            raise NotFoundError(f"no incoming move {job_id} on this host", field="job_id")
        return inc

    async def start(self, job_id: str, address: str) -> None:
        """Listen for the stream on ``address`` (the candidate the source could reach)."""
        inc = self._get(job_id)
        if address not in inc.plan.candidates:
            raise RefusedError(f"{address} is not one of this host's migration addresses")
        for server in inc.listeners:
            server.close()
            await server.wait_closed()
        inc.listeners.clear()
        inc.plan.candidates = [address]
        self._persist(inc)
        name = inc.req.spec.name
        try:
            async with qmp_session(self.vms.qmp_path(name)) as q:
                if inc.plan.mirrored:
                    await q.execute(
                        "nbd-server-start",
                        nbd_server_args(address, inc.plan.nbd_port, inc.plan.encrypted, authz=True),
                    )
                    for disk in inc.plan.mirrored:
                        await q.execute(
                            "block-export-add",
                            {"type": "nbd", "id": f"exp-{disk}", "node-name": f"drv-{disk}",
                             "name": disk, "writable": True},
                        )  # fmt: skip
                await q.execute("migrate-incoming", {"uri": f"tcp:{address}:{inc.plan.port}"})
        except QmpError as exc:
            raise HostError(f"destination could not start receiving: {exc}") from exc
        if not inc.req.options.qemu_defaults:  # the benchmark's baseline: QEMU as it is
            await asyncio.to_thread(self._no_delay, name, inc.plan.port)
        if inc.req.postcopy:
            await self._open_oob(inc)

    def _no_delay(self, name: str, port: int) -> None:
        """Nagle's algorithm off on the streams QEMU accepts on ``port`` (QEMU leaves it on for
        the main channel): with it, TLS handshake messages and return-path replies wait for
        the peer's delayed acknowledgement, up to 40 ms each, and the guest stalls meanwhile
        (see docs/migration.md, "The migration sockets")."""
        proc = self.vms.process(name)
        if proc is None:
            return
        try:
            set_nodelay(proc.pid, list(listener_fds(proc.pid, port)))
        except OSError as exc:
            log.warning("VM %s: cannot turn Nagle's algorithm off on the migration port "
                        "(%s); the move's start may stall the guest longer", name, exc)  # fmt: skip

    async def status(self, job_id: str) -> dict[str, Any]:
        """The destination QEMU's view (run state and migration status)."""
        inc = self._get(job_id)
        name = inc.req.spec.name
        proc = self.vms.process(name)
        if proc is None or not proc.alive():
            return {"alive": False, "status": "gone", "migration": "failed"}
        async with qmp_session(self.vms.qmp_path(name), timeout=3) as q:
            st = await q.status()
            mig = await q.execute("query-migrate")
        return {"alive": True, "status": st, "migration": mig.get("status", "none")}

    async def commit(self, job_id: str, paused: bool, started_at: float | None) -> dict[str, Any]:
        """The stream is complete: make sure the guest runs here, announce it, own it."""
        inc = self._get(job_id)
        name = inc.req.spec.name
        t0 = time.monotonic()
        timings: dict[str, float] = {}
        async with _qmp_retry(self.vms.qmp_path(name)) as q:
            deadline = time.monotonic() + 60
            while True:
                st = await q.status()
                if st in ("running", "paused"):
                    break
                if st not in ("inmigrate", "postmigrate", "prelaunch", "finish-migrate"):
                    raise HostError(f"destination QEMU is in state {st!r} after the stream")
                if time.monotonic() > deadline:
                    raise HostError("destination QEMU did not resume within 60 s")
                await asyncio.sleep(0.005)
            timings["resumed_after_s"] = time.monotonic() - t0
            if paused and st == "running":
                await q.execute("stop")
            elif not paused and st == "paused":
                await q.execute("cont")
            await q.execute("announce-self", {"initial": 50, "max": 550, "rounds": 5, "step": 50})
            if inc.plan.mirrored:
                with contextlib.suppress(QmpError):
                    await q.execute("nbd-server-stop")
            if inc.plan.encrypted:
                with contextlib.suppress(QmpError):
                    # the stream is done (a later save needs no TLS): drop creds and authz
                    await disable_tls(q)
        await self._close_oob(inc)
        info = self.vms.commit_incoming(name, paused, started_at)
        self.active.pop(job_id, None)
        self._drop_record(job_id)
        self.slots.release(job_id)
        log.info("received VM %s (move %s)", name, job_id)
        return {"vm": info.model_dump(mode="json"), **timings}

    async def _open_oob(self, inc: Incoming) -> None:
        stack = contextlib.AsyncExitStack()
        try:
            inc.oob_session = await stack.enter_async_context(
                qmp_session(self.vms.diag_qmp_path(inc.req.spec.name))
            )
        except QmpError as exc:
            log.warning("move %s: no out-of-band QMP session: %s", inc.req.job_id, exc)
            await stack.aclose()
            return
        inc.oob = stack

    async def _close_oob(self, inc: Incoming) -> None:
        if inc.oob is not None:
            with contextlib.suppress(Exception):
                await inc.oob.aclose()
        inc.oob, inc.oob_session = None, None

    async def recover(self, job_id: str, address: str) -> int:
        """Post-copy recovery: listen again (new port) for the source to resume the stream."""
        inc = self._get(job_id)
        used = {inc.plan.port, inc.plan.nbd_port}
        s = self._settings().migration
        if inc.oob_session is not None:
            # The main loop may be blocked on a missing page: out of band, no status query.
            port = next(p for p in range(s.port_min, s.port_max) if p not in used)
            uri = {"uri": f"tcp:{address}:{port}"}
            try:
                await inc.oob_session.execute("migrate-recover", uri, oob=True)
            except QmpError:
                # An earlier attempt hangs half-way: back to paused, then listen again.
                with contextlib.suppress(QmpError):
                    await inc.oob_session.execute("migrate-pause", oob=True)
                await asyncio.sleep(0.5)
                try:
                    await inc.oob_session.execute("migrate-recover", uri, oob=True)
                except QmpError as exc:
                    raise ConflictError(f"destination cannot listen for recovery: {exc}") from exc
            return await self._listening_again(inc, port)
        name = inc.req.spec.name
        async with qmp_session(self.vms.qmp_path(name)) as q:
            st = (await q.execute("query-migrate")).get("status")
            if st in ("postcopy-recover-setup", "postcopy-recover"):
                # An earlier attempt hangs half-way: back to paused, then listen again.
                with contextlib.suppress(QmpError):
                    await q.execute("migrate-pause")
                for _ in range(50):
                    st = (await q.execute("query-migrate")).get("status")
                    if st == "postcopy-paused":
                        break
                    await asyncio.sleep(0.1)
            if st != "postcopy-paused":
                raise ConflictError(f"destination migration is {st}, not postcopy-paused")
            port = next(p for p in range(s.port_min, s.port_max) if p not in used)
            await q.execute("migrate-recover", {"uri": f"tcp:{address}:{port}"})
        return await self._listening_again(inc, port)

    async def _listening_again(self, inc: Incoming, port: int) -> int:
        """Record the recovery's new port; Nagle off on it, as on the first one (the
        recovered stream carries the guest's page requests)."""
        inc.plan.port = port
        self._persist(inc)
        if not inc.req.options.qemu_defaults:
            await asyncio.to_thread(self._no_delay, inc.req.spec.name, port)
        return port

    async def abort(self, job_id: str) -> None:
        """Undo everything prepared for this move; the source keeps the VM."""
        inc = self.active.pop(job_id, None)
        self.slots.release(job_id)
        if inc is None:
            return
        self._drop_record(job_id)
        await self._close_oob(inc)
        for server in inc.listeners:
            server.close()
        name = inc.req.spec.name
        try:
            state = self.vms.state(name)
        except NotFoundError:
            state = None
        if state is VMState.INCOMING:
            self.vms.discard_incoming(name, inc.created)
        else:
            for f in inc.created:
                f.unlink(missing_ok=True)
        if inc.created_dir is not None:
            shutil.rmtree(inc.created_dir, ignore_errors=True)
        log.info("aborted incoming move %s of %s", job_id, name)


@contextlib.asynccontextmanager
async def _qmp_retry(path: Path, tries: int = 5) -> AsyncIterator[QmpSession]:
    """A QMP session, retrying the connection (QEMU may be busy finishing the stream)."""
    for attempt in range(tries):
        try:
            session = qmp_session(path, timeout=10)
            q = await session.__aenter__()
        except QmpError:
            if attempt == tries - 1:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))
            continue
        try:
            yield q
        except BaseException as exc:
            if not await session.__aexit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            await session.__aexit__(None, None, None)
        return


async def _close_at_once(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.close()


def _cpu() -> dict[str, Any]:
    from vmferry.host.host import cpu_info

    return cpu_info()


async def _qemu_img_create(path: Path, size_mib: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{size_mib}M",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise HostError(f"qemu-img create {path} failed: {err.decode().strip()}")
