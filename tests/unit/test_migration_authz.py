"""The destination QEMU admits only the source host's certificate (QEMU ``tls-authz``).

QEMU is simulated here: :class:`SimulatedQmp` records the QMP commands the destination agent
sends (it answers like an idle incoming QEMU), so the tests check which ``authz-simple`` object
goes into QEMU and that the migration parameters and the NBD server refer to it. That QEMU
really refuses another certificate is tested in the lab (tests/integration/test_tls_authz_lab.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from test_migration_encryption import ADDRS, _dest, _req

from vmferry.host.vms import VMManager
from vmferry.migration import incoming as incoming_mod
from vmferry.migration.qemu_ops import TLS_AUTHZ_ID, TLS_CREDS_ID, disable_tls, enable_tls
from vmferry.qemu.tls import host_identity

Command = tuple[str, dict[str, Any]]


class SimulatedQmp:
    """Simulated QMP session of a destination QEMU: records every command it is sent."""

    def __init__(self, log: list[Command]) -> None:
        self.log = log

    async def execute(self, cmd: str, args: Mapping[str, object] | None = None, **_: Any) -> Any:
        self.log.append((cmd, dict(args or {})))
        if cmd == "query-status":
            return {"status": "running"}
        return {}

    async def status(self) -> str:
        return str((await self.execute("query-status"))["status"])


class _SimulatedListener:
    """Stands in for the destination's placeholder listener on the migration port."""

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass


@pytest.fixture
def simulated_qemu(monkeypatch: pytest.MonkeyPatch) -> list[Command]:
    """Route the destination agent's QMP sessions to :class:`SimulatedQmp`; return its log."""
    log: list[Command] = []

    @contextlib.asynccontextmanager
    async def session(_path: Path, timeout: float = 10.0) -> AsyncIterator[SimulatedQmp]:
        yield SimulatedQmp(log)

    async def launch(name: str) -> SimpleNamespace:
        return SimpleNamespace(qmp_socket=Path("/nonexistent/simulated-qmp.sock"))

    async def img_create(path: Path, size_mib: int) -> None:
        path.write_bytes(b"")

    async def listen(*_a: Any, **_k: Any) -> _SimulatedListener:
        return _SimulatedListener()

    monkeypatch.setattr(incoming_mod, "local_addresses", lambda: ADDRS)
    monkeypatch.setattr(incoming_mod, "qmp_session", session)
    monkeypatch.setattr(incoming_mod, "_qemu_img_create", img_create)
    monkeypatch.setattr(VMManager, "launch_incoming", lambda self, n: launch(n))
    monkeypatch.setattr(asyncio, "start_server", listen)
    return log


def _sent(log: list[Command], cmd: str) -> list[dict[str, Any]]:
    return [args for c, args in log if c == cmd]


@pytest.mark.parametrize("name", ["h1", "node-2.example", "a,b", "x+y;z", " lead", "#hash"])
def test_host_identity_is_the_rfc4514_dn(name: str) -> None:
    # gnutls (QEMU's TLS) prints a subject as RFC 4514; so does cryptography
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    assert host_identity(name) == subject.rfc4514_string()


def test_destination_admits_only_the_source_host(
    tmp_path: Path, simulated_qemu: list[Command]
) -> None:
    dest = _dest(tmp_path, [])
    req = _req(tmp_path, encryption=True).model_copy(update={"dry_run": False})
    plan = asyncio.run(dest.prepare(req))
    assert plan.encrypted and plan.mirrored == ["disk0"]

    added = _sent(simulated_qemu, "object-add")
    assert [a["qom-type"] for a in added] == ["tls-creds-x509", "authz-simple"]
    assert added[1] == {"qom-type": "authz-simple", "id": TLS_AUTHZ_ID, "identity": "CN=h1"}
    params = [p for p in _sent(simulated_qemu, "migrate-set-parameters") if "tls-creds" in p]
    assert params == [{"tls-creds": TLS_CREDS_ID, "tls-hostname": "", "tls-authz": TLS_AUTHZ_ID}]

    simulated_qemu.clear()
    asyncio.run(dest.start(req.job_id, "10.9.0.2"))
    (nbd,) = _sent(simulated_qemu, "nbd-server-start")
    assert nbd["tls-creds"] == TLS_CREDS_ID and nbd["tls-authz"] == TLS_AUTHZ_ID
    assert [c for c, _ in simulated_qemu][-1] == "migrate-incoming"

    # after the stream the move's credentials and authz object leave QEMU
    simulated_qemu.clear()
    asyncio.run(dest.commit(req.job_id, paused=False, started_at=None))
    assert {"tls-creds": "", "tls-hostname": "", "tls-authz": ""} in _sent(
        simulated_qemu, "migrate-set-parameters"
    )
    deleted = {a["id"] for a in _sent(simulated_qemu, "object-del")}
    assert deleted == {TLS_CREDS_ID, TLS_AUTHZ_ID}
    assert req.job_id not in dest.active


def test_authz_names_the_source_of_the_request(
    tmp_path: Path, simulated_qemu: list[Command]
) -> None:
    dest = _dest(tmp_path, [])
    req = _req(tmp_path, encryption=True).model_copy(update={"dry_run": False, "source": "n7"})
    asyncio.run(dest.prepare(req))
    (authz,) = [a for a in _sent(simulated_qemu, "object-add") if a["qom-type"] == "authz-simple"]
    assert authz["identity"] == "CN=n7"
    asyncio.run(dest.abort(req.job_id))  # the skeleton VM (and its QEMU objects) goes
    assert req.job_id not in dest.active and "vm1" not in {v.name for v in dest.vms.list()}


def test_clear_text_move_sets_no_authz(tmp_path: Path, simulated_qemu: list[Command]) -> None:
    dest = _dest(tmp_path, ["10.9.0.0/24"])
    req = _req(tmp_path, encryption=False).model_copy(update={"dry_run": False})
    asyncio.run(dest.prepare(req))
    asyncio.run(dest.start(req.job_id, "10.9.0.2"))
    assert "authz-simple" not in {a.get("qom-type") for a in _sent(simulated_qemu, "object-add")}
    (nbd,) = _sent(simulated_qemu, "nbd-server-start")
    assert "tls-creds" not in nbd and "tls-authz" not in nbd
    asyncio.run(dest.abort(req.job_id))


def test_source_side_sets_no_authz(tmp_path: Path) -> None:
    log: list[Command] = []
    q: Any = SimulatedQmp(log)
    asyncio.run(enable_tls(q, tmp_path, "client", "198.18.0.12"))
    assert [a["qom-type"] for a in _sent(log, "object-add")] == ["tls-creds-x509"]
    assert _sent(log, "migrate-set-parameters") == [
        {"tls-creds": TLS_CREDS_ID, "tls-hostname": "198.18.0.12"}
    ]
    log.clear()
    asyncio.run(disable_tls(q))
    assert {a["id"] for a in _sent(log, "object-del")} == {TLS_CREDS_ID, TLS_AUTHZ_ID}
