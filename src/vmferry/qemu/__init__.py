"""QEMU: the process, its command line and its QMP session. Knows nothing of hosts."""

from vmferry.qemu.cmdline import DiskDrive, NetTap, QemuConfig, build_argv
from vmferry.qemu.process import QemuProcess, spawn_daemon
from vmferry.qemu.qmp import QmpSession, qmp_session

__all__ = [
    "DiskDrive",
    "NetTap",
    "QemuConfig",
    "QemuProcess",
    "QmpSession",
    "build_argv",
    "qmp_session",
    "spawn_daemon",
]
