"""Move tickets and constrained delegation (``migration.authentication = delegated``).

A remote admin who starts a move signs a short-lived *ticket* with the private key of their
user certificate. It names the user, the VM, the source host, the destination host, the kind
of move (``live`` or ``quick``), when it was signed, when it expires, and a random nonce. The
source agent checks it before it starts and forwards it; the destination agent verifies it
itself (the certificate chains to the CA, is valid and not revoked, carries an operator or
admin role; the signature holds; every bound field matches the move it is asked to receive),
refuses a nonce it has seen, and checks that the *source* may act for a user towards it:
the source host's certificate lists its delegation targets in SAN URIs
``urn:vmferry:delegate:<service>:<host>`` (``*`` for every host), signed by the CA like
Kerberos constrained delegation's per-account list of services. A host whose certificate
lists no target cannot receive delegated moves from anyone.

Nothing here does I/O except :class:`NonceStore`, which keeps the nonces of unexpired
tickets on disk so that a restart does not re-open a replay window.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, Field, ValidationError

from vmferry.errors import ForbiddenError, RefusedError
from vmferry.security.roles import Role, RoleError, role_from_uris

Service = Literal["live", "quick"]
SERVICES: tuple[Service, ...] = ("live", "quick")
DELEGATE_URI_PREFIX = "urn:vmferry:delegate:"
#: A ticket may live at most this long (seconds); the CLI signs them for 120 s.
MAX_TICKET_S = 600
DEFAULT_TICKET_S = 120
#: Clocks of the client and the hosts may differ by this much (seconds).
CLOCK_SKEW_S = 30
TICKET_FIX = "start the move again with ferry (it signs a fresh ticket for every request)"
_HOST_RE = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,62})$")


class SignedTicket(BaseModel):
    """A ticket as it travels: the signed payload, the signature, the signer's certificate."""

    payload: str = Field(min_length=1, max_length=4096)
    signature: str = Field(min_length=1, max_length=512)
    cert: str = Field(min_length=1, max_length=16384)


class TicketClaims(BaseModel):
    """What a ticket says (the signed payload)."""

    v: Literal[1] = 1
    user: str = Field(max_length=63)
    vm: str = Field(max_length=63)
    source: str = Field(max_length=63)
    destination: str = Field(max_length=63)
    service: Service
    issued_at: float
    expires_at: float
    nonce: str = Field(min_length=16, max_length=64)


@dataclass(frozen=True)
class Verified:
    """A ticket that passed every check: who asked for what."""

    claims: TicketClaims
    serial: int
    role: Role


# -- delegation targets in host certificates ---------------------------------------------------
def parse_delegation(spec: str) -> list[str]:
    """SAN URIs for one ``--delegate`` value: ``HOST``, ``HOST:live,quick`` or ``*``."""
    host, _, services = spec.partition(":")
    if not _HOST_RE.match(host):
        raise RefusedError(
            f"delegation target {host!r} is not a host name",
            field="delegate",
            fix="HOST, HOST:live,quick or '*' (every host of this CA)",
        )
    wanted = [s.strip() for s in services.split(",") if s.strip()] if services else list(SERVICES)
    bad = [s for s in wanted if s not in SERVICES]
    if bad:
        raise RefusedError(
            f"unknown delegation service {bad[0]!r}",
            field="delegate",
            fix=f"services are {', '.join(SERVICES)}",
        )
    return [f"{DELEGATE_URI_PREFIX}{s}:{host}" for s in wanted]


def delegation_targets(uris: Iterable[str]) -> list[tuple[str, str]]:
    """(service, host) pairs a certificate's SAN URIs allow delegation to."""
    out: list[tuple[str, str]] = []
    for u in uris:
        if u.startswith(DELEGATE_URI_PREFIX):
            service, _, host = u.removeprefix(DELEGATE_URI_PREFIX).partition(":")
            if service in SERVICES and _HOST_RE.match(host):
                out.append((service, host))
    return out


def may_delegate(uris: Iterable[str], service: str, destination: str) -> bool:
    """Whether a host certificate with ``uris`` may act for a user towards ``destination``."""
    return any(s == service and h in ("*", destination) for s, h in delegation_targets(uris))


def cert_uris(cert: x509.Certificate) -> list[str]:
    """The SAN URIs of a certificate."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


# -- signing -----------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_ticket(
    cert_path: Path,
    key_path: Path,
    *,
    vm: str,
    source: str,
    destination: str,
    service: Service = "live",
    ttl_s: float = DEFAULT_TICKET_S,
    now: float | None = None,
) -> SignedTicket:
    """Sign a ticket for one move with the user's certificate and key."""
    if not 0 < ttl_s <= MAX_TICKET_S:
        raise RefusedError(
            f"a ticket may live 1..{MAX_TICKET_S} s, not {ttl_s}", field="ticket_ttl"
        )
    cert_pem = cert_path.read_bytes()
    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise RefusedError(
            f"{key_path} is not an EC key; tickets are signed with ECDSA",
            field="key",
            fix="use a certificate issued by ferry cert issue user",
        )
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    t = time.time() if now is None else now
    claims = TicketClaims(
        user=str(cn[0].value) if cn else "?",
        vm=vm,
        source=source,
        destination=destination,
        service=service,
        issued_at=t,
        expires_at=t + ttl_s,
        nonce=secrets.token_hex(16),
    )
    payload = json.dumps(claims.model_dump(), sort_keys=True, separators=(",", ":")).encode()
    sig = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    return SignedTicket(payload=_b64(payload), signature=_b64(sig), cert=cert_pem.decode())


