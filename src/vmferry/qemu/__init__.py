"""QEMU: the process, its command line and its QMP session. Knows nothing of hosts."""

from vmferry.qemu.cmdline import DiskDrive, NetTap, QemuConfig, build_argv
from vmferry.qemu.process import QemuProcess, pid_start_time, spawn_daemon
from vmferry.qemu.qmp import QmpSession, qmp_session

__all__ = [
    "DiskDrive",
    "NetTap",
    "QemuConfig",
    "QemuProcess",
    "QmpSession",
    "build_argv",
    "pid_start_time",
    "qmp_session",
    "spawn_daemon",
]
