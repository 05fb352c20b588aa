"""Agent -> agent calls check the peer's *server* certificate against the agent's CRL.

Real TLS on 127.0.0.1: small servers present host certificates of a CA made in a temporary
directory; the client side is the agent's own context (:meth:`AgentTLS.context`) and the
cluster peer client that uses it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vmferry.api.cluster_peer import HttpClusterPeer
from vmferry.api.peer import CRL_FILE, AgentTLS
from vmferry.api.security import CRLStore
from vmferry.errors import UnreachableError
from vmferry.security import CertificateAuthority, Role
from vmferry.security.pki import CertPaths


class _Member(BaseHTTPRequestHandler):
    """Answers ``GET /v1/cluster/member`` like an agent would (name only)."""

    def do_GET(self) -> None:
        body = json.dumps({"node": "peer"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


#: Starts an HTTPS server presenting the given certificate; returns its URL.
Serve = Callable[[CertPaths], str]


def _host(ca: CertificateAuthority, tmp_path: Path, name: str) -> CertPaths:
    return ca.issue(tmp_path / name, name, role=Role.host, server_names=["127.0.0.1"])


@pytest.fixture
def serve(ca: CertificateAuthority) -> Iterator[Serve]:
    """Start HTTPS servers on 127.0.0.1 with a given certificate; stopped after the test."""
    servers: list[ThreadingHTTPServer] = []

    def start(paths: CertPaths) -> str:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(ca.cert_path))
        ctx.load_cert_chain(str(paths.cert), str(paths.key))
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Member)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        srv.timeout = 5
        servers.append(srv)
        threading.Thread(
            target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        ).start()
        return f"https://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _handshake(ctx: ssl.SSLContext, url: str) -> None:
    """A TLS handshake with the server at ``url`` (raises SSLError when refused)."""
    port = int(url.rsplit(":", 1)[1])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1"),
    ):
        pass


def test_revoked_peer_server_certificate_is_refused(
    ca: CertificateAuthority, tmp_path: Path, serve: Serve
) -> None:
    state = tmp_path / "state"
    me = _host(ca, tmp_path, "h1")
    tls = AgentTLS(me.cert, me.key, ca.cert_path).with_state_dir(state)
    assert tls.crl == state / CRL_FILE
    bad_url = serve(_host(ca, tmp_path, "h2"))
    good_url = serve(_host(ca, tmp_path, "h3"))

    # no CRL yet: both peers are accepted (so the refusal below is the CRL's doing)
    before = tls.context()
    _handshake(before, bad_url)
    assert tls.context() is before  # kept while the CRL does not change

    ca.revoke("h2", reason="test")
    CRLStore(state, ca.cert_path).replace(ca.crl_pem())
    after = tls.context()
    assert after is not before  # rebuilt: the CRL file was replaced
    with pytest.raises(ssl.SSLCertVerificationError, match="revoked"):
        _handshake(after, bad_url)
    _handshake(after, good_url)

    # the cluster peer client takes the current context on every call
    peer = HttpClusterPeer(tls, timeout=5)
    assert asyncio.run(peer.member(good_url)) == {"node": "peer"}
    with pytest.raises(UnreachableError, match="revoked"):
        asyncio.run(peer.member(bad_url))


def test_crl_of_another_ca_is_not_used(
    ca: CertificateAuthority, tmp_path: Path, serve: Serve
) -> None:
    state = tmp_path / "state"
    me = _host(ca, tmp_path, "h1")
    tls = AgentTLS(me.cert, me.key, ca.cert_path).with_state_dir(state)
    url = serve(_host(ca, tmp_path, "h2"))
    other = CertificateAuthority.create(tmp_path / "other", "other CA")
    (state / CRL_FILE).parent.mkdir(parents=True)
    (state / CRL_FILE).write_text(other.crl_pem())  # not what CRLStore would have written
    _handshake(tls.context(), url)  # ignored (logged), as the agent's server side does


def test_crl_past_its_next_update_does_not_cut_peers_off(
    ca: CertificateAuthority, tmp_path: Path, serve: Serve
) -> None:
    state = tmp_path / "state"
    me = _host(ca, tmp_path, "h1")
    tls = AgentTLS(me.cert, me.key, ca.cert_path).with_state_dir(state)
    url = serve(_host(ca, tmp_path, "h2"))
    key = serialization.load_pem_private_key(ca.key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    issuer = x509.load_pem_x509_certificate(ca.cert_path.read_bytes()).subject
    now = dt.datetime.now(dt.UTC)
    stale = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer)
        .last_update(now - dt.timedelta(days=400))
        .next_update(now - dt.timedelta(days=35))
        .add_extension(x509.CRLNumber(99), critical=False)
        .sign(key, hashes.SHA256())
    )
    CRLStore(state, ca.cert_path).replace(stale.public_bytes(serialization.Encoding.PEM).decode())
    # the agent skips it (logged) instead of refusing every peer ...
    _handshake(tls.context(), url)
    # ... which is what OpenSSL's own check would do with it
    strict = ssl.create_default_context(cafile=str(ca.cert_path))
    strict.load_verify_locations(cafile=str(state / CRL_FILE))
    strict.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        _handshake(strict, url)
