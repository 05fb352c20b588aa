"""A small certificate authority for agents and admins (mutual TLS everywhere).

The CA directory holds ``ca.crt``/``ca.key``, an index of every certificate it issued
(``index.json``: serial, name, role, validity, revocation) and the signed revocation list
``crl.pem`` that ``ferry cert revoke`` pushes to the agents. Certificates carry their role in a
SAN URI (``urn:vmferry:role:<role>``, see :mod:`vmferry.security.roles`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmferry.errors import ConflictError, NotFoundError, RefusedError
from vmferry.fsio import replace_file
from vmferry.security.roles import Role, RoleError, role_from_uris, role_uri
from vmferry.security.tickets import parse_delegation

#: Certificate names become file names and CNs: keep them plain.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
#: How long a signed CRL says it is valid (agents keep using the newest one they have).
CRL_DAYS = 365


@dataclass(frozen=True)
class CertPaths:
    """Where one identity's certificate and key are, plus the CA that signed it."""

    cert: Path
    key: Path
    ca: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _atomic_write(path: Path, data: bytes) -> None:
    replace_file(path, data, 0o644, sync=True)


def serial_hex(serial: int) -> str:
    """A serial number as ``openssl x509 -serial`` prints it (upper-case hex)."""
    return f"{serial:X}"


def cert_role(cert: x509.Certificate) -> Role | None:
    """The role a certificate carries, or None (no role, unknown or several)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    try:
        return role_from_uris(san.get_values_for_type(x509.UniformResourceIdentifier))
    except RoleError:
        return None


class CertificateAuthority:
    """A CA kept in a directory: ``ca.crt``, ``ca.key``, ``index.json``, ``crl.pem``."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.cert_path = directory / "ca.crt"
        self.key_path = directory / "ca.key"
        self.index_path = directory / "index.json"
        self.crl_path = directory / "crl.pem"

    @classmethod
    def create(
        cls, directory: Path, name: str = "vmferry CA", days: int = 3650
    ) -> CertificateAuthority:
        """Create a new CA in ``directory`` (kept if one is already there), with an empty CRL."""
        ca = cls(directory)
        if ca.cert_path.exists() and ca.key_path.exists():
            return ca
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        _write_key(ca.key_path, key)
        ca.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        with ca._locked():
            ca._save_index({"crl_number": 0, "certs": []})
            ca._sign_crl()
        return ca

    def exists(self) -> bool:
        """Whether the directory holds a CA certificate and key."""
        return self.cert_path.exists() and self.key_path.exists()

    def _load(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        if not self.exists():
            raise NotFoundError(
                f"no certificate authority in {self.dir}",
                field="--ca-dir",
                fix=f"ferry ca init {self.dir} (or pass --ca-dir of the existing one)",
            )
        cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    # -- the index of issued certificates ------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise index and CRL updates (two ``ferry cert`` commands at once)."""
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _index(self) -> dict[str, Any]:
        if not self.index_path.exists():
            return {"crl_number": 0, "certs": []}
        data: dict[str, Any] = json.loads(self.index_path.read_text())
        return data

    def _save_index(self, data: dict[str, Any]) -> None:
        _atomic_write(self.index_path, json.dumps(data, indent=2).encode())

    def certificates(self) -> list[dict[str, Any]]:
        """Every certificate this CA issued (oldest first), with its revocation state."""
        now = dt.datetime.now(dt.UTC).timestamp()
        rows = []
        for c in self._index()["certs"]:
            state = "revoked" if c.get("revoked_at") else "valid"
            if state == "valid" and c["not_after"] < now:
                state = "expired"
            rows.append({**c, "state": state})
        return rows

    # -- issuing ---------------------------------------------------------------------------------
    def issue(
        self,
        out_dir: Path,
        common_name: str,
        *,
        role: Role | str | None = None,
        server_names: list[str] | None = None,
        client: bool = True,
        days: int = 825,
        not_after: dt.datetime | None = None,
        delegate: list[str] | None = None,
    ) -> CertPaths:
        """Issue a certificate for ``common_name`` into ``out_dir/<cn>.crt|.key``.

        ``role`` (viewer, operator, admin, host) goes into a SAN URI; agents refuse a
        certificate without one (etcd members' certificates need none). ``server_names``
        (IP addresses or DNS names) make it usable as a TLS server certificate. ``not_after``
        overrides ``days`` (tests issue expired certificates with it). ``delegate`` (host
        certificates: ``HOST``, ``HOST:live,quick`` or ``*``) lists where the host may act for
        a user who signed a move ticket (:mod:`vmferry.security.tickets`).
        """
        if not NAME_RE.match(common_name):
            raise RefusedError(
                f"certificate name {common_name!r} is not valid",
                field="name",
                fix="1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
            )
        try:
            role_v = Role(role) if role is not None else None
        except ValueError:
            known = ", ".join(r.value for r in Role)
            raise RefusedError(
                f"unknown role {role!r}", field="role", fix=f"one of {known}"
            ) from None
        delegation = [u for spec in delegate or [] for u in parse_delegation(spec)]
        if delegation and role_v is not Role.host:
            raise RefusedError(
                "only host certificates carry delegation targets",
                field="delegate",
                fix="issue it with ferry cert issue host NAME --ip ... --delegate HOST",
            )
        ca_cert, ca_key = self._load()
        out_dir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        valid_from = now - dt.timedelta(minutes=5)
        valid_to = not_after or now + dt.timedelta(days=days)
        if valid_to <= valid_from:
            valid_from = valid_to - dt.timedelta(days=1)
        usages = []
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid_from)
            .not_valid_after(valid_to)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        alt: list[x509.GeneralName] = []
        for n in server_names or []:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                alt.append(x509.DNSName(n))
        if server_names:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if role_v is not None:
            alt.append(x509.UniformResourceIdentifier(role_uri(role_v)))
        alt += [x509.UniformResourceIdentifier(u) for u in delegation]
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        paths = CertPaths(
            out_dir / f"{common_name}.crt", out_dir / f"{common_name}.key", self.cert_path
        )
        _write_key(paths.key, key)
        paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        with self._locked():
            index = self._index()
            index["certs"].append(
                {
                    "serial": serial_hex(cert.serial_number),
                    "name": common_name,
                    "role": role_v.value if role_v else None,
                    "names": list(server_names or []),
                    "delegate": list(delegate or []),
                    "not_before": valid_from.timestamp(),
                    "not_after": valid_to.timestamp(),
                    "path": str(paths.cert.resolve()),
                    "issued_at": now.timestamp(),
                    "revoked_at": None,
                    "reason": None,
                }
            )
            self._save_index(index)
        return paths

    # -- revocation ------------------------------------------------------------------------------
    def revoke(self, name_or_serial: str, reason: str = "") -> list[dict[str, Any]]:
        """Revoke every valid certificate named ``name_or_serial``, or the one with that serial.

        Returns the revoked entries and re-signs ``crl.pem``. Revoking an already revoked
        serial is refused (nothing to do); so is a name or serial the CA never issued.
        """
        with self._locked():
            index = self._index()
            want = name_or_serial.upper().removeprefix("0X").lstrip("0")
            by_serial = [c for c in index["certs"] if c["serial"].lstrip("0") == want and want]
            hits = by_serial or [c for c in index["certs"] if c["name"] == name_or_serial]
            if not hits:
                raise NotFoundError(
                    f"this CA issued no certificate named or numbered {name_or_serial!r}",
                    field="name",
                    fix="ferry cert list shows names and serials",
                )
            todo = [c for c in hits if not c.get("revoked_at")]
            if not todo:
                raise ConflictError(
                    f"every certificate matching {name_or_serial!r} is already revoked",
                    field="name",
                    fix="ferry cert push-crl sends the revocation list to the hosts again",
                )
            now = dt.datetime.now(dt.UTC).timestamp()
            for c in todo:
                c["revoked_at"] = now
                c["reason"] = reason or None
            self._save_index(index)
            self._sign_crl()
        return todo

    def _sign_crl(self) -> None:
        """Sign a new CRL listing every revoked serial, with the next CRL number (locked)."""
        ca_cert, ca_key = self._load()
        index = self._index()
        number = int(index.get("crl_number", 0)) + 1
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=CRL_DAYS))
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        for c in index["certs"]:
            if c.get("revoked_at"):
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(c["serial"], 16))
                    .revocation_date(dt.datetime.fromtimestamp(c["revoked_at"], dt.UTC))
                    .build()
                )
        crl = builder.sign(ca_key, hashes.SHA256())
        index["crl_number"] = number
        self._save_index(index)
        _atomic_write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))

    def renew_crl(self) -> str:
        """Sign the CRL again (next number, valid another ``CRL_DAYS``) and return it."""
        with self._locked():
            self._sign_crl()
        return self.crl_path.read_text()

    def crl_pem(self) -> str:
        """The current signed CRL (signed now if the CA predates revocation lists)."""
        if not self.crl_path.exists():
            with self._locked():
                self._sign_crl()
        return self.crl_path.read_text()


