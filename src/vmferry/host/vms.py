"""VM lifecycle on one host: create, start, stop, shutdown, pause, resume, save, restore, delete.

QEMU runs as a daemon that outlives the agent. What the agent knows about a VM lives in two
places: the configuration (``vm.json`` beside the disks, so another host can take the VM over from
shared storage) and a runtime record in the host's state directory (pid + start time, what the
admin last asked for). On start the agent reattaches to running QEMUs from those records and
reports a VM whose QEMU vanished as crashed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vmferry.errors import (
    ConflictError,
    HostError,
    InsufficientResourcesError,
    NotFoundError,
    RefusedError,
)
from vmferry.host import network
from vmferry.host.events import EventLog
from vmferry.host.owner import OWNER_FILE, OwnerRecord, image_lock_holder, read_owner, write_owner
from vmferry.host.settings import HostSettings
from vmferry.host.spec import (
    CONFIG_FILE,
    DiskSpec,
    NicSpec,
    VMCreate,
    VMSpec,
    state_file,
)
from vmferry.host.storage import resolve_under_roots
from vmferry.qemu import DiskDrive, NetTap, QemuConfig, QemuProcess, build_argv, spawn_daemon
from vmferry.qemu.process import QemuStartError
from vmferry.qemu.qmp import QmpError, QmpSession, qmp_session, wait_for_socket
from vmferry.qemu.stream import UNLIMITED_BPS, all_off

log = logging.getLogger("vmferry.host")


class VMState(StrEnum):
    """What a VM is doing, as admins see it."""

    OFF = "off"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting-down"
    STOPPING = "stopping"
    SAVING = "saving"
    SAVED = "saved"
    RESTORING = "restoring"
    CRASHED = "crashed"
    MIGRATING = "migrating"
    INCOMING = "incoming"
    #: The guest runs on another host; the hand-over to that host's agent is not finished.
    HANDOVER = "handover-pending"


@dataclass
class Runtime:
    """The host-local runtime record of one VM (``run/<id>/runtime.json``)."""

    expected: str = VMState.OFF.value
    pid: int | None = None
    start_time: int | None = None
    started_at: float | None = None
    saved_paused: bool = False
    crashed_at: float | None = None
    taps: list[str] = field(default_factory=list)

    def process(self) -> QemuProcess | None:
        """The recorded QEMU process, if one was recorded."""
        if self.pid is None or self.start_time is None:
            return None
        return QemuProcess(self.pid, self.start_time)


class VMInfo(BaseModel):
    """What ``ferry vm show`` prints."""

    name: str
    uuid: str
    host: str
    state: VMState
    memory_mib: int
    vcpus: int
    cpu_model: str
    pid: int | None
    uptime_s: float | None
    storage_dir: str
    disks: list[DiskSpec]
    nics: list[NicSpec]
    ip: str | None
    boot: str


ImageProvider = Callable[[], tuple[Path, Path]]
#: Told a VM's name once its guest powered itself off and the monitor stopped its QEMU.
PowerOffHook = Callable[[str], Awaitable[None]]


def default_image() -> tuple[Path, Path]:
    from vmferry.guest import build_image

    img = build_image()
    return img.kernel, img.initrd


def socket_root(state_dir: Path) -> Path:
    """Where a host's QMP sockets live: short paths under /run (unix sockets max 107 bytes)."""
    tag = hashlib.sha256(str(state_dir.absolute()).encode()).hexdigest()[:10]
    return Path(os.environ.get("VMFERRY_RUN_DIR", "/run/vmferry")) / tag


def vm_tag(uuid: str) -> str:
    """A VM's short directory name under a host's run and socket directories."""
    return uuid.replace("-", "")[:12]


def socket_dir(state_dir: Path, uuid: str) -> Path:
    """Where the QMP sockets (``qmp.sock``, ``qmp-diag.sock``) of VM ``uuid`` live on the host
    whose state directory is ``state_dir``."""
    return socket_root(state_dir) / vm_tag(uuid)


def meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0]) // 1024  # MiB
    return out


