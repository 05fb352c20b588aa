"""Identities, roles, revocation and the audit log against real agents in the lab.

Uses the lab's CA (``<lab>/pki``) and its admin, operator and viewer certificates; the CLI
(``ferry cert ...``) is run as a user would, against the lab's client configuration.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import LabHandle, needs_lab

from vmferry.client import FerryClient
from vmferry.client._config import HostEndpoint
from vmferry.errors import AuthError, ForbiddenError, UnreachableError
from vmferry.security import CertificateAuthority, Role

pytestmark = needs_lab

FERRY = [sys.executable, "-m", "vmferry.cli.main"]


def _as(lab: LabHandle, host: str, cert: Path | None, key: Path | None) -> FerryClient:
    ep = lab.lab.endpoint(host)
    return FerryClient(
        HostEndpoint(url=ep.url, ca=ep.ca, cert=str(cert) if cert else None,
                     key=str(key) if key else None),
        timeout=15,
    )  # fmt: skip


def _user(lab: LabHandle, host: str, name: str) -> FerryClient:
    pki = lab.lab.dir / "pki"
    return _as(lab, host, pki / f"{name}.crt", pki / f"{name}.key")


def _ferry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*FERRY, *args], capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )


def _audit(lab: LabHandle, host: str, since: float) -> list[dict[str, Any]]:
    with _user(lab, host, "admin") as c:
        rows: list[dict[str, Any]] = c.request("GET", f"/v1/audit?since={since}")
    return rows


def test_unknown_expired_and_missing_certificates_are_refused(
    lab: LabHandle, tmp_path: Path
) -> None:
    # no client certificate: TLS lets it in, the agent answers 401 with what to pass
    with _as(lab, "h1", None, None) as c, pytest.raises(AuthError) as e:
        c.vms()
    assert "client certificate" in e.value.message
    # a certificate from another CA (same CN, same role): the handshake fails
    other = CertificateAuthority.create(tmp_path / "other", "vmferry lab CA")
    o = other.issue(tmp_path / "other", "admin", role=Role.admin)
    with _as(lab, "h1", o.cert, o.key) as c, pytest.raises(UnreachableError):
        c.vms()
    # an expired certificate of the lab's own CA: the handshake fails too
    ca = CertificateAuthority(lab.lab.dir / "pki")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    x = ca.issue(tmp_path / "expired", "admin", role=Role.admin, not_after=past)
    with _as(lab, "h1", x.cert, x.key) as c, pytest.raises(UnreachableError):
        c.vms()
    # a certificate of the lab's CA without a role: 403 naming the fix
    n = ca.issue(tmp_path / "norole", "norole")
    with _as(lab, "h1", n.cert, n.key) as c, pytest.raises(ForbiddenError) as f:
        c.vms()
    assert "no vmferry role" in f.value.message and "ferry cert issue" in (f.value.fix or "")
    # the same CA's admin certificate works (the refusals above are not a broken agent)
    with _user(lab, "h1", "admin") as c:
        assert c.request("GET", "/v1/security/whoami")["role"] == "admin"


def test_viewer_cannot_stop_or_move_operator_cannot_change_settings(lab: LabHandle) -> None:
    since = dt.datetime.now(dt.UTC).timestamp() - 1
    lab.make_vm("h1", "sec1", roles="heartbeat,udpecho")
    try:
        with _user(lab, "h1", "viewer") as v:
            assert [x["name"] for x in v.vms()] == ["sec1"]  # viewers read
            with pytest.raises(ForbiddenError) as e:
                v.action("sec1", "stop")
            assert "role viewer" in e.value.message and "operator or admin" in e.value.message
            with pytest.raises(ForbiddenError):
                v.move("sec1", {"to": {"name": "h2", "url": lab.lab.endpoint("h2").url}})
            assert v.vm("sec1")["state"] == "running"  # nothing happened
        with _user(lab, "h1", "operator") as o:
            before = o.settings()
            with pytest.raises(ForbiddenError) as e:
                o.update_settings(memory_reserve_mib=before["memory_reserve_mib"] + 64)
            assert "needs admin" in e.value.message
            assert o.settings() == before
            assert o.action("sec1", "pause")["state"] == "paused"  # operators run VMs
            assert o.action("sec1", "resume")["state"] == "running"
        # the audit log says who did what, from where, and how it ended
        rows = _audit(lab, "h1", since)
        seen = {(r["cn"], r["role"], r["method"], r["path"], r["status"]) for r in rows}
        assert ("viewer", "viewer", "POST", "/v1/vms/sec1/actions", 403) in seen
        assert ("viewer", "viewer", "POST", "/v1/vms/sec1/move", 403) in seen
        assert ("operator", "operator", "PATCH", "/v1/host/settings", 403) in seen
        assert ("operator", "operator", "POST", "/v1/vms/sec1/actions", 200) in seen
        assert ("admin", "admin", "POST", "/v1/vms", 201) in seen  # make_vm's create
        # from where: the root namespace's lab address (the tests run there)
        assert {r["address"] for r in rows if r["cn"] in ("viewer", "operator")} == {
            lab.topo.root_ip
        }
        # viewers cannot read it
        with _user(lab, "h1", "viewer") as v, pytest.raises(ForbiddenError):
            v.request("GET", "/v1/audit")
    finally:
        lab.remove_vm("h1", "sec1")


def test_revoke_pushes_the_crl_and_every_agent_refuses_the_certificate(
    lab: LabHandle, tmp_path: Path
) -> None:
    pki = lab.lab.dir / "pki"
    r = _ferry("cert", "issue", "user", "leaver", "--role", "operator", "--ca-dir", str(pki),
               "--out", str(tmp_path), "-o", "json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    issued = json.loads(r.stdout)
    assert issued["role"] == "operator"
    cert, key = tmp_path / "leaver.crt", tmp_path / "leaver.key"
    for h in ("h1", "h2"):
        with _as(lab, h, cert, key) as c:
            assert c.request("GET", "/v1/security/whoami")["cn"] == "leaver"
    r = _ferry("cert", "revoke", "leaver", "--ca-dir", str(pki), "--reason", "left", "-o", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    pushed = json.loads(r.stdout)["hosts"]
    assert set(pushed) >= {"h1", "h2"} and all(v.startswith("ok") for v in pushed.values())
    for h in ("h1", "h2"):
        with _as(lab, h, cert, key) as c, pytest.raises(AuthError) as e:
            c.vms()
        assert "revoked" in e.value.message
        with _user(lab, h, "admin") as c:  # others are untouched
            crl = c.request("GET", "/v1/security/crl")["crl"]
            assert issued["serial"] in crl["revoked"]
    listed = json.loads(_ferry("cert", "list", "--ca-dir", str(pki), "-o", "json").stdout)
    assert [c["state"] for c in listed if c["serial"] == issued["serial"]] == ["revoked"]
    # the CLI's audit view shows the refusal on h2 (table and json)
    r = _ferry("--host", "h2", "audit", "--since", "5m", "--who", "leaver", "-o", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows and rows[-1]["status"] == 401 and "revoked" in rows[-1]["message"]
    table = _ferry("--host", "h2", "audit", "--since", "5m", "--who", "leaver")
    assert table.returncode == 0 and "revoked" in table.stdout, table.stderr
