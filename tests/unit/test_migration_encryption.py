"""Encrypted data plane without QEMU: trusted networks, the encryption checks on both ends,
QEMU's credentials directory and the QMP arguments that carry TLS."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from vmferry.host.host import cpu_info
from vmferry.host.settings import HostSettings, MigrationSettings, SwitchSpec
from vmferry.host.spec import DiskSpec, NicSpec, VMSpec
from vmferry.host.vms import VMManager
from vmferry.migration import incoming as incoming_mod
from vmferry.migration.engine import Moves
from vmferry.migration.incoming import IncomingMoves
from vmferry.migration.model import Destination, IncomingRequest, MoveOptions, MoveRequest
from vmferry.migration.qemu_ops import TLS_CREDS_ID, nbd_client_args, nbd_server_args
from vmferry.migration.slots import Slots
from vmferry.qemu.tls import X509Files, creds_object, prepare_creds_dir

ADDRS = [("10.9.0.2", "mig0"), ("192.0.2.7", "eth0")]


def _files(tmp_path: Path) -> X509Files:
    d = tmp_path / "pki"
    d.mkdir(exist_ok=True)
    for n, text in (("h2.crt", "CERT"), ("h2.key", "KEY"), ("ca.crt", "CA")):
        (d / n).write_text(text)
    return X509Files(d / "h2.crt", d / "h2.key", d / "ca.crt")


def _settings(tmp_path: Path, trusted: list[str]) -> HostSettings:
    root = tmp_path / "storage"
    root.mkdir(exist_ok=True)
    return HostSettings(
        name="h2", accelerator="tcg", storage_roots=[str(root)],
        switches={"external": SwitchSpec(bridge="br-ext")},
        migration=MigrationSettings(networks=["10.9.0.0/24", "192.0.2.0/24"],
                                    trusted_networks=trusted),
    )  # fmt: skip


def _dest(tmp_path: Path, trusted: list[str], tls: bool = True) -> IncomingMoves:
    s = _settings(tmp_path, trusted)
    vms = VMManager(tmp_path / "state", lambda: s)
    return IncomingMoves(vms, lambda: s, Slots(lambda: 2), _files(tmp_path) if tls else None)


def _req(tmp_path: Path, encryption: bool) -> IncomingRequest:
    cpu = cpu_info()
    spec = VMSpec(
        name="vm1", memory_mib=64, vcpus=1, cpu_model="qemu64",
        storage_dir=str(tmp_path / "elsewhere" / "vm1"),
        disks=[DiskSpec(name="disk0", file="disk0.qcow2", size_mib=16)],
        nics=[NicSpec(switch="external", mac="52:54:00:00:00:01")],
    )  # fmt: skip
    return IncomingRequest(
        job_id="j1", source="h1", source_version="0.1.0", spec=spec,
        options=MoveOptions(encryption=encryption), transport="tcp", streams=1, postcopy=True,
        cpu_vendor=cpu["vendor"], cpu_flags=cpu["flags"], dry_run=True,
    )  # fmt: skip


@pytest.fixture(autouse=True)
def _local_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(incoming_mod, "local_addresses", lambda: ADDRS)


def test_trusted_networks_must_be_migration_networks() -> None:
    ok = MigrationSettings(networks=["10.9.0.0/24"], trusted_networks=["10.9.0.7/24"])
    assert ok.trusted_networks == ["10.9.0.0/24"]
    assert ok.trusted("10.9.0.200") and not ok.trusted("10.9.1.1")
    with pytest.raises(ValidationError, match="not one of the migration networks"):
        MigrationSettings(networks=["10.9.0.0/24"], trusted_networks=["10.8.0.0/24"])
    with pytest.raises(ValidationError, match="'any' cannot be trusted"):
        MigrationSettings(networks=["any"], trusted_networks=["any"])
    assert MigrationSettings().trusted_networks == []  # nothing is trusted by default


def test_destination_encrypts_by_default(tmp_path: Path) -> None:
    results, plan = _dest(tmp_path, []).checks(_req(tmp_path, encryption=True))
    assert [r.name for r in results if not r.ok] == []
    assert plan is not None and plan.encrypted
    assert plan.candidates == ["10.9.0.2", "192.0.2.7"]


def test_destination_without_certificate_refuses_to_encrypt(tmp_path: Path) -> None:
    results, _ = _dest(tmp_path, [], tls=False).checks(_req(tmp_path, encryption=True))
    bad = {r.name: r for r in results if not r.ok}
    assert "no certificate" in bad["encryption"].message
    assert bad["encryption"].fix and "--tls-cert" in bad["encryption"].fix


def test_no_encryption_refused_without_a_trusted_network(tmp_path: Path) -> None:
    results, _ = _dest(tmp_path, []).checks(_req(tmp_path, encryption=False))
    bad = {r.name: r for r in results if not r.ok}
    assert "--no-encryption" in bad["encryption"].message
    assert bad["encryption"].fix and "migration-network add CIDR --trusted" in bad["encryption"].fix


def test_no_encryption_only_over_the_trusted_network(tmp_path: Path) -> None:
    results, plan = _dest(tmp_path, ["10.9.0.0/24"]).checks(_req(tmp_path, encryption=False))
    assert [r.name for r in results if not r.ok] == []
    assert plan is not None and not plan.encrypted
    assert plan.candidates == ["10.9.0.2"]  # the untrusted 192.0.2.0/24 is never offered


def _source(tmp_path: Path, trusted: list[str], tls: bool = True) -> Moves:
    s = _settings(tmp_path, trusted)
    vms = VMManager(tmp_path / "state", lambda: s)
    return Moves(vms, lambda: s, Slots(lambda: 2), tmp_path / "state",
                 lambda d: None, _files(tmp_path) if tls else None)  # type: ignore[arg-type,return-value]  # fmt: skip


def _move(encryption: bool) -> MoveRequest:
    return MoveRequest(destination=Destination(name="h3", url="https://198.18.0.13:7443"),
                       options=MoveOptions(encryption=encryption))  # fmt: skip


def test_source_encryption_check(tmp_path: Path) -> None:
    assert _source(tmp_path, [])._encryption_check(_move(True)).ok
    no_cert = _source(tmp_path, [], tls=False)._encryption_check(_move(True))
    assert not no_cert.ok and no_cert.fix and "--tls-cert" in no_cert.fix
    clear = _source(tmp_path, [])._encryption_check(_move(False))
    assert not clear.ok and clear.fix and "--trusted" in clear.fix
    assert _source(tmp_path, ["192.0.2.0/24"])._encryption_check(_move(False)).ok


def test_creds_dir_has_qemu_names_and_private_keys(tmp_path: Path) -> None:
    files = _files(tmp_path)
    d = prepare_creds_dir(files, tmp_path / "state" / "tls" / "qemu")
    assert {p.name for p in d.iterdir()} == {
        "ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem",
        "dh-params.pem",
    }  # fmt: skip
    assert (d / "server-key.pem").read_text() == "KEY" and (d / "ca-cert.pem").read_text() == "CA"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for key in ("server-key.pem", "client-key.pem"):
        assert stat.S_IMODE((d / key).stat().st_mode) == 0o600
    (tmp_path / "pki" / "h2.crt").write_text("RENEWED")
    prepare_creds_dir(files, d)  # the next move picks a renewed certificate up
    assert (d / "client-cert.pem").read_text() == "RENEWED"


def test_qmp_arguments_carry_tls(tmp_path: Path) -> None:
    obj = creds_object("c1", tmp_path, "server")
    assert obj["qom-type"] == "tls-creds-x509" and obj["verify-peer"] is True
    assert obj["endpoint"] == "server" and obj["dir"] == str(tmp_path)
    assert nbd_server_args("10.9.0.2", 49153, True)["tls-creds"] == TLS_CREDS_ID
    assert "tls-creds" not in nbd_server_args("10.9.0.2", 49153, False)
    client = nbd_client_args("nbd-d0", "d0", "10.9.0.2", 49153, True, "198.18.0.12")
    assert client["tls-creds"] == TLS_CREDS_ID and client["tls-hostname"] == "198.18.0.12"
    assert "tls-creds" not in nbd_client_args("nbd-d0", "d0", "10.9.0.2", 49153, False)
