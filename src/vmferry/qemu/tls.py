"""QEMU's TLS credentials (``tls-creds-x509``): the directory layout QEMU reads and the object.

QEMU loads a ``tls-creds-x509`` object from a directory of fixed file names. One certificate
that carries both the client and the server usage (every host certificate vmferry issues)
fills both roles: the destination QEMU is the TLS server of the migration stream and of the
NBD export, the source QEMU its client.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vmferry.fsio import replace_file

Endpoint = Literal["server", "client"]

#: QEMU's file names inside the credentials directory.
CA_FILE = "ca-cert.pem"
CERT_FILES = ("server-cert.pem", "client-cert.pem")
KEY_FILES = ("server-key.pem", "client-key.pem")
DH_FILE = "dh-params.pem"

#: The ffdhe2048 group of RFC 7919 (public, standard). Without ``dh-params.pem`` a server-side
#: object makes QEMU generate fresh DH parameters on every ``object-add`` (0.1 s idle, seconds
#: on a loaded host); TLS 1.3 and ECDHE suites do not use them anyway.
FFDHE2048_PEM = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


@dataclass(frozen=True)
class X509Files:
    """A host's certificate, private key and CA certificate (PEM files)."""

    cert: Path
    key: Path
    ca: Path


def prepare_creds_dir(files: X509Files, directory: Path) -> Path:
    """Copy the host's PEM files into ``directory`` under QEMU's names (plus fixed DH
    parameters); return the directory.

    Called before each move, so a renewed certificate is used by the next move without
    restarting any VM. Keys are written mode 0600 in a 0700 directory; each file is replaced
    atomically (two moves may prepare the directory at once).
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    cert, key, ca = files.cert.read_bytes(), files.key.read_bytes(), files.ca.read_bytes()
    replace_file(directory / CA_FILE, ca, 0o644)
    replace_file(directory / DH_FILE, FFDHE2048_PEM, 0o644)
    for name in CERT_FILES:
        replace_file(directory / name, cert, 0o644)
    for name in KEY_FILES:
        replace_file(directory / name, key, 0o600)
    return directory


def creds_object(obj_id: str, directory: Path, endpoint: Endpoint) -> dict[str, Any]:
    """QMP ``object-add`` arguments of a ``tls-creds-x509`` object that verifies its peer.

    The server side asks for a client certificate signed by the same CA; the client side
    checks the server certificate against the CA and the expected host name.
    """
    return {
        "qom-type": "tls-creds-x509",
        "id": obj_id,
        "dir": str(directory),
        "endpoint": endpoint,
        "verify-peer": True,
    }


#: RFC 4514 characters escaped with a backslash anywhere in an attribute value.
_DN_SPECIAL = frozenset(',+"\\<>;')


def dn_escape(value: str) -> str:
    """Escape one attribute value the way RFC 4514 (and gnutls, which QEMU uses) writes it."""
    out = "".join(f"\\{c}" if c in _DN_SPECIAL else c for c in value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def host_identity(common_name: str) -> str:
    """The distinguished name QEMU reports for a vmferry host certificate named ``common_name``.

    QEMU's TLS server hands the client certificate's DN, as gnutls formats it (RFC 4514, most
    specific attribute first), to its ``authz`` object. vmferry's certificates carry only a
    common name in their subject (``security.pki``), so the DN is ``CN=<name>``.
    """
    return f"CN={dn_escape(common_name)}"


def authz_object(obj_id: str, identity: str) -> dict[str, Any]:
    """QMP ``object-add`` arguments of an ``authz-simple`` object admitting one identity."""
    return {"qom-type": "authz-simple", "id": obj_id, "identity": identity}
