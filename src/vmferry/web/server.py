"""Serve the Admin Center over HTTPS; a browser may present a user certificate (optional).

The TLS layer verifies a presented certificate's chain against the vmferry CA
(``CERT_OPTIONAL``: no certificate is fine, a bad one fails the handshake); the h11 protocol
below hands the verified certificate to the application, which checks its role and
revocation (:mod:`vmferry.web.auth`).
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from vmferry.errors import RefusedError
from vmferry.security.pki import cert_role

DEFAULT_LISTEN = "127.0.0.1:8443"


@dataclass(frozen=True)
class ServerTLS:
    """The Admin Center's own HTTPS certificate and key, and the CA users' certificates
    must chain to."""

    cert: Path
    key: Path
    ca: Path


class _PeerCertProtocol(H11Protocol):
    """h11 protocol that puts the verified client certificate (if any) into the ASGI scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sslobj = transport.get_extra_info("ssl_object")
        cert = sslobj.getpeercert() if sslobj is not None else None
        inner = self.app

        async def app(scope: Any, receive: Any, send: Any) -> None:
            scope.setdefault("extensions", {})["tls"] = {"peer_cert": dict(cert) if cert else None}
            await inner(scope, receive, send)

        self.app = app


def parse_listen(listen: str) -> tuple[str, int]:
    """``ADDRESS:PORT`` (IPv6 in brackets) as a pair; refused if malformed."""
    addr, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not addr:
        raise RefusedError(
            f"--listen {listen!r} is not ADDRESS:PORT", field="--listen", fix="127.0.0.1:8443"
        )
    return addr.strip("[]"), int(port)


def check_service_cert(cert: Path) -> None:
    """Refuse a service certificate without role admin (the Admin Center acts for admins)."""
    from cryptography import x509

    try:
        role = cert_role(x509.load_pem_x509_certificate(cert.read_bytes()))
    except (OSError, ValueError) as exc:
        raise RefusedError(f"cannot read {cert}: {exc}", field="--cert") from exc
    if role is None or role.value != "admin":
        raise RefusedError(
            f"the service certificate {cert} has role {role.value if role else 'none'}; "
            "the Admin Center needs role admin to act for every user",
            field="--cert",
            fix="ferry cert issue user admin-center-svc --role admin",
        )


def make_server(app: Any, listen: str, tls: ServerTLS, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for ``app`` on ``listen`` with TLS and optional client certificates."""
    host, port = parse_listen(listen)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=str(tls.cert),
        ssl_keyfile=str(tls.key),
        ssl_ca_certs=str(tls.ca),
        ssl_cert_reqs=ssl.CERT_OPTIONAL,
        http=_PeerCertProtocol,
        log_level=log_level,
        access_log=False,
        proxy_headers=False,  # the audit log's address is the peer's: never rewrite it
        lifespan="off",
        timeout_graceful_shutdown=2,
    )
    return uvicorn.Server(config)


def start_in_thread(server: uvicorn.Server, timeout: float = 15.0) -> threading.Thread:
    """Run ``server`` in a daemon thread and wait (bounded) until it listens."""
    thread = threading.Thread(target=server.run, name="admin-center", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the Admin Center did not start listening")
        time.sleep(0.05)
    return thread
