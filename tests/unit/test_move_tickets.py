"""Move tickets and constrained delegation (security/tickets.py, api/delegation.py).

Real certificates from a real CA in a temporary directory; no network, no QEMU. The agents'
side of it is driven through :class:`MoveAuthority` with principals as the middleware builds
them from a verified certificate.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path

import pytest

from vmferry.api.delegation import MoveAuthority, is_local
from vmferry.errors import ForbiddenError, RefusedError
from vmferry.host.settings import HostSettings
from vmferry.security import CertificateAuthority, Role
from vmferry.security.pki import CertPaths
from vmferry.security.roles import Principal
from vmferry.security.tickets import (
    NonceStore,
    SignedTicket,
    cert_uris,
    check_binding,
    may_delegate,
    parse_delegation,
    sign_ticket,
    verify_ticket,
)


@pytest.fixture
def alice(ca: CertificateAuthority, tmp_path: Path) -> CertPaths:
    return ca.issue(tmp_path / "users", "alice", role=Role.operator)


def _ticket(user: CertPaths, **kw: object) -> SignedTicket:
    args: dict[str, object] = {"vm": "vm1", "source": "h1", "destination": "h2"}
    args.update(kw)
    return sign_ticket(user.cert, user.key, **args)  # type: ignore[arg-type]


def test_valid_ticket_verifies_and_binds(ca: CertificateAuthority, alice: CertPaths) -> None:
    v = verify_ticket(_ticket(alice), ca.cert_path)
    assert (v.claims.user, v.role) == ("alice", Role.operator)
    check_binding(v, vm="vm1", source="h1", destination="h2", service="live", user="alice")


@pytest.mark.parametrize(
    ("field", "value"),
    [("vm", "vm2"), ("source", "h3"), ("destination", "h3"), ("service", "quick")],
)
def test_retargeted_ticket_is_refused(
    ca: CertificateAuthority, alice: CertPaths, field: str, value: str
) -> None:
    v = verify_ticket(_ticket(alice), ca.cert_path)
    want = {"vm": "vm1", "source": "h1", "destination": "h2", "service": "live"}
    want[field] = value
    with pytest.raises(ForbiddenError, match=f"signed for {field}"):
        check_binding(v, **want)  # type: ignore[arg-type]


def test_tampered_payload_is_refused(ca: CertificateAuthority, alice: CertPaths) -> None:
    t = _ticket(alice)
    claims = json.loads(base64.urlsafe_b64decode(t.payload + "=="))
    claims["destination"] = "h3"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    with pytest.raises(ForbiddenError, match="tampered or forged"):
        verify_ticket(t.model_copy(update={"payload": forged}), ca.cert_path)


def test_ticket_signed_with_another_key_is_refused(
    ca: CertificateAuthority, alice: CertPaths, tmp_path: Path
) -> None:
    mallory = ca.issue(tmp_path / "users", "mallory", role=Role.operator)
    # Mallory signs, but presents Alice's certificate.
    t = _ticket(mallory).model_copy(update={"cert": alice.cert.read_text()})
    with pytest.raises(ForbiddenError, match=r"signature|signer"):
        verify_ticket(t, ca.cert_path)


def test_certificate_of_another_ca_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = CertificateAuthority.create(tmp_path / "other", "other CA")
    eve = other.issue(tmp_path / "eve", "eve", role=Role.admin)
    with pytest.raises(ForbiddenError, match=r"another CA|not signed by"):
        verify_ticket(_ticket(eve), ca.cert_path)


def test_expired_future_and_too_long_tickets_are_refused(
    ca: CertificateAuthority, alice: CertPaths
) -> None:
    old = _ticket(alice, now=time.time() - 300, ttl_s=120)
    with pytest.raises(ForbiddenError, match="expired"):
        verify_ticket(old, ca.cert_path)
    future = _ticket(alice, now=time.time() + 3600)
    with pytest.raises(ForbiddenError, match="future"):
        verify_ticket(future, ca.cert_path)
    with pytest.raises(RefusedError, match="may live"):
        _ticket(alice, ttl_s=3600)


def test_viewer_and_revoked_signers_are_refused(
    ca: CertificateAuthority, alice: CertPaths, tmp_path: Path
) -> None:
    viewer = ca.issue(tmp_path / "users", "val", role=Role.viewer)
    with pytest.raises(ForbiddenError, match="operator or admin"):
        verify_ticket(_ticket(viewer), ca.cert_path)
    ca.revoke("alice")
    serials = [int(e["serial"], 16) for e in ca.certificates() if e["state"] == "revoked"]
    with pytest.raises(ForbiddenError, match="revoked"):
        verify_ticket(_ticket(alice), ca.cert_path, revoked=serials)


def test_nonce_store_refuses_replays_across_restarts(
    ca: CertificateAuthority, alice: CertPaths, tmp_path: Path
) -> None:
    path = tmp_path / "state" / "nonces.json"
    claims = verify_ticket(_ticket(alice), ca.cert_path).claims
    NonceStore(path).use(claims)
    with pytest.raises(ForbiddenError, match="replayed"):
        NonceStore(path).use(claims)  # a restarted agent still knows it
    fresh = verify_ticket(_ticket(alice), ca.cert_path).claims
    NonceStore(path).use(fresh)
    # expired nonces are forgotten, so the file stays small
    store = NonceStore(path)
    store.use(verify_ticket(_ticket(alice), ca.cert_path).claims, now=time.time() + 3600)
    assert len(json.loads(path.read_text())) == 1


def test_damaged_nonce_file_refuses_tickets_until_old_ones_expired(
    ca: CertificateAuthority, alice: CertPaths, tmp_path: Path
) -> None:
    path = tmp_path / "nonces.json"
    path.write_text("{not json")
    claims = verify_ticket(_ticket(alice), ca.cert_path).claims
    with pytest.raises(ForbiddenError, match="lost its list"):
        NonceStore(path).use(claims)
    NonceStore(path).use(claims, now=time.time() + 700)


def test_delegation_targets_live_in_host_certificates(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    assert parse_delegation("h2:live") == ["urn:vmferry:delegate:live:h2"]
    assert len(parse_delegation("*")) == 2
    with pytest.raises(RefusedError, match="service"):
        parse_delegation("h2:teleport")
    with pytest.raises(RefusedError, match="host name"):
        parse_delegation("h 2")
    h1 = ca.issue(tmp_path / "h1", "h1", role=Role.host, server_names=["127.0.0.1"],
                  delegate=["h2:live", "h3"])  # fmt: skip
    from cryptography import x509

    uris = cert_uris(x509.load_pem_x509_certificate(h1.cert.read_bytes()))
    assert may_delegate(uris, "live", "h2")
    assert not may_delegate(uris, "quick", "h2")
    assert may_delegate(uris, "quick", "h3")
    assert not may_delegate(uris, "live", "h4")
    with pytest.raises(RefusedError, match="only host certificates"):
        ca.issue(tmp_path / "u", "bob", role=Role.operator, delegate=["h2"])


# -- the agents' rules -------------------------------------------------------------------------
def _authority(
    ca: CertificateAuthority, tmp_path: Path, name: str, mode: str, delegate: list[str],
    planned: tuple[str, str | None] | None = None,
) -> MoveAuthority:  # fmt: skip
    cert = ca.issue(tmp_path / name, name, role=Role.host, server_names=["127.0.0.1"],
                    delegate=delegate)  # fmt: skip
    settings = HostSettings(name=name)
    settings.migration.authentication = mode  # type: ignore[assignment]

    async def planned_move_of(_: str) -> tuple[str, str | None] | None:
        return planned

    return MoveAuthority(lambda: settings, tmp_path / name / "state", ca.cert_path,
                         cert.cert, lambda: None, planned_move_of)  # fmt: skip


def _host_principal(
    ca: CertificateAuthority, tmp_path: Path, name: str, delegate: list[str]
) -> Principal:
    from cryptography import x509

    p = ca.issue(tmp_path / f"peer-{name}", name, role=Role.host, server_names=["127.0.0.1"],
                 delegate=delegate)  # fmt: skip
    uris = cert_uris(x509.load_pem_x509_certificate(p.cert.read_bytes()))
    return Principal(cn=name, role=Role.host, address="198.18.1.11", uris=tuple(uris))


def test_local_mode_refuses_a_remote_start(ca: CertificateAuthority, tmp_path: Path,
                                           alice: CertPaths) -> None:  # fmt: skip
    auth = _authority(ca, tmp_path, "h1", "local", ["h2"])
    remote = Principal(cn="alice", role=Role.operator, address="198.18.1.250")
    with pytest.raises(ForbiddenError, match="only on the host itself") as e:
        asyncio.run(
            auth.check_start(
                remote,
                "198.18.1.11",
                vm="vm1",
                destination="h2",
                service="live",
                ticket=_ticket(alice),
                what_if=False,
            )
        )
    assert e.value.field == "migration.authentication"
    local = Principal(cn="alice", role=Role.operator, address="198.18.1.11")
    asyncio.run(auth.check_start(local, "198.18.1.11", vm="vm1", destination="h2",
                                 service="live", ticket=None, what_if=False))  # fmt: skip
    assert is_local("127.0.0.1", None) and not is_local("198.18.1.12", "198.18.1.11")


def test_delegated_source_checks_ticket_user_and_its_own_targets(
    ca: CertificateAuthority, tmp_path: Path, alice: CertPaths
) -> None:
    auth = _authority(ca, tmp_path, "h1", "delegated", ["h2:live"])
    who = Principal(cn="alice", role=Role.operator, address="198.18.1.250")
    start = auth.check_start
    with pytest.raises(ForbiddenError, match="needs a move ticket"):
        asyncio.run(start(who, "198.18.1.11", vm="vm1", destination="h2", service="live",
                          ticket=None, what_if=False))  # fmt: skip
    bob = Principal(cn="bob", role=Role.operator, address="198.18.1.250")
    with pytest.raises(ForbiddenError, match="signed for user"):
        asyncio.run(start(bob, "198.18.1.11", vm="vm1", destination="h2", service="live",
                          ticket=_ticket(alice), what_if=False))  # fmt: skip
    t3 = _ticket(alice, destination="h3")
    with pytest.raises(ForbiddenError, match="may not act for users towards h3"):
        asyncio.run(start(who, "198.18.1.11", vm="vm1", destination="h3", service="live",
                          ticket=t3, what_if=False))  # fmt: skip
    t = _ticket(alice)
    asyncio.run(
        start(
            who, "198.18.1.11", vm="vm1", destination="h2", service="live", ticket=t, what_if=True
        )
    )  # fmt: skip  (a what-if uses nothing)
    asyncio.run(start(who, "198.18.1.11", vm="vm1", destination="h2", service="live",
                      ticket=t, what_if=False))  # fmt: skip
    with pytest.raises(ForbiddenError, match="replayed"):
        asyncio.run(start(who, "198.18.1.11", vm="vm1", destination="h2", service="live",
                          ticket=t, what_if=False))  # fmt: skip


def test_destination_verifies_ticket_source_and_delegation(
    ca: CertificateAuthority, tmp_path: Path, alice: CertPaths
) -> None:
    auth = _authority(ca, tmp_path, "h2", "delegated", [])
    allowed_src = _host_principal(ca, tmp_path, "h1", ["h2"])
    other_src = _host_principal(ca, tmp_path, "h1", ["h3"])
    inc = auth.check_incoming
    t = _ticket(alice)
    with pytest.raises(ForbiddenError, match="receives moves only with a ticket"):
        asyncio.run(inc(allowed_src, vm="vm1", source="h1", service="live", ticket=None,
                        dry_run=False))  # fmt: skip
    with pytest.raises(ForbiddenError, match="sent by 'h1'"):
        asyncio.run(inc(allowed_src, vm="vm1", source="h9", service="live", ticket=t,
                        dry_run=False))  # fmt: skip
    with pytest.raises(ForbiddenError, match="may not act for users towards h2"):
        asyncio.run(inc(other_src, vm="vm1", source="h1", service="live", ticket=t,
                        dry_run=False))  # fmt: skip
    with pytest.raises(ForbiddenError, match="signed for vm"):
        asyncio.run(inc(allowed_src, vm="vm2", source="h1", service="live", ticket=t,
                        dry_run=False))  # fmt: skip
    asyncio.run(inc(allowed_src, vm="vm1", source="h1", service="live", ticket=t, dry_run=True))
    asyncio.run(inc(allowed_src, vm="vm1", source="h1", service="live", ticket=t, dry_run=False))
    with pytest.raises(ForbiddenError, match="replayed"):
        asyncio.run(inc(allowed_src, vm="vm1", source="h1", service="live", ticket=t,
                        dry_run=False))  # fmt: skip


def test_cluster_moves_use_node_identity_without_a_ticket(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    src = _host_principal(ca, tmp_path, "n1", [])
    marked = _authority(ca, tmp_path, "n2", "delegated", [], planned=("n1", "n2"))
    asyncio.run(marked.check_incoming(src, vm="cvm", source="n1", service="live", ticket=None,
                                      dry_run=False))  # fmt: skip
    elsewhere = _authority(ca, tmp_path, "n3", "delegated", [], planned=("n1", "n2"))
    with pytest.raises(ForbiddenError, match="only with a ticket"):
        asyncio.run(elsewhere.check_incoming(src, vm="cvm", source="n1", service="live",
                                             ticket=None, dry_run=False))  # fmt: skip
