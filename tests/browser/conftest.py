"""Fixtures of the browser tests: 2-host labs (standalone, or with the lab's etcd for
clusters), the Admin Center in front of them, chromium.

Each lab here lives only for one module: the browser tests run before ``tests/integration``
and tear their labs down first. Helpers that are not fixtures are in ``browser_support.py``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from types import FunctionType
from typing import Any

import pytest
from browser_support import CHROMIUM, CHROMIUM_ARGS, AdminCenter, LabHandle, helpers

from vmferry.client import HostEndpoint
from vmferry.lab import Lab
from vmferry.security import CertificateAuthority, CertPaths

# The helpers of tests/integration/conftest.py (not its fixtures) under the same names: the
# integration modules take them from ``conftest``, which is this module when pytest loaded it
# last (browser tests import test_failover and test_cluster_moves; ``pytest tests/integration
# tests/browser`` loads both conftests before importing any test module).
globals().update(
    {
        k: v
        for k, v in vars(helpers).items()
        if k == "needs_lab"
        or (isinstance(v, (type, FunctionType)) and v.__module__ == helpers.__name__)
    }
)


@contextlib.contextmanager
def _lab(base: Path, etcd_members: int) -> Iterator[Any]:
    """A 2-host lab under ``base`` with its own client configuration, torn down after."""
    if os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("the lab needs root and QEMU")
    if etcd_members and shutil.which("etcd") is None:
        pytest.skip("the cluster lab needs etcd")
    old = os.environ.get("FERRY_CONFIG")
    os.environ["FERRY_CONFIG"] = str(base / "client.json")
    lab = Lab(base / "lab")
    try:
        lab.up(2, etcd_members=etcd_members)
        yield LabHandle(lab)
    finally:
        lab.down()
        if old is None:
            os.environ.pop("FERRY_CONFIG", None)
        else:
            os.environ["FERRY_CONFIG"] = old


@pytest.fixture(scope="module")
def lab2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A 2-host lab without etcd (standalone hosts), for this module only."""
    with _lab(tmp_path_factory.mktemp("browser-lab"), 0) as handle:
        yield handle


@pytest.fixture(scope="module")
def lab_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A 2-host lab with the lab's 3-member etcd (for clusters), for this module only."""
    with _lab(tmp_path_factory.mktemp("browser-cluster-lab"), 3) as handle:
        yield handle


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _serve(lab: Any, d: Path) -> Iterator[AdminCenter]:
    """``ferry admin serve`` in a thread of this process, in front of ``lab``'s agents.

    Certificates as docs/admin-center.md says: an HTTPS certificate issued like
    ``ferry cert issue host admin-center --ip 127.0.0.1``, and a service identity issued like
    ``ferry cert issue user admin-center-svc --role admin``.
    """
    from vmferry.web import Agents, ServerTLS, WebSettings, create_app, make_server, start_in_thread

    ca = CertificateAuthority(lab.lab.dir / "pki")
    # its HTTPS certificate: server-only, no role (ferry cert issue server)
    server = ca.issue(d, "admin-center", role=None, server_names=["127.0.0.1"], client=False)
    svc = ca.issue(d, "admin-center-svc", role="admin")
    eps = {}
    for h in ("h1", "h2"):
        lab.client(h).close()  # checks that the agent's address routes via the lab
        ep = lab.lab.endpoint(h)
        eps[h] = HostEndpoint(url=ep.url, ca=ep.ca, cert=str(svc.cert), key=str(svc.key))
    agents = Agents(eps)
    app = create_app(agents, WebSettings(state_dir=d / "state", crl_file=ca.crl_path,
                                         ca=ca.cert_path))  # fmt: skip
    listen = f"127.0.0.1:{_free_port()}"
    srv = make_server(app, listen, ServerTLS(server.cert, server.key, ca.cert_path), "warning")
    thread = start_in_thread(srv)
    try:
        yield AdminCenter(
            url=f"https://{listen}",
            ca=ca.cert_path,
            user=CertPaths(lab.lab.dir / "pki" / "operator.crt",
                           lab.lab.dir / "pki" / "operator.key", ca.cert_path),
            state_dir=d / "state",
        )  # fmt: skip
    finally:
        srv.should_exit = True
        thread.join(15)
        agents.close()


@pytest.fixture(scope="module")
def admin_center(lab2: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminCenter]:
    """The Admin Center in front of ``lab2`` (standalone hosts)."""
    with _serve(lab2, tmp_path_factory.mktemp("admin-center")) as ac:
        yield ac


@pytest.fixture(scope="module")
def admin_center_etcd(
    lab_etcd: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AdminCenter]:
    """The Admin Center in front of ``lab_etcd`` (hosts that can form a cluster)."""
    with _serve(lab_etcd, tmp_path_factory.mktemp("admin-center-etcd")) as ac:
        yield ac


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Debian's chromium driven by Playwright (never ``playwright install``)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
