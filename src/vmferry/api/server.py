"""``ferryd``: the host agent. Serves the API over HTTPS with client certificates."""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from vmferry.api.app import create_app
from vmferry.api.peer import AgentTLS
from vmferry.host import Host

DEFAULT_PORT = 7443


def _peer_cert(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The verified client certificate (``ssl.SSLSocket.getpeercert``'s dict), or None."""
    sslobj = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return None
    cert = sslobj.getpeercert()
    return dict(cert) if cert else None


def _peer_cn(cert: dict[str, Any] | None) -> str | None:
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class _TLSIdentityProtocol(H11Protocol):
    """h11 protocol that hands the verified client certificate (and its CN) to the app."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        cert = _peer_cert(transport)
        cn = _peer_cn(cert)
        inner = self.app

        async def app(scope: Any, receive: Any, send: Any) -> None:
            # the certificate's role and serial are checked by api/security.py
            scope.setdefault("extensions", {})["tls"] = {"client_cn": cn, "peer_cert": cert}
            await inner(scope, receive, send)

        self.app = app


def main(argv: list[str] | None = None) -> None:
    """Run the agent until SIGTERM. VMs keep running when it stops."""
    ap = argparse.ArgumentParser(prog="ferryd", description="vmferry host agent")
    ap.add_argument("--state-dir", type=Path, default=Path("/var/lib/vmferry"))
    ap.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_PORT}", help="ADDRESS:PORT")
    ap.add_argument("--tls-cert", type=Path, required=True)
    ap.add_argument("--tls-key", type=Path, required=True)
    ap.add_argument("--tls-ca", type=Path, required=True, help="CA that signs client certificates")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    addr, _, port = args.listen.rpartition(":")
    host = Host(args.state_dir)
    app = create_app(host, tls=AgentTLS(args.tls_cert, args.tls_key, args.tls_ca))
    config = uvicorn.Config(
        app,
        host=addr,
        port=int(port),
        ssl_certfile=str(args.tls_cert),
        ssl_keyfile=str(args.tls_key),
        ssl_ca_certs=str(args.tls_ca),
        ssl_cert_reqs=ssl.CERT_OPTIONAL,
        http=_TLSIdentityProtocol,
        log_level=args.log_level,
        access_log=False,
        proxy_headers=False,  # the peer address is the audit log's "from where": never rewrite it
        lifespan="on",
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