@dataclass(frozen=True)
class Revocations:
    """A verified CRL: the revoked serial numbers and the CRL's number and dates."""

    serials: frozenset[int]
    number: int
    last_update: float
    next_update: float | None
    pem: str

    def is_revoked(self, serial: int | None) -> bool:
        """Whether the certificate with ``serial`` is revoked."""
        return serial is not None and serial in self.serials

    def summary(self) -> dict[str, Any]:
        """The CRL as the API shows it."""
        return {
            "number": self.number,
            "revoked": sorted(serial_hex(s) for s in self.serials),
            "last_update": self.last_update,
            "next_update": self.next_update,
        }


def verify_crl(pem: str | bytes, ca_cert_path: Path) -> Revocations:
    """Parse a PEM CRL and check it was signed by the CA in ``ca_cert_path``."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise RefusedError(f"not a PEM revocation list: {exc}", field="crl") from exc
    ca = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    key = ca.public_key()
    if crl.issuer != ca.subject or not isinstance(key, ec.EllipticCurvePublicKey):
        raise RefusedError(
            f"the revocation list was issued by {crl.issuer.rfc4514_string()}, "
            f"not by this agent's CA ({ca.subject.rfc4514_string()})",
            field="crl",
            fix="push the crl.pem of the CA that signed the agents' certificates",
        )
    try:
        ok = crl.is_signature_valid(key)
    except InvalidSignature:
        ok = False
    if not ok:
        raise RefusedError(
            "the revocation list's signature does not verify with this agent's CA",
            field="crl",
            fix="push the crl.pem of the CA that signed the agents' certificates",
        )
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = 0
    nxt = crl.next_update_utc
    return Revocations(
        serials=frozenset(r.serial_number for r in crl),
        number=int(number),
        last_update=crl.last_update_utc.timestamp(),
        next_update=nxt.timestamp() if nxt else None,
        pem=data.decode(),
    )