# -- verifying ---------------------------------------------------------------------------------
def _refuse(why: str, fix: str = TICKET_FIX) -> ForbiddenError:
    return ForbiddenError(f"move ticket refused: {why}", field="ticket", fix=fix)


def verify_ticket(
    ticket: SignedTicket,
    ca_cert_path: Path,
    *,
    revoked: Iterable[int] = (),
    now: float | None = None,
) -> Verified:
    """Check a ticket's certificate, signature and lifetime (not yet what it is bound to)."""
    t = time.time() if now is None else now
    try:
        cert = x509.load_pem_x509_certificate(ticket.cert.encode())
    except ValueError:
        raise _refuse("its certificate is not PEM") from None
    ca = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = ca.public_key()
    if cert.issuer != ca.subject or not isinstance(ca_key, ec.EllipticCurvePublicKey):
        raise _refuse(
            f"it is signed with a certificate of another CA ({cert.issuer.rfc4514_string()})",
            "use a user certificate issued by this cluster's CA",
        )
    try:
        ca_key.verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            ec.ECDSA(cert.signature_hash_algorithm or hashes.SHA256()),
        )
    except InvalidSignature:
        raise _refuse(
            "its certificate was not signed by this cluster's CA",
            "use a user certificate issued by this cluster's CA",
        ) from None
    when = dt.datetime.fromtimestamp(t, dt.UTC)
    if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        raise _refuse(
            "its certificate is expired or not yet valid",
            "ask an admin for a new certificate: ferry cert issue user NAME --role operator",
        )
    if cert.serial_number in set(revoked):
        raise _refuse(
            "its certificate was revoked",
            "ask an admin for a new certificate: ferry cert issue user NAME --role operator",
        )
    try:
        role = role_from_uris(cert_uris(cert))
    except RoleError as exc:
        raise _refuse(f"its certificate {exc}") from None
    if role not in (Role.operator, Role.admin):
        raise _refuse(
            f"its signer has role {role.value}; moves need operator or admin",
            "sign with an operator's or admin's certificate",
        )
    pub = cert.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise _refuse("its certificate's key is not an EC key")
    try:
        payload = _unb64(ticket.payload)
        pub.verify(_unb64(ticket.signature), payload, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise _refuse("its signature does not match its contents (tampered or forged)") from None
    try:
        claims = TicketClaims.model_validate_json(payload)
    except ValidationError:
        raise _refuse("its contents are not a vmferry move ticket") from None
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not cn or claims.user != str(cn[0].value):
        raise _refuse("it names a user other than its signer")
    if claims.expires_at - claims.issued_at > MAX_TICKET_S:
        raise _refuse(f"it is valid for more than {MAX_TICKET_S} s")
    if claims.issued_at > t + CLOCK_SKEW_S:
        raise _refuse(
            "it was signed in the future", "check the clocks of the client and the hosts (NTP)"
        )
    if claims.expires_at < t:
        raise _refuse(f"it expired {t - claims.expires_at:.0f} s ago")
    return Verified(claims=claims, serial=cert.serial_number, role=role)


def check_binding(
    v: Verified,
    *,
    vm: str,
    source: str,
    destination: str,
    service: Service,
    user: str | None = None,
) -> None:
    """Refuse a ticket that was signed for another VM, host pair, kind of move or user."""
    c = v.claims
    wanted = {"vm": vm, "source": source, "destination": destination, "service": service}
    if user is not None:
        wanted["user"] = user
    for field, value in wanted.items():
        got = getattr(c, field)
        if got != value:
            raise _refuse(f"it was signed for {field} {got!r}, this move's {field} is {value!r}")


class NonceStore:
    """Nonces of tickets already used, kept until the ticket expires (``nonces.json``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}
        #: When the file was unreadable: refuse every ticket until any it held has expired.
        self._blind_until = 0.0
        try:
            raw = json.loads(path.read_text())
            self._seen = {str(k): float(v) for k, v in raw.items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, TypeError):
            self._blind_until = time.time() + MAX_TICKET_S + CLOCK_SKEW_S

    def use(self, claims: TicketClaims, now: float | None = None) -> None:
        """Record the ticket's nonce; refuse one already used (a replay)."""
        t = time.time() if now is None else now
        if t < self._blind_until:
            raise _refuse(
                f"this agent lost its list of used tickets ({self.path} was unreadable) and "
                f"accepts none for another {self._blind_until - t:.0f} s",
                "wait, then start the move again",
            )
        with self._lock:
            self._seen = {n: e for n, e in self._seen.items() if e + CLOCK_SKEW_S >= t}
            if claims.nonce in self._seen:
                raise _refuse("it was already used (replayed)")
            self._seen[claims.nonce] = claims.expires_at
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._seen))
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
