"""Destination-side move checks, each failing with a message and a fix (no QEMU needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmferry.host.host import cpu_info
from vmferry.host.settings import HostSettings, SwitchSpec
from vmferry.host.spec import DiskSpec, NicSpec, VMSpec
from vmferry.host.vms import VMManager
from vmferry.migration.incoming import IncomingMoves, migration_addresses, version_tuple
from vmferry.migration.model import IncomingRequest, MoveOptions
from vmferry.migration.slots import Slots
from vmferry.qemu.tls import X509Files


@pytest.fixture
def dest(tmp_path: Path) -> IncomingMoves:
    root = tmp_path / "storage"
    root.mkdir()
    settings = HostSettings(
        name="h2", accelerator="tcg", storage_roots=[str(root)],
        switches={"external": SwitchSpec(bridge="br-ext")},
    )  # fmt: skip
    settings.migration.networks = ["any"]
    vms = VMManager(tmp_path / "state", lambda: settings)
    # The agent's certificate (never read by the checks): moves are encrypted by default.
    tls = X509Files(tmp_path / "h2.crt", tmp_path / "h2.key", tmp_path / "ca.crt")
    return IncomingMoves(vms, lambda: settings, Slots(lambda: 2), tls)


def _req(tmp_path: Path, **kw: object) -> IncomingRequest:
    cpu = cpu_info()
    spec = VMSpec(
        name="vm1", memory_mib=64, vcpus=1, cpu_model=str(kw.pop("cpu_model", "qemu64")),
        storage_dir=str(tmp_path / "elsewhere" / "vm1"),
        disks=[DiskSpec(name="disk0", file="disk0.qcow2", size_mib=16)],
        nics=[NicSpec(switch=str(kw.pop("switch", "external")), mac="52:54:00:00:00:01")],
    )  # fmt: skip
    base: dict[str, object] = dict(
        job_id="j1", source="h1", source_version="0.1.0", spec=spec, options=MoveOptions(),
        transport="tcp", streams=1, postcopy=True, cpu_vendor=cpu["vendor"],
        cpu_flags=cpu["flags"], dry_run=True,
    )  # fmt: skip
    base.update(kw)
    return IncomingRequest.model_validate(base)


def _failed(dest: IncomingMoves, req: IncomingRequest) -> dict[str, str]:
    results, _ = dest.checks(req)
    return {r.name: r.message for r in results if not r.ok}


def test_all_pass_plans_shared_nothing(dest: IncomingMoves, tmp_path: Path) -> None:
    results, plan = dest.checks(_req(tmp_path))
    assert [r.name for r in results if not r.ok] == []
    assert plan is not None and plan.mode == "shared-nothing" and plan.mirrored == ["disk0"]
    assert plan.disks["disk0"].startswith(str(tmp_path / "storage" / "vm1"))


def test_older_destination_refused(dest: IncomingMoves, tmp_path: Path) -> None:
    assert "older" in _failed(dest, _req(tmp_path, source_version="99.0.0"))["agent-version"]


def test_missing_switch_named(dest: IncomingMoves, tmp_path: Path) -> None:
    msg = _failed(dest, _req(tmp_path, switch="internal"))["virtual-switches"]
    assert "internal" in msg and "external" in msg


def test_switch_map_fixes_it(dest: IncomingMoves, tmp_path: Path) -> None:
    req = _req(
        tmp_path, switch="internal", options=MoveOptions(switch_map={"internal": "external"})
    )
    assert "virtual-switches" not in _failed(dest, req)


def test_cpu_vendor_and_features(dest: IncomingMoves, tmp_path: Path) -> None:
    assert "vendor" in _failed(dest, _req(tmp_path, cpu_vendor="SomeOtherVendor"))["cpu-vendor"]
    req = _req(tmp_path, cpu_model="host", cpu_flags=[*cpu_info()["flags"], "imaginary_feature"])
    assert "imaginary_feature" in _failed(dest, req)["cpu-features"]


def test_memory_and_disabled(dest: IncomingMoves, tmp_path: Path) -> None:
    req = _req(tmp_path)
    req.spec.memory_mib = 100_000_000
    assert "MiB needed" in _failed(dest, req)["memory"]
    dest._settings().migration.enabled = False
    assert "disabled" in _failed(dest, _req(tmp_path))["migration-enabled"]


def test_vm_only_needs_shared_storage(dest: IncomingMoves, tmp_path: Path) -> None:
    req = _req(tmp_path, options=MoveOptions(vm_only=True))
    assert "does not see" in _failed(dest, req)["storage"]


def test_storage_path_outside_roots(dest: IncomingMoves, tmp_path: Path) -> None:
    req = _req(tmp_path, options=MoveOptions(storage_path="/etc/x"))
    assert "outside" in _failed(dest, req)["storage"]


def test_migration_addresses_in_network_order() -> None:
    addrs = [("127.0.0.1", "lo"), ("198.18.0.12", "mgmt0"), ("198.18.1.12", "mig0")]
    assert migration_addresses(["198.18.1.0/24", "198.18.0.0/24"], addrs) == [
        "198.18.1.12", "198.18.0.12",
    ]  # fmt: skip
    assert migration_addresses(["any"], addrs) == ["198.18.0.12", "198.18.1.12"]
    assert migration_addresses(["10.99.0.0/16"], addrs) == []


def test_version_tuple() -> None:
    assert version_tuple("0.10.0") > version_tuple("0.9.9")
