"""Roles, revocation, audit log and throttling of the agent (no QEMU, no network).

The TLS layer is simulated: :func:`_simulated_tls` puts a real certificate (issued by a real CA
in a temporary directory) into the ASGI scope in the form ``api/server.py`` gives the app
(``ssl.SSLSocket.getpeercert``'s dict), so everything after the handshake is the real code.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from vmferry.api import create_app
from vmferry.api.peer import AgentTLS
from vmferry.errors import ConflictError, NotFoundError, RefusedError
from vmferry.host import Host
from vmferry.security import CertificateAuthority, Role, verify_crl
from vmferry.security.audit import AuditLog, AuditRecord
from vmferry.security.pki import cert_role
from vmferry.security.roles import (
    ADMIN,
    RULES,
    RoleError,
    allowed,
    role_from_uris,
    rule_for,
)
from vmferry.security.throttle import FailureThrottle

# -- the rule table ----------------------------------------------------------------------------


@pytest.fixture
def host(tmp_path: Path) -> Host:
    root = tmp_path / "storage"
    root.mkdir()
    h = Host(tmp_path / "state", image=lambda: (Path("/nonexistent"), Path("/nonexistent")))
    h.settings = h.settings.model_copy(update={"storage_roots": [str(root)], "name": "h1"})
    return h


def _routes(host: Host, ca: CertificateAuthority, tmp_path: Path) -> list[tuple[str, str]]:
    hp = ca.issue(tmp_path / "tls", "h1", role=Role.host, server_names=["127.0.0.1"])
    app = create_app(host, tls=AgentTLS(hp.cert, hp.key, hp.ca))
    return [
        (m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in sorted(r.methods or ())
    ]


def test_every_mutating_route_has_a_rule_and_every_rule_a_route(
    host: Host, ca: CertificateAuthority, tmp_path: Path
) -> None:
    routes = _routes(host, ca, tmp_path)
    mutating = {(m, p) for m, p in routes if m not in ("GET", "HEAD")}
    missing = sorted(mutating - set(RULES))
    assert not missing, f"routes without a rule (they fall back to admin-only): {missing}"
    stale = sorted(set(RULES) - set(routes))
    assert not stale, f"rules for routes the app does not have: {stale}"


def test_role_table_decisions() -> None:
    # viewers read, and only read
    assert allowed(Role.viewer, "GET", "/v1/vms")
    assert not allowed(Role.viewer, "POST", "/v1/vms/{name}/actions")
    assert not allowed(Role.viewer, "POST", "/v1/vms/{name}/move")
    # operators run and move VMs, but do not change the host or the cluster
    assert allowed(Role.operator, "POST", "/v1/vms/{name}/move")
    assert allowed(Role.operator, "POST", "/v1/cluster/vms/{name}/move")
    assert not allowed(Role.operator, "PATCH", "/v1/host/settings")
    assert not allowed(Role.operator, "POST", "/v1/cluster/{name}/nodes/{node}/drain")
    assert not allowed(Role.operator, "PUT", "/v1/security/crl")
    # only agents call the destination side of a move; admins do not either
    assert allowed(Role.host, "POST", "/v1/migrations/incoming")
    assert not allowed(Role.admin, "POST", "/v1/migrations/incoming")
    assert not allowed(Role.host, "PATCH", "/v1/host/settings")
    # the audit log is admin's; an unknown mutating route fails closed
    assert not allowed(Role.viewer, "GET", "/v1/audit")
    assert rule_for("POST", "/v1/not-in-the-table").roles == ADMIN
    assert rule_for("HEAD", "/v1/vms").roles == rule_for("GET", "/v1/vms").roles


def test_role_from_uris() -> None:
    assert role_from_uris(["urn:vmferry:role:operator", "https://x"]) is Role.operator
    with pytest.raises(RoleError, match="no vmferry role"):
        role_from_uris(["https://x"])
    with pytest.raises(RoleError, match="exactly one"):
        role_from_uris(["urn:vmferry:role:viewer", "urn:vmferry:role:admin"])
    with pytest.raises(RoleError, match="unknown role 'root'"):
        role_from_uris(["urn:vmferry:role:root"])


# -- the CA: roles in certificates, index, CRL ----------------------------------------------------


def test_issue_puts_the_role_in_a_san_uri(ca: CertificateAuthority, tmp_path: Path) -> None:
    p = ca.issue(tmp_path / "out", "alice", role=Role.operator)
    cert = x509.load_pem_x509_certificate(p.cert.read_bytes())
    assert cert_role(cert) is Role.operator
    h = ca.issue(tmp_path / "out", "h1", role="host", server_names=["198.18.0.2", "h1"])
    san = x509.load_pem_x509_certificate(h.cert.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.DNSName) == ["h1"]
    assert cert_role(x509.load_pem_x509_certificate(h.cert.read_bytes())) is Role.host
    assert (
        cert_role(x509.load_pem_x509_certificate(ca.issue(tmp_path, "e1").cert.read_bytes()))
        is None
    )
    with pytest.raises(RefusedError):
        ca.issue(tmp_path / "out", "../evil", role=Role.admin)
    with pytest.raises(RefusedError, match="unknown role"):
        ca.issue(tmp_path / "out", "eve", role="root")
    assert [(c["name"], c["role"], c["state"]) for c in ca.certificates()] == [
        ("alice", "operator", "valid"), ("h1", "host", "valid"), ("e1", None, "valid"),
    ]  # fmt: skip


def test_revoke_signs_a_crl_the_agents_can_verify(ca: CertificateAuthority, tmp_path: Path) -> None:
    a1 = ca.issue(tmp_path, "alice", role=Role.viewer)
    ca.issue(tmp_path, "alice", role=Role.viewer)  # a second one (rotation)
    bob = ca.issue(tmp_path, "bob", role=Role.viewer)
    first = verify_crl(ca.crl_pem(), ca.cert_path)
    assert first.serials == frozenset()
    serial1 = x509.load_pem_x509_certificate(a1.cert.read_bytes()).serial_number
    # by serial: only that one
    done = ca.revoke(f"{serial1:x}")
    assert [c["serial"] for c in done] == [f"{serial1:X}"]
    crl = verify_crl(ca.crl_pem(), ca.cert_path)
    assert crl.serials == {serial1} and crl.number > first.number
    # by name: every certificate of that name still valid
    assert len(ca.revoke("alice")) == 1
    with pytest.raises(ConflictError):
        ca.revoke("alice")
    with pytest.raises(NotFoundError):
        ca.revoke("nobody")
    bob_serial = x509.load_pem_x509_certificate(bob.cert.read_bytes()).serial_number
    final = verify_crl(ca.crl_pem(), ca.cert_path)
    assert len(final.serials) == 2 and not final.is_revoked(bob_serial)
    states = {c["serial"]: c["state"] for c in ca.certificates()}
    assert sorted(states.values()) == ["revoked", "revoked", "valid"]


def test_crl_from_another_ca_or_tampered_is_refused(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    other = CertificateAuthority.create(tmp_path / "other", "test CA")  # same name, other key
    with pytest.raises(RefusedError, match="signature"):
        verify_crl(other.crl_pem(), ca.cert_path)
    pem = ca.crl_pem()
    body = "".join(pem.splitlines()[1:-1])
    flipped = body[:-12] + ("A" if body[-12] != "A" else "B") + body[-11:]
    with pytest.raises(RefusedError):
        verify_crl(f"-----BEGIN X509 CRL-----\n{flipped}\n-----END X509 CRL-----\n", ca.cert_path)
    with pytest.raises(RefusedError, match="not a PEM"):
        verify_crl("hello", ca.cert_path)


# -- audit log and throttle ---------------------------------------------------------------------


def _rec(t: float, cn: str = "alice", status: int = 200) -> AuditRecord:
    return AuditRecord(t, cn, "operator", "198.18.0.1", "POST", "/v1/vms", status, "ok")


def test_audit_log_query_and_rotation(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit", rotate_bytes=2000, keep=3)
    for i in range(100):
        log.append(_rec(1000.0 + i, cn="alice" if i % 2 else "bob"))
    files = sorted(p.name for p in (tmp_path / "audit").iterdir())
    assert files == ["audit.1.jsonl", "audit.2.jsonl", "audit.jsonl"]  # bounded
    assert sum(p.stat().st_size for p in (tmp_path / "audit").iterdir()) <= 3 * 2000
    rows = log.query(since=1090.0)
    assert [r["time"] for r in rows] == [1090.0 + i for i in range(10)]
    assert {r["cn"] for r in log.query(since=1090.0, cn="bob")} == {"bob"}
    assert len(log.query(limit=3)) == 3 and log.query(limit=3)[-1]["time"] == 1099.0
    (tmp_path / "audit" / "audit.jsonl").open("a").write('{"torn":')  # a crash mid-line
    assert log.query(since=1099.0)[-1]["time"] == 1099.0


def test_throttle_blocks_after_the_limit_and_stays_bounded() -> None:
    t = FailureThrottle(limit=5, window=10, block=30, max_addresses=100)
    assert not any(t.failure("a", now=float(i)) for i in range(4))
    assert t.blocked_for("a", now=4.0) == 0
    assert t.failure("a", now=4.5)  # the 5th within 10 s
    assert t.blocked_for("a", now=5.0) == pytest.approx(29.5)
    assert t.blocked_for("b", now=5.0) == 0  # per address
    assert t.blocked_for("a", now=35.0) == 0
    # failures spread wider than the window never block
    assert not any(t.failure("c", now=100.0 + 3 * i) for i in range(50))
    for i in range(10_000):
        t.failure(f"10.0.{i // 256}.{i % 256}", now=200.0)
    assert t.tracked() <= 200


# -- the middleware, through a simulated TLS layer -------------------------------------------------


def _peer_dict(path: Path) -> dict[str, Any]:
    """A certificate file as ``ssl.SSLSocket.getpeercert()`` returns a verified one."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    alt: list[tuple[str, str]] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        alt = [("URI", u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    except x509.ExtensionNotFound:
        pass
    return {
        "subject": ((("commonName", cn),),),
        "serialNumber": f"{cert.serial_number:X}",
        "subjectAltName": tuple(alt),
    }


