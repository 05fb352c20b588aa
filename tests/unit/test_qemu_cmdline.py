"""The QEMU command line carries what the agent relies on."""

import json
from pathlib import Path

from vmferry.qemu import DiskDrive, NetTap, QemuConfig, build_argv


def _cfg(**kw: object) -> QemuConfig:
    base: dict[str, object] = dict(
        name="vm1", uuid="00000000-0000-0000-0000-000000000001", memory_mib=256, vcpus=1,
        cpu_model="qemu64", accel="tcg", run_dir=Path("/var/x"), socket_dir=Path("/run/x"),
    )  # fmt: skip
    base.update(kw)
    return QemuConfig(**base)  # type: ignore[arg-type]


def test_daemon_two_qmp_sockets_and_pinned_machine() -> None:
    argv = build_argv(_cfg())
    assert "-daemonize" in argv and "-no-shutdown" in argv and "-S" in argv
    assert argv.count("-qmp") == 2
    assert argv[argv.index("-machine") + 1] == "pc-q35-7.2,accel=tcg"


def test_disk_path_with_comma_is_safe() -> None:
    argv = build_argv(_cfg(disks=(DiskDrive("drv-d0", Path("/s/a,b.qcow2")),)))
    spec = json.loads(argv[argv.index("-blockdev") + 1])
    assert spec["file"]["filename"] == "/s/a,b.qcow2"
    assert spec["node-name"] == "drv-d0"


def test_nic_and_incoming() -> None:
    argv = build_argv(_cfg(nics=(NetTap("net0", "vfabc0", "52:54:00:00:00:01"),), incoming=True))
    assert "tap,id=net0,ifname=vfabc0,script=no,downscript=no" in argv
    assert argv[-2:] == ["-incoming", "defer"]
