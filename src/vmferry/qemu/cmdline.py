"""Build a QEMU command line from a typed description of the machine."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

QEMU_BINARY = "qemu-system-x86_64"
#: A versioned machine type, pinned so both ends of a migration agree.
DEFAULT_MACHINE = "pc-q35-7.2"


@dataclass(frozen=True)
class DiskDrive:
    """A disk image attached as a virtio-blk device under block node ``node``."""

    node: str
    path: Path
    fmt: str = "qcow2"


@dataclass(frozen=True)
class NetTap:
    """A virtio-net NIC backed by a tap device QEMU creates (the agent bridges it)."""

    id: str
    ifname: str
    mac: str


@dataclass(frozen=True)
class QemuConfig:
    """Everything needed to start one QEMU process."""

    name: str
    uuid: str
    memory_mib: int
    vcpus: int
    cpu_model: str
    accel: str
    run_dir: Path
    socket_dir: Path
    machine: str = DEFAULT_MACHINE
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    disks: tuple[DiskDrive, ...] = ()
    nics: tuple[NetTap, ...] = ()
    incoming: bool = False
    start_paused: bool = True
    extra: tuple[str, ...] = field(default=())

    @property
    def qmp_socket(self) -> Path:
        """The agent's QMP socket (one client at a time)."""
        return self.socket_dir / "qmp.sock"

    @property
    def diag_socket(self) -> Path:
        """A second QMP socket, free for diagnostics."""
        return self.socket_dir / "qmp-diag.sock"

    @property
    def pidfile(self) -> Path:
        """Where QEMU writes its pid after daemonizing."""
        return self.run_dir / "qemu.pid"

    @property
    def serial_log(self) -> Path:
        """The guest's serial console, appended to across restarts."""
        return self.run_dir / "serial.log"

    @property
    def qemu_log(self) -> Path:
        """QEMU's own diagnostic log."""
        return self.run_dir / "qemu.log"


def _blockdev(drive: DiskDrive) -> str:
    spec = {
        "driver": drive.fmt,
        "node-name": drive.node,
        "discard": "unmap",
        "file": {
            "driver": "file",
            "filename": str(drive.path),
            "node-name": f"{drive.node}-file",
            "cache": {"direct": False},
        },
    }
    return json.dumps(spec, separators=(",", ":"))


def build_argv(cfg: QemuConfig, binary: str = QEMU_BINARY) -> list[str]:
    """Return the argv that starts ``cfg`` as a daemonized QEMU with two QMP sockets."""
    argv = [
        binary,
        "-name",
        f"guest={cfg.name},debug-threads=on",
        "-uuid",
        cfg.uuid,
        "-machine",
        f"{cfg.machine},accel={cfg.accel}",
        "-cpu",
        cfg.cpu_model,
        "-m",
        str(cfg.memory_mib),
        "-smp",
        str(cfg.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-vga",
        "none",
        "-no-shutdown",
        "-msg",
        "timestamp=on",
        "-chardev",
        f"file,id=serial0,path={cfg.serial_log},append=on",
        "-serial",
        "chardev:serial0",
        "-qmp",
        f"unix:{cfg.qmp_socket},server=on,wait=off",
        "-qmp",
        f"unix:{cfg.diag_socket},server=on,wait=off",
        "-pidfile",
        str(cfg.pidfile),
        "-D",
        str(cfg.qemu_log),
        "-daemonize",
    ]
    if cfg.start_paused:
        argv.append("-S")
    if cfg.kernel is not None:
        argv += ["-kernel", str(cfg.kernel)]
        if cfg.initrd is not None:
            argv += ["-initrd", str(cfg.initrd)]
        if cfg.append:
            argv += ["-append", cfg.append]
    for i, drive in enumerate(cfg.disks):
        argv += ["-blockdev", _blockdev(drive)]
        dev = f"virtio-blk-pci,drive={drive.node},id=vd-{drive.node}"
        if i == 0 and cfg.kernel is None:
            dev += ",bootindex=1"
        argv += ["-device", dev]
    for nic in cfg.nics:
        argv += [
            "-netdev",
            f"tap,id={nic.id},ifname={nic.ifname},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev={nic.id},mac={nic.mac},id=dev-{nic.id}",
        ]
    if cfg.incoming:
        argv += ["-incoming", "defer"]
    argv += list(cfg.extra)
    return argv