class _SimulatedTLS:
    """Simulated TLS termination: hands the app a chosen peer certificate like server.py."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.peer: dict[str, Any] | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope.setdefault("extensions", {})["tls"] = {"peer_cert": self.peer}
        await self.app(scope, receive, send)


@pytest.fixture
def agent(
    host: Host, ca: CertificateAuthority, tmp_path: Path
) -> Iterator[tuple[TestClient, _SimulatedTLS, dict[str, dict[str, Any]]]]:
    hp = ca.issue(tmp_path / "tls", "h1", role=Role.host, server_names=["127.0.0.1"])
    ids = {r.value: _peer_dict(ca.issue(tmp_path / "u", r.value, role=r).cert) for r in Role}
    ids["norole"] = _peer_dict(ca.issue(tmp_path / "u", "norole").cert)
    ids["h1"] = _peer_dict(hp.cert)
    wrapped = _SimulatedTLS(create_app(host, tls=AgentTLS(hp.cert, hp.key, hp.ca)))
    with TestClient(wrapped) as c:
        yield c, wrapped, ids


def test_roles_are_enforced_with_a_message_naming_the_role(agent: Any) -> None:
    api, tls, ids = agent
    vm = {"name": "vm1", "memory_mib": 64}
    tls.peer = None
    r = api.get("/v1/vms")
    assert r.status_code == 401 and "client certificate" in r.json()["error"]["message"]
    tls.peer = ids["viewer"]
    assert api.get("/v1/vms").status_code == 200
    r = api.post("/v1/vms", json=vm)
    assert r.status_code == 403
    err = r.json()["error"]
    assert "role viewer" in err["message"] and "operator or admin" in err["message"]
    assert "--role" in err["fix"]
    r = api.post("/v1/vms/vm1/actions", json={"action": "stop"})
    assert r.status_code == 403
    tls.peer = ids["operator"]
    assert api.post("/v1/vms", json=vm).status_code == 201
    r = api.patch("/v1/host/settings", json={"memory_reserve_mib": 300})
    assert r.status_code == 403 and "needs admin" in r.json()["error"]["message"]
    assert api.post("/v1/migrations/incoming", json={}).status_code == 403  # agents only
    tls.peer = ids["admin"]
    assert api.patch("/v1/host/settings", json={"memory_reserve_mib": 300}).status_code == 200
    tls.peer = ids["norole"]
    r = api.get("/v1/vms")
    assert r.status_code == 403 and "no vmferry role" in r.json()["error"]["message"]
    assert "ferry cert issue" in r.json()["error"]["fix"]
    tls.peer = ids["host"]
    assert api.get("/v1/security/whoami").json()["role"] == "host"
    assert api.delete("/v1/vms/vm1").status_code == 403
    # the audit log names who did what, refusals included; only admins read it
    tls.peer = ids["viewer"]
    assert api.get("/v1/audit").status_code == 403
    tls.peer = ids["admin"]
    rows = api.get("/v1/audit").json()
    seen = [(r["cn"], r["method"], r["path"], r["status"]) for r in rows]
    assert ("viewer", "POST", "/v1/vms", 403) in seen
    assert ("operator", "POST", "/v1/vms", 201) in seen
    assert ("admin", "PATCH", "/v1/host/settings", 200) in seen
    assert ("host", "DELETE", "/v1/vms/vm1", 403) in seen
    assert (None, "GET", "/v1/vms", 401) in seen
    assert not any(m == "GET" and s == 200 for _, m, _, s in seen)  # reads are not audited
    ok = next(r for r in rows if r["cn"] == "operator" and r["status"] == 201)
    assert ok["role"] == "operator" and ok["address"] and ok["outcome"] == "ok"


def test_revoked_certificate_is_refused_after_a_crl_push(
    agent: Any, ca: CertificateAuthority
) -> None:
    api, tls, ids = agent
    tls.peer = ids["operator"]
    assert api.get("/v1/vms").status_code == 200
    ca.revoke("operator")
    tls.peer = ids["operator"]
    r = api.put("/v1/security/crl", json={"crl": ca.crl_pem()})
    assert r.status_code == 403  # admins push revocation lists
    tls.peer = ids["admin"]
    old = ca.crl_pem()
    r = api.put("/v1/security/crl", json={"crl": old})
    assert r.status_code == 200 and len(r.json()["crl"]["revoked"]) == 1
    tls.peer = ids["operator"]
    r = api.get("/v1/vms")
    assert r.status_code == 401 and "revoked" in r.json()["error"]["message"]
    # an older list cannot un-revoke; a list of another CA is refused
    tls.peer = ids["admin"]
    ca.revoke("viewer")
    assert api.put("/v1/security/crl", json={"crl": ca.crl_pem()}).status_code == 200
    r = api.put("/v1/security/crl", json={"crl": old})
    assert r.status_code == 409
    other = CertificateAuthority.create(ca.dir.parent / "other", "test CA")
    assert api.put("/v1/security/crl", json={"crl": other.crl_pem()}).status_code == 400
    tls.peer = ids["viewer"]
    assert api.get("/v1/vms").status_code == 401
    tls.peer = ids["admin"]
    refused = [(r["cn"], r["role"], r["status"]) for r in api.get("/v1/audit").json()]
    assert ("operator", "operator", 401) in refused  # recorded under the CN it claims


def test_revocation_list_survives_an_agent_restart(
    host: Host, ca: CertificateAuthority, tmp_path: Path
) -> None:
    hp = ca.issue(tmp_path / "tls", "h1", role=Role.host, server_names=["127.0.0.1"])
    viewer = _peer_dict(ca.issue(tmp_path / "u", "v", role=Role.viewer).cert)
    admin = _peer_dict(ca.issue(tmp_path / "u", "a", role=Role.admin).cert)
    ca.revoke("v")
    tls = AgentTLS(hp.cert, hp.key, hp.ca)
    first = _SimulatedTLS(create_app(host, tls=tls))
    with TestClient(first) as api:
        first.peer = admin
        assert api.put("/v1/security/crl", json={"crl": ca.crl_pem()}).status_code == 200
    again = _SimulatedTLS(create_app(host, tls=tls))
    with TestClient(again) as api:
        again.peer = viewer
        assert api.get("/v1/vms").status_code == 401


def test_repeated_refusals_are_throttled(agent: Any) -> None:
    api, tls, ids = agent
    tls.peer = ids["viewer"]
    codes = [api.post("/v1/vms", json={"name": "x", "memory_mib": 64}).status_code
             for _ in range(20)]  # fmt: skip
    assert codes == [403] * 20
    r = api.get("/v1/vms")  # now even a permitted read from that address waits
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert "too many refused requests" in r.json()["error"]["message"]


def test_expired_certificate_not_after_in_the_past(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    p = ca.issue(tmp_path, "old", role=Role.admin, not_after=past)
    cert = x509.load_pem_x509_certificate(p.cert.read_bytes())
    assert cert.not_valid_after_utc < dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc < cert.not_valid_after_utc
    assert [c["state"] for c in ca.certificates()] == ["expired"]


def test_server_only_certificate_names_no_role_and_cannot_be_a_client(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    from cryptography.x509.oid import ExtendedKeyUsageOID

    p = ca.issue(tmp_path / "srv", "admin-center", role=None, server_names=["127.0.0.1"],
                 client=False)  # fmt: skip
    cert = x509.load_pem_x509_certificate(p.cert.read_bytes())
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert_role(cert) is None  # an agent answers 403 to a certificate without a role


def test_renewed_crl_has_the_next_number_and_the_same_serials(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    ca.issue(tmp_path / "u", "carol", role=Role.viewer)
    ca.revoke("carol")
    before = verify_crl(ca.crl_pem(), ca.cert_path)
    after = verify_crl(ca.renew_crl(), ca.cert_path)
    assert after.number == before.number + 1
    assert after.serials == before.serials and after.next_update is not None