class VMManager:
    """Owns the VMs of one host."""

    def __init__(
        self,
        state_dir: Path,
        settings: Callable[[], HostSettings],
        image: ImageProvider = default_image,
    ) -> None:
        self.state_dir = state_dir
        self._settings = settings
        self._image = image
        self._registry_path = state_dir / "vms.json"
        #: What this host did and refused (``ferry events``): host/events.py.
        self.events = EventLog(state_dir / "events.db", lambda: self._settings().name)
        self._locks: dict[str, asyncio.Lock] = {}
        self._busy: dict[str, VMState] = {}
        #: Specs of incoming VMs whose configuration file (on a shared volume) still belongs to
        #: the source until the move commits.
        self._pending: dict[str, VMSpec] = {}
        self._monitor: asyncio.Task[None] | None = None
        self._power_off_hooks: list[PowerOffHook] = []
        (state_dir / "run").mkdir(parents=True, exist_ok=True)

    # -- records ---------------------------------------------------------------------------
    def _registry(self) -> dict[str, str]:
        if not self._registry_path.exists():
            return {}
        data: dict[str, str] = json.loads(self._registry_path.read_text())
        return data

    def _write_registry(self, reg: dict[str, str]) -> None:
        tmp = self._registry_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(reg, indent=2, sort_keys=True))
        os.replace(tmp, self._registry_path)

    def _spec(self, name: str) -> VMSpec:
        if name in self._pending:
            return self._pending[name]
        path = self._registry().get(name)
        if path is None:
            raise NotFoundError(
                f"no VM named {name!r} on this host", field="name", fix="see ferry vm list"
            )
        try:
            return VMSpec.model_validate_json(Path(path).read_text())
        except FileNotFoundError as exc:
            raise HostError(f"configuration of VM {name!r} is missing: {path}") from exc

    def _run_dir(self, spec: VMSpec) -> Path:
        return self.state_dir / "run" / vm_tag(spec.uuid)

    def _sock_dir(self, spec: VMSpec) -> Path:
        return socket_dir(self.state_dir, spec.uuid)

    def _qmp_path(self, spec: VMSpec) -> Path:
        return self._sock_dir(spec) / "qmp.sock"

    def _runtime(self, spec: VMSpec) -> Runtime:
        path = self._run_dir(spec) / "runtime.json"
        if not path.exists():
            return Runtime()
        return Runtime(**json.loads(path.read_text()))

    def _save_runtime(self, spec: VMSpec, rt: Runtime) -> None:
        run = self._run_dir(spec)
        run.mkdir(parents=True, exist_ok=True)
        tmp = run / "runtime.json.tmp"
        tmp.write_text(json.dumps(asdict(rt)))
        os.replace(tmp, run / "runtime.json")

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _op_lock(self, name: str) -> asyncio.Lock:
        """The VM's lock for an admin operation; refused at once while the VM is moving."""
        if self._busy.get(name) is VMState.HANDOVER:
            raise ConflictError(
                f"VM {name!r} already runs on the destination of its move; the hand-over to that "
                "host's agent is not finished, so this copy must stay paused",
                field="name",
                fix="ferry migration list, then: ferry migration complete ID",
            )
        if self._busy.get(name) is VMState.MIGRATING:
            raise ConflictError(
                f"VM {name!r} is being moved",
                field="name",
                fix="wait for the move, or cancel it: ferry migration cancel ID",
            )
        if name in self._registry() and self.state(name) is VMState.INCOMING:
            raise ConflictError(
                f"VM {name!r} is arriving by live migration", field="name",
                fix="wait for the move to finish",
            )  # fmt: skip
        return self._lock(name)

    # -- state -----------------------------------------------------------------------------
    def _state(self, spec: VMSpec, rt: Runtime) -> VMState:
        busy = self._busy.get(spec.name)
        if busy is not None:
            return busy
        proc = rt.process()
        alive = proc is not None and proc.alive()
        expected = VMState(rt.expected)
        if expected is VMState.INCOMING:
            return expected
        if expected in (VMState.RUNNING, VMState.PAUSED, VMState.STARTING) and not alive:
            return VMState.CRASHED
        if expected in (VMState.OFF, VMState.SAVED, VMState.CRASHED) and alive:
            return VMState.RUNNING  # should not happen; a live QEMU is never hidden
        return expected

    def info(self, name: str) -> VMInfo:
        """The current state of one VM."""
        spec = self._spec(name)
        return self._info(spec)

    def _info(self, spec: VMSpec) -> VMInfo:
        rt = self._runtime(spec)
        state = self._state(spec, rt)
        live = state in (
            VMState.RUNNING,
            VMState.PAUSED,
            VMState.SHUTTING_DOWN,
            VMState.SAVING,
            VMState.MIGRATING,
            VMState.INCOMING,
            VMState.HANDOVER,
        )
        return VMInfo(
            name=spec.name,
            uuid=spec.uuid,
            host=self._settings().name,
            state=state,
            memory_mib=spec.memory_mib,
            vcpus=spec.vcpus,
            cpu_model=spec.cpu_model,
            pid=rt.pid if live else None,
            uptime_s=round(time.time() - rt.started_at, 1) if live and rt.started_at else None,
            storage_dir=spec.storage_dir,
            disks=spec.disks,
            nics=spec.nics,
            ip=spec.probe.ip if spec.probe else None,
            boot=spec.boot.kind,
        )

    def console(self, name: str, lines: int = 50) -> list[str]:
        """The last ``lines`` lines the guest wrote to its serial console (all its runs)."""
        spec = self._spec(name)
        path = self._run_dir(spec) / "serial.log"
        if not path.exists():
            return []
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 256 * 1024))
            text = fh.read().decode(errors="replace")
        return text.splitlines()[-lines:]

    def list(self) -> list[VMInfo]:
        """Every VM registered on this host, by name."""
        out = []
        for name in sorted(self._registry()):
            try:
                out.append(self.info(name))
            except HostError as exc:
                log.warning("VM %s: %s", name, exc)
        return out

    def committed_mib(self) -> int:
        """Memory of the VMs whose QEMU is alive."""
        total = 0
        for name in self._registry():
            try:
                spec = self._spec(name)
            except HostError:
                continue
            proc = self._runtime(spec).process()
            if proc is not None and proc.alive():
                total += spec.memory_mib
        return total

    def free_memory_mib(self) -> int:
        """Memory a new VM may use: what is not committed to VMs nor reserved, nor in use."""
        mem = meminfo()
        reserve = self._settings().memory_reserve_mib
        return max(0, min(mem["MemAvailable"], mem["MemTotal"] - self.committed_mib()) - reserve)

    # -- create / delete -------------------------------------------------------------------
    async def create(self, req: VMCreate) -> VMInfo:
        """Create a VM (configuration + disks); it stays off."""
        async with self._lock(req.name):
            settings = self._settings()
            if req.name in self._registry():
                raise ConflictError(
                    f"a VM named {req.name!r} already exists on this host",
                    field="name",
                    fix="pick another name or delete the existing VM",
                )
            if req.memory_mib < 16:
                raise RefusedError(
                    f"memory_mib {req.memory_mib} is too small",
                    field="memory_mib",
                    fix="give at least 16 MiB",
                )
            free = self.free_memory_mib()
            if req.memory_mib > free:
                raise InsufficientResourcesError(
                    f"memory_mib {req.memory_mib} is more than this host's free memory "
                    f"({free} MiB after the {settings.memory_reserve_mib} MiB reserve)",
                    field="memory_mib",
                    fix="ask for less memory or free some on the host",
                )
            for i, nic in enumerate(req.nics):
                if nic.switch not in settings.switches:
                    known = ", ".join(sorted(settings.switches)) or "none"
                    raise RefusedError(
                        f"nics[{i}].switch: no virtual switch named {nic.switch!r} "
                        f"on this host (switches: {known})",
                        field=f"nics[{i}].switch",
                        fix="ferry host set --switch NAME=BRIDGE adds one",
                    )
            storage_dir = resolve_under_roots(
                req.storage_dir or req.name, settings.storage_roots, "storage_dir"
            )
            if storage_dir.exists() and (storage_dir / CONFIG_FILE).exists():
                raise ConflictError(
                    f"{storage_dir} already holds a VM configuration",
                    field="storage_dir",
                    fix="pick another storage_dir, or import that VM",
                )
            if req.boot.kind == "kernel":
                for fld, val in (
                    ("boot.kernel", req.boot.kernel),
                    ("boot.initrd", req.boot.initrd),
                ):
                    # QEMU (root) reads these into guest memory: only files under the roots.
                    if val and not resolve_under_roots(val, settings.storage_roots, fld).is_file():
                        raise RefusedError(
                            f"{fld}: no file {val}",
                            field=fld,
                            fix="give a path to an existing file",
                        )
            used_macs = self._used_macs()
            nics = []
            for i, nic in enumerate(req.nics):
                mac = nic.mac or self._new_mac(used_macs)
                if mac in used_macs:
                    raise ConflictError(
                        f"nics[{i}].mac {mac} is already used on this host",
                        field=f"nics[{i}].mac",
                        fix="leave mac out to get a generated one",
                    )
                used_macs.add(mac)
                nics.append(NicSpec(switch=nic.switch, mac=mac))
            disks = []
            names = set()
            for i, want in enumerate(req.disks):
                dname = want.name or f"disk{i}"
                if dname in names:
                    raise RefusedError(
                        f"disks[{i}].name {dname!r} is used twice", field=f"disks[{i}].name"
                    )
                names.add(dname)
                disks.append(DiskSpec(name=dname, file=f"{dname}.qcow2", size_mib=want.size_mib))
            spec = VMSpec(
                name=req.name,
                memory_mib=req.memory_mib,
                vcpus=req.vcpus,
                cpu_model=req.cpu_model,
                storage_dir=str(storage_dir),
                disks=disks,
                nics=nics,
                boot=req.boot,
                probe=req.probe,
                allow_postcopy=req.allow_postcopy,
            )
            # The top-most folder this request creates: a failure removes it and all below.
            created_dir: Path | None = None
            probe = storage_dir
            while not probe.exists():
                created_dir, probe = probe, probe.parent
            made: list[Path] = []
            try:
                storage_dir.mkdir(parents=True, exist_ok=True)
                for d in disks:
                    path = storage_dir / d.file
                    if path.exists():
                        raise ConflictError(f"disk file {path} already exists", field="disks")
                    made.append(path)
                    await _run(
                        ["qemu-img", "create", "-q", "-f", "qcow2", str(path), f"{d.size_mib}M"]
                    )
                cfg = storage_dir / CONFIG_FILE
                made.append(cfg)
                cfg.write_text(spec.model_dump_json(indent=2))
                reg = self._registry()
                reg[spec.name] = str(cfg)
                self._write_registry(reg)
            except BaseException:
                for p in made:
                    p.unlink(missing_ok=True)
                if created_dir is not None:
                    shutil.rmtree(created_dir, ignore_errors=True)
                raise
            self._save_runtime(spec, Runtime())
            self._claim(spec)
            log.info("created VM %s in %s", spec.name, storage_dir)
            return self._info(spec)

    def _used_macs(self) -> set[str]:
        macs: set[str] = set()
        for name in self._registry():
            try:
                macs.update(n.mac for n in self._spec(name).nics)
            except HostError:
                continue
        return macs

    @staticmethod
    def _new_mac(used: set[str]) -> str:
        rng = random.SystemRandom()
        while True:
            mac = "52:54:00:" + ":".join(f"{rng.randrange(256):02x}" for _ in range(3))
            if mac not in used:
                return mac

    async def delete(self, name: str) -> None:
        """Delete an off, saved or crashed VM: its configuration, disks and saved state."""
        async with self._op_lock(name):
            spec = self._spec(name)
            rt = self._runtime(spec)
            state = self._state(spec, rt)
            if state not in (VMState.OFF, VMState.SAVED, VMState.CRASHED):
                raise ConflictError(
                    f"VM {name!r} is {state.value}",
                    field="name",
                    fix=f"stop it first: ferry vm stop {name}",
                )
            _delete_files(spec)
            self._forget(spec)
            self._locks.pop(name, None)

    # -- start / stop ----------------------------------------------------------------------
    def _qemu_config(self, spec: VMSpec, incoming: bool, start_paused: bool = True) -> QemuConfig:
        settings = self._settings()
        kernel = initrd = None
        append = None
        if spec.boot.kind == "probe":
            from vmferry.guest import guest_cmdline

            kernel, initrd = self._image()
            p = spec.probe
            append = guest_cmdline(
                p.ip if p else None,
                list(p.roles) if p else ["heartbeat", "udpecho", "tcpecho", "power"],
                gateway=p.gateway if p else None,
                hostname=spec.name,
                dirty=p.dirty if p else None,
                disk="/dev/vda" if spec.disks else None,
            )
        elif spec.boot.kind == "kernel":
            kernel = Path(spec.boot.kernel or "")
            initrd = Path(spec.boot.initrd) if spec.boot.initrd else None
            append = spec.boot.cmdline
        tag = spec.uuid.replace("-", "")[:8]
        return QemuConfig(
            name=spec.name,
            uuid=spec.uuid,
            memory_mib=spec.memory_mib,
            vcpus=spec.vcpus,
            cpu_model=spec.cpu_model,
            accel=settings.accelerator,
            run_dir=self._run_dir(spec),
            socket_dir=self._sock_dir(spec),
            kernel=kernel,
            initrd=initrd,
            append=append,
            disks=tuple(
                DiskDrive(node=f"drv-{d.name}", path=Path(spec.storage_dir) / d.file, fmt=d.fmt)
                for d in spec.disks
            ),
            nics=tuple(
                NetTap(id=f"net{i}", ifname=f"vf{tag}n{i}", mac=n.mac)
                for i, n in enumerate(spec.nics)
            ),
            incoming=incoming,
            start_paused=start_paused,
        )

    async def _launch(
        self, spec: VMSpec, incoming: bool, start_paused: bool = True
    ) -> tuple[QemuConfig, Runtime]:
        """Start QEMU paused (``-S``) with taps bridged; the caller resumes or migrates in."""
        settings = self._settings()
        if spec.memory_mib > self.free_memory_mib():
            raise InsufficientResourcesError(
                f"VM {spec.name!r} needs {spec.memory_mib} MiB, the host has "
                f"{self.free_memory_mib()} MiB free",
                field="memory_mib",
                fix="stop another VM or lower the VM's memory",
            )
        for nic in spec.nics:
            sw = settings.switches.get(nic.switch)
            if sw is None:
                raise RefusedError(
                    f"virtual switch {nic.switch!r} no longer exists on this host",
                    field="nics.switch",
                    fix="ferry host set --switch NAME=BRIDGE",
                )
            await asyncio.to_thread(network.ensure_switch, sw.bridge, sw.uplink)
        cfg = await asyncio.to_thread(self._qemu_config, spec, incoming, start_paused)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        cfg.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sock in (cfg.qmp_socket, cfg.diag_socket):
            sock.unlink(missing_ok=True)
        try:
            proc = await asyncio.to_thread(spawn_daemon, build_argv(cfg), cfg.pidfile)
        except QemuStartError as exc:
            raise HostError(f"QEMU failed to start VM {spec.name!r}: {exc}") from exc
        rt = self._runtime(spec)
        rt.pid, rt.start_time = proc.pid, proc.start_time
        rt.expected = VMState.STARTING.value
        rt.taps = [n.ifname for n in cfg.nics]
        rt.crashed_at = None
        self._save_runtime(spec, rt)
        try:
            await wait_for_socket(cfg.qmp_socket, 10)
            for nic, tap in zip(spec.nics, cfg.nics, strict=True):
                sw = settings.switches[nic.switch]
                await asyncio.to_thread(network.attach_tap, tap.ifname, sw.bridge)
        except BaseException:
            proc.kill()
            rt.expected = VMState.OFF.value
            self._save_runtime(spec, rt)
            raise
        return cfg, rt

    async def start(self, name: str) -> VMInfo:
        """Boot an off or crashed VM; a saved VM is restored instead."""
        spec = self._spec(name)
        if self._state(spec, self._runtime(spec)) is VMState.SAVED:
            return await self.restore(name)
        async with self._op_lock(name):
            spec = self._spec(name)
            rt = self._runtime(spec)
            state = self._state(spec, rt)
            if state not in (VMState.OFF, VMState.CRASHED):
                raise ConflictError(f"VM {name!r} is already {state.value}", field="name")
            self._busy[name] = VMState.STARTING
            try:
                cfg, rt = await self._launch(spec, incoming=False)
                try:
                    async with qmp_session(cfg.qmp_socket) as q:
                        await q.execute("cont")
                except QmpError as exc:
                    self._kill(spec, rt)
                    raise HostError(f"VM {name!r} did not start: {exc}") from exc
                rt.expected = VMState.RUNNING.value
                rt.started_at = time.time()
                self._save_runtime(spec, rt)
            finally:
                self._busy.pop(name, None)
            log.info("started VM %s (pid %s)", name, rt.pid)
            return self._info(spec)

    def _kill(self, spec: VMSpec, rt: Runtime) -> None:
        proc = rt.process()
        if proc is not None:
            proc.kill()
        rt.expected = VMState.OFF.value
        rt.started_at = None
        self._save_runtime(spec, rt)

    async def _require(self, name: str, *states: VMState) -> tuple[VMSpec, Runtime]:
        spec = self._spec(name)
        rt = self._runtime(spec)
        state = self._state(spec, rt)
        if state not in states:
            want = " or ".join(s.value for s in states)
            raise ConflictError(f"VM {name!r} is {state.value}; this needs it {want}", field="name")
        return spec, rt

    async def stop(self, name: str) -> VMInfo:
        """Turn the VM off at once (like pulling the plug)."""
        async with self._op_lock(name):
            spec, rt = await self._require(
                name, VMState.RUNNING, VMState.PAUSED, VMState.CRASHED, VMState.STARTING
            )
            self._busy[name] = VMState.STOPPING
            try:
                await self._quit(spec, rt)
            finally:
                self._busy.pop(name, None)
            return self._info(spec)

    async def _quit(self, spec: VMSpec, rt: Runtime) -> None:
        proc = rt.process()
        if proc is not None and proc.alive():
            try:
                async with qmp_session(self._qmp_path(spec), timeout=3) as q:
                    await q.execute("quit")
            except QmpError as exc:
                log.warning("VM %s: QMP quit failed (%s); killing QEMU", spec.name, exc)
            if not await asyncio.to_thread(proc.wait_gone, 5.0):
                proc.kill()
        rt.expected = VMState.OFF.value
        rt.started_at = None
        self._save_runtime(spec, rt)

    async def shutdown(self, name: str, timeout: float = 60.0) -> VMInfo:
        """ACPI power-button shutdown; turned off by force when the guest ignores it."""
        async with self._op_lock(name):
            spec, rt = await self._require(name, VMState.RUNNING, VMState.PAUSED)
            self._busy[name] = VMState.SHUTTING_DOWN
            sock = self._qmp_path(spec)
            try:
                graceful = False
                try:
                    async with qmp_session(sock) as q:
                        if await q.status() == "paused":
                            await q.execute("cont")
                        deadline = time.monotonic() + timeout
                        next_press = 0.0
                        while time.monotonic() < deadline:
                            # Press the button again now and then: a guest still booting
                            # may not have been listening the first time.
                            if time.monotonic() >= next_press:
                                await q.execute("system_powerdown")
                                next_press = time.monotonic() + 5.0
                            if await q.status() == "shutdown":
                                graceful = True
                                break
                            await asyncio.sleep(0.2)
                except QmpError as exc:
                    log.warning("VM %s: ACPI shutdown failed: %s", name, exc)
                if not graceful:
                    log.warning(
                        "VM %s ignored the ACPI shutdown for %.0f s; forcing", name, timeout
                    )
                await self._quit(spec, rt)
            finally:
                self._busy.pop(name, None)
            return self._info(spec)

    async def pause(self, name: str) -> VMInfo:
        """Freeze the VM's vCPUs (it keeps its memory)."""
        async with self._op_lock(name):
            spec, rt = await self._require(name, VMState.RUNNING)
            await self._qmp(spec, "stop")
            rt.expected = VMState.PAUSED.value
            self._save_runtime(spec, rt)
            return self._info(spec)

    async def resume(self, name: str) -> VMInfo:
        """Continue a paused VM."""
        async with self._op_lock(name):
            spec, rt = await self._require(name, VMState.PAUSED)
            await self._qmp(spec, "cont")
            rt.expected = VMState.RUNNING.value
            self._save_runtime(spec, rt)
            return self._info(spec)

    async def _qmp(self, spec: VMSpec, cmd: str, args: dict[str, Any] | None = None) -> Any:
        try:
            async with qmp_session(self._qmp_path(spec)) as q:
                return await q.execute(cmd, args)
        except QmpError as exc:
            raise HostError(f"VM {spec.name!r}: {exc}") from exc

    # -- save / restore --------------------------------------------------------------------
    async def save(self, name: str) -> VMInfo:
        """Write the VM's memory and device state to its storage folder and turn it off."""
        async with self._op_lock(name):
            spec, rt = await self._require(name, VMState.RUNNING, VMState.PAUSED)
            was_paused = self._state(spec, rt) is VMState.PAUSED
            final = state_file(spec)
            tmp = final.with_suffix(".tmp")
            self._busy[name] = VMState.SAVING
            try:
                async with qmp_session(self._qmp_path(spec)) as q:
                    if not was_paused:
                        await q.execute("stop")
                    try:
                        with open(tmp, "wb") as fh:
                            await q.execute(
                                "migrate-set-parameters", {"max-bandwidth": UNLIMITED_BPS}
                            )
                            # A plain one-pass stream, whatever an earlier (failed) live move
                            # of this QEMU turned on.
                            await q.execute("migrate-set-capabilities", all_off())
                            await q.send_fd(fh.fileno(), "savestate")
                            await q.execute("migrate", {"uri": "fd:savestate"})
                            await _wait_migration(q, timeout=600)
                            fh.flush()
                            os.fsync(fh.fileno())
                    except BaseException:
                        tmp.unlink(missing_ok=True)
                        if not was_paused:
                            await q.execute("cont")
                        raise
                os.replace(tmp, final)
                await self._quit(spec, rt)
                rt.expected = VMState.SAVED.value
                rt.saved_paused = was_paused
                self._save_runtime(spec, rt)
            except QmpError as exc:
                raise HostError(f"saving VM {name!r} failed: {exc}; it keeps running") from exc
            finally:
                self._busy.pop(name, None)
            log.info("saved VM %s to %s", name, final)
            return self._info(spec)

    async def restore(self, name: str) -> VMInfo:
        """Bring a saved VM back exactly where it was (no reboot); the state file is consumed."""
        async with self._op_lock(name):
            spec, rt = await self._require(name, VMState.SAVED)
            saved = state_file(spec)
            if not saved.exists():
                raise HostError(
                    f"saved state of VM {name!r} is missing ({saved})",
                    fix=f"discard it with: ferry vm delete {name}, or start it from off",
                )
            self._busy[name] = VMState.RESTORING
            try:
                cfg, rt = await self._launch(spec, incoming=True)
                try:
                    async with qmp_session(cfg.qmp_socket) as q:
                        with open(saved, "rb") as fh:
                            await q.send_fd(fh.fileno(), "loadstate")
                            await q.execute("migrate-incoming", {"uri": "fd:loadstate"})
                            await _wait_migration(q, timeout=600)
                        if not rt.saved_paused:
                            await q.execute("cont")
                except QmpError as exc:
                    self._kill(spec, rt)
                    rt.expected = VMState.SAVED.value
                    self._save_runtime(spec, rt)
                    raise HostError(
                        f"restoring VM {name!r} failed: {exc}; its saved state is kept"
                    ) from exc
                rt.expected = (VMState.PAUSED if rt.saved_paused else VMState.RUNNING).value
                rt.started_at = time.time()
                self._save_runtime(spec, rt)
                saved.unlink(missing_ok=True)
            finally:
                self._busy.pop(name, None)
            log.info("restored VM %s", name)
            return self._info(spec)

    # -- primitives for moves (used by the migration layer) -------------------------------
    def spec(self, name: str) -> VMSpec:
        """The stored configuration of a VM."""
        return self._spec(name)

    def qmp_path(self, name: str) -> Path:
        """The agent's QMP socket of a VM."""
        return self._qmp_path(self._spec(name))

    def diag_qmp_path(self, name: str) -> Path:
        """The VM's second QMP socket (diagnostics, and out-of-band commands during moves)."""
        return self._sock_dir(self._spec(name)) / "qmp-diag.sock"

    def process(self, name: str) -> QemuProcess | None:
        """The VM's recorded QEMU process (alive or not)."""
        return self._runtime(self._spec(name)).process()

    def started_at(self, name: str) -> float | None:
        """When the VM's guest was last started (kept across moves for its uptime)."""
        return self._runtime(self._spec(name)).started_at

    def lock(self, name: str) -> asyncio.Lock:
        """The per-VM lock every lifecycle operation holds."""
        return self._lock(name)

    def set_busy(self, name: str, state: VMState | None) -> None:
        """Show a transitional state (e.g. migrating) instead of the recorded one."""
        if state is None:
            self._busy.pop(name, None)
        else:
            self._busy[name] = state

    def state(self, name: str) -> VMState:
        """The VM's current state."""
        spec = self._spec(name)
        return self._state(spec, self._runtime(spec))

    def register_incoming(self, spec: VMSpec, write_config: bool) -> None:
        """Register a VM arriving by migration (hidden from start/stop until committed)."""
        reg = self._registry()
        if spec.name in reg:
            raise ConflictError(
                f"a VM named {spec.name!r} already exists on this host", field="name"
            )
        cfg = Path(spec.storage_dir) / CONFIG_FILE
        if write_config:
            _write_spec(cfg, spec)
        else:
            self._pending[spec.name] = spec
        reg[spec.name] = str(cfg)
        self._write_registry(reg)
        self._save_runtime(spec, Runtime(expected=VMState.INCOMING.value))

    async def launch_incoming(self, name: str) -> QemuConfig:
        """Start the destination QEMU waiting for the stream (``-incoming defer``).

        It is not started with ``-S``: QEMU resumes the guest the moment the last
        bytes arrive, which keeps the guest's blackout short.
        """
        spec = self._spec(name)
        cfg, rt = await self._launch(spec, incoming=True, start_paused=False)
        rt.expected = VMState.INCOMING.value
        self._save_runtime(spec, rt)
        return cfg

    def commit_incoming(self, name: str, paused: bool, started_at: float | None) -> VMInfo:
        """The VM now runs here: record it as running (or paused)."""
        spec = self._spec(name)
        if self._pending.pop(name, None) is not None:
            _write_spec(Path(spec.storage_dir) / CONFIG_FILE, spec)
        rt = self._runtime(spec)
        rt.expected = (VMState.PAUSED if paused else VMState.RUNNING).value
        rt.started_at = started_at or time.time()
        self._save_runtime(spec, rt)
        self._claim(spec)
        return self._info(spec)

    def discard_incoming(self, name: str, files: Sequence[Path]) -> None:
        """Undo an incoming VM: kill its QEMU, forget it, delete the files made for it."""
        try:
            spec = self._spec(name)
        except NotFoundError:
            return
        rt = self._runtime(spec)
        if rt.expected != VMState.INCOMING.value:
            raise ConflictError(f"VM {name!r} is not an incoming VM; refusing to discard it")
        proc = rt.process()
        if proc is not None:
            proc.kill()
        for f in files:
            f.unlink(missing_ok=True)
        self._forget(spec)
        self._pending.pop(name, None)

    def _forget(self, spec: VMSpec) -> None:
        shutil.rmtree(self._run_dir(spec), ignore_errors=True)
        shutil.rmtree(self._sock_dir(spec), ignore_errors=True)
        reg = self._registry()
        reg.pop(spec.name, None)
        self._write_registry(reg)

    async def release(self, name: str, delete_files: bool) -> None:
        """The VM now runs elsewhere: stop the source QEMU, forget the VM, maybe delete files."""
        spec = self._spec(name)
        rt = self._runtime(spec)
        await self._quit(spec, rt)
        if delete_files:
            _delete_files(spec)
        self._forget(spec)
        self._busy.pop(name, None)

    def config_path(self, name: str) -> Path:
        """Where the VM's configuration file is."""
        self._spec(name)
        return Path(self._registry()[name])

    def relocate(self, name: str, spec: VMSpec) -> None:
        """Point the VM at its moved files (storage moves): write ``spec`` (same VM, new paths)
        atomically in its storage folder, re-register it there, then drop the old config file."""
        old = self._spec(name)
        if spec.uuid != old.uuid or spec.name != name:
            raise ConflictError(f"relocate: {spec.name!r} is not VM {name!r}", field="name")
        new_cfg = Path(spec.storage_dir) / CONFIG_FILE
        _write_spec(new_cfg, spec)
        reg = self._registry()
        old_cfg = Path(reg[name])
        owner = read_owner(old_cfg.parent) if old_cfg.parent != new_cfg.parent else None
        if owner is not None:  # the owner record travels with the configuration
            write_owner(new_cfg.parent, owner)
        reg[name] = str(new_cfg)
        self._write_registry(reg)
        if old_cfg != new_cfg:
            old_cfg.unlink(missing_ok=True)
        if owner is not None:
            (old_cfg.parent / OWNER_FILE).unlink(missing_ok=True)

    # -- shared-volume ownership: import and hand-over (ferry vm import, quick moves) -----
    def _claim(self, spec: VMSpec, url: str | None = None) -> None:
        """Record this host as the VM's owner (``owner.json`` beside ``vm.json``)."""
        sdir = Path(spec.storage_dir)
        here = self._settings().name
        old = read_owner(sdir)
        if url is None and old is not None and old.host == here:
            url = old.url
        try:
            write_owner(sdir, OwnerRecord(host=here, uuid=spec.uuid, url=url))
        except OSError as exc:
            log.warning("VM %s: cannot write its owner record in %s: %s", spec.name, sdir, exc)

    def _release_record(self, spec: VMSpec, saved_paused: bool) -> None:
        rec = OwnerRecord(host=self._settings().name, uuid=spec.uuid, released=True,
                          saved_paused=saved_paused)  # fmt: skip
        write_owner(Path(spec.storage_dir), rec)

    def import_candidate(self, path: str) -> tuple[VMSpec, OwnerRecord | None]:
        """The VM whose folder (or ``vm.json``) is at ``path``, checked for import; changes nothing.

        Refuses paths outside the storage roots, folders without a VM configuration, disks
        outside the roots or missing, and a VM whose name or uuid is already registered here.
        The returned spec points at the folder as this host sees it.
        """
        roots = self._settings().storage_roots
        target = resolve_under_roots(path, roots, "path")
        sdir = target.parent if target.name == CONFIG_FILE else target
        cfg = sdir / CONFIG_FILE
        if not cfg.is_file():
            raise RefusedError(
                f"path: no VM configuration ({CONFIG_FILE}) in {sdir}",
                field="path",
                fix="give the VM's folder on the shared volume (the one holding vm.json)",
            )
        try:
            spec = VMSpec.model_validate_json(cfg.read_text())
        except ValueError as exc:
            raise RefusedError(
                f"path: {cfg} is not a vmferry VM configuration",
                field="path",
                fix="give the folder of a VM vmferry created",
            ) from exc
        reg = self._registry()
        if spec.name in reg:
            same = Path(reg[spec.name]) == cfg
            raise ConflictError(
                f"VM {spec.name!r} is already registered on this host"
                if same
                else f"a VM named {spec.name!r} is already registered on this host",
                field="path",
                fix="nothing to import" if same else "delete or rename that VM here first",
            )
        for other in reg:
            with contextlib.suppress(HostError):
                if self._spec(other).uuid == spec.uuid:
                    raise ConflictError(
                        f"this VM (uuid {spec.uuid}) is already registered here as {other!r}",
                        field="path",
                        fix="nothing to import",
                    )
        if Path(spec.storage_dir) != sdir:
            spec = spec.model_copy(update={"storage_dir": str(sdir)})
        for d in spec.disks:
            disk = resolve_under_roots(str(sdir / d.file), roots, f"disks[{d.name}]")
            if not disk.is_file():
                raise RefusedError(
                    f"disk {d.name} of VM {spec.name!r} is missing: {disk}",
                    field="path",
                    fix="bring the disk back, or delete the VM from the host that has it",
                )
        resolve_under_roots(str(state_file(spec).parent), roots, "state_dir")
        return spec, read_owner(sdir)

    def disk_locks(self, spec: VMSpec) -> Sequence[str]:
        """The VM's disks that some QEMU holds open (QEMU's image locks), as "disk (file): why"."""
        paths = {d.name: Path(spec.storage_dir) / d.file for d in spec.disks}
        held = {n: image_lock_holder(p) for n, p in paths.items()}
        return [f"{n} ({paths[n]}): {why}" for n, why in held.items() if why]

    def register_import(
        self,
        spec: VMSpec,
        owner: OwnerRecord | None,
        *,
        paused: bool | None = None,
        url: str | None = None,
        switch_map: dict[str, str] | None = None,
    ) -> VMInfo:
        """Register a VM checked by :meth:`import_candidate` and claim it: off, or saved.

        A saved VM is restored paused when ``paused`` (default: what the owner record says).
        """
        settings = self._settings()
        reg = self._registry()
        if spec.name in reg:
            raise ConflictError(
                f"a VM named {spec.name!r} is already registered on this host",
                field="path",
                fix="delete or rename that VM here first",
            )
        if switch_map:
            nics = [NicSpec(switch=switch_map.get(n.switch, n.switch), mac=n.mac)
                    for n in spec.nics]  # fmt: skip
            spec = spec.model_copy(update={"nics": nics})
        used = self._used_macs()
        for i, nic in enumerate(spec.nics):
            if nic.switch not in settings.switches:
                known = ", ".join(sorted(settings.switches)) or "none"
                raise RefusedError(
                    f"nics[{i}].switch: no virtual switch named {nic.switch!r} on this host "
                    f"(switches: {known})",
                    field=f"nics[{i}].switch",
                    fix="ferry host set --switch NAME=BRIDGE adds one",
                )
            if nic.mac in used:
                raise ConflictError(f"nics[{i}].mac {nic.mac} is already used on this host",
                                    field=f"nics[{i}].mac",
                                    fix="change the MAC of the VM that uses it")  # fmt: skip
        cfg = Path(spec.storage_dir) / CONFIG_FILE
        if VMSpec.model_validate_json(cfg.read_text()) != spec:
            _write_spec(cfg, spec)
        if paused is None:
            paused = owner.saved_paused if owner is not None else False
        saved = state_file(spec).exists()
        reg[spec.name] = str(cfg)
        self._write_registry(reg)
        self._save_runtime(
            spec, Runtime(expected=(VMState.SAVED if saved else VMState.OFF).value,
                          saved_paused=paused and saved),
        )  # fmt: skip
        self._claim(spec, url)
        log.info("imported VM %s from %s (%s)", spec.name, spec.storage_dir,
                 "saved" if saved else "off")  # fmt: skip
        return self._info(spec)

    def unregister_import(self, name: str) -> None:
        """Undo an import (the restore after it failed): forget the VM, release it, keep files."""
        spec = self._spec(name)
        rt = self._runtime(spec)
        proc = rt.process()
        if proc is not None and proc.alive():
            raise ConflictError(f"VM {name!r} runs here; refusing to give it up", field="name")
        self._forget(spec)
        self._busy.pop(name, None)
        self._release_record(spec, rt.saved_paused)

    async def hand_over(self, name: str) -> None:
        """Let another host take an off or saved VM over from the shared volume.

        Marks the owner record released (with whether a saved state is to be restored paused)
        and forgets the VM here; its files stay.
        """
        spec = self._spec(name)
        rt = self._runtime(spec)
        proc = rt.process()
        if proc is not None and proc.alive():
            raise ConflictError(f"VM {name!r} still runs here; save or stop it first",
                                field="name")  # fmt: skip
        self._release_record(spec, rt.saved_paused)
        await self.release(name, delete_files=False)

    # -- fencing (cluster/member.py) -------------------------------------------------------
    async def fence(self, name: str) -> bool:
        """Kill the VM's QEMU at once (SIGKILL), whatever it is doing: its node lost its lease.

        Takes no lock, because fencing must not wait for an operation in progress; marks the
        VM off so the monitor does not call it crashed. True if a running QEMU was killed.
        """
        spec = self._spec(name)
        rt = self._runtime(spec)
        proc = rt.process()
        killed = proc is not None and proc.alive()
        if proc is not None:
            await asyncio.to_thread(proc.kill)
        rt.expected = VMState.OFF.value
        rt.started_at = None
        self._save_runtime(spec, rt)
        log.warning("VM %s fenced (QEMU pid %s killed: %s)", name, rt.pid, killed)
        return killed

    # -- failover (cluster/member.py) ------------------------------------------------------
    def forget_taken_over(self, name: str) -> str | None:
        """Unregister a VM (keeping its files) that another host has taken over; who did.

        Only when its QEMU is not running here and its owner record on the shared volume names
        another host that did not release it (a failover imported it there). Otherwise None.
        """
        try:
            spec = self._spec(name)
        except (NotFoundError, HostError):
            return None
        proc = self._runtime(spec).process()
        if proc is not None and proc.alive():
            return None
        owner = read_owner(Path(spec.storage_dir))
        here = self._settings().name
        if owner is None or owner.host == here or owner.released or owner.uuid != spec.uuid:
            return None
        self._forget(spec)
        self._busy.pop(name, None)
        log.warning("VM %s now belongs to %s: unregistered here, files kept", name, owner.host)
        return owner.host

    # -- monitor ---------------------------------------------------------------------------
    def start_monitor(self, interval: float = 1.0) -> None:
        """Watch for guests that powered off and QEMUs that died."""
        self._monitor = asyncio.get_running_loop().create_task(self._watch(interval))

    async def stop_monitor(self) -> None:
        """Stop watching (VMs keep running)."""
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor

    def on_guest_power_off(self, hook: PowerOffHook) -> None:
        """Call ``hook(name)`` after a guest powered itself off (its OS shut down, or the ACPI
        button pressed by another tool) and the monitor stopped its QEMU; not for a stop or
        shutdown asked of ferry, nor for a QEMU that died. A failing hook is logged."""
        self._power_off_hooks.append(hook)

    async def _watch(self, interval: float) -> None:
        while True:
            for name in list(self._registry()):
                try:
                    await self._check(name)
                except Exception as exc:  # the watcher must never die
                    log.warning("monitor: VM %s: %s", name, exc)
            await asyncio.sleep(interval)

    async def _check(self, name: str) -> None:
        lock = self._lock(name)
        if lock.locked():
            return
        async with lock:
            spec = self._spec(name)
            rt = self._runtime(spec)
            if rt.expected not in (VMState.RUNNING.value, VMState.PAUSED.value):
                return
            proc = rt.process()
            if proc is None or not proc.alive():
                if rt.crashed_at is None:
                    rt.crashed_at = time.time()
                    self._save_runtime(spec, rt)
                    log.error("VM %s crashed: QEMU pid %s is gone", name, rt.pid)
                    self.events.record("vm-crashed", f"VM {name} crashed: its QEMU (pid "
                                       f"{rt.pid}) is gone", level="error", vm=name)  # fmt: skip
                return
            try:
                async with qmp_session(self._qmp_path(spec), timeout=3) as q:
                    status = await q.status()
            except QmpError:
                return
            if status != "shutdown":
                return
            log.info("VM %s powered itself off", name)
            await self._quit(spec, rt)
            self.events.record("vm-powered-off", f"VM {name} powered itself off", vm=name)
        for hook in self._power_off_hooks:
            try:
                await hook(name)
            except Exception as exc:  # the monitor goes on with the other VMs
                log.warning("VM %s: after its power-off: %s", name, exc)


def _delete_files(spec: VMSpec) -> None:
    """Delete a VM's disks, saved state and configuration, and its folder once empty."""
    sdir = Path(spec.storage_dir)
    for d in spec.disks:
        (sdir / d.file).unlink(missing_ok=True)
    state_file(spec).unlink(missing_ok=True)
    (sdir / CONFIG_FILE).unlink(missing_ok=True)
    (sdir / OWNER_FILE).unlink(missing_ok=True)
    try:
        sdir.rmdir()
    except OSError:
        log.info("left %s in place: it holds other files", sdir)


def _write_spec(path: Path, spec: VMSpec) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(spec.model_dump_json(indent=2))
    os.replace(tmp, path)


async def _wait_migration(q: QmpSession, timeout: float) -> None:
    """Poll query-migrate until the save/restore stream completes; raise on failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await q.execute("query-migrate")
        status = info.get("status", "none")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise QmpError(f"migration stream {status}: {info.get('error-desc', 'no detail')}")
        await asyncio.sleep(0.05)
    raise QmpError(f"migration stream did not finish within {timeout:.0f} s")


async def _run(argv: list[str]) -> None:
    done = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise HostError(f"{argv[0]} failed: {done.stderr.strip() or done.returncode}")
