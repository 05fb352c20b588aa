"""Fixtures of the browser tests: a 2-host lab, the Admin Center in front of it, chromium.

The lab helpers (``LabHandle``, ``wait_for``, ``needs_lab``) are the integration tests' own,
loaded from ``tests/integration/conftest.py`` under another module name (this directory
cannot see that conftest's fixtures). The lab here lives only for this directory's module:
the browser tests run before ``tests/integration`` and tear their lab down first.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmferry.client import HostEndpoint
from vmferry.lab import Lab
from vmferry.security import CertificateAuthority, CertPaths

_spec = importlib.util.spec_from_file_location(
    "vmferry_integration_helpers", Path(__file__).parents[1] / "integration" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
LabHandle = helpers.LabHandle
wait_for = helpers.wait_for
needs_lab = helpers.needs_lab
cleanup_vms = helpers.cleanup_vms

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

needs_browser = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium"),
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None, reason="needs the playwright package"
    ),
]


@pytest.fixture(scope="module")
def lab2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A 2-host lab without etcd (standalone hosts), for this module only."""
    if os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("the lab needs root and QEMU")
    base = tmp_path_factory.mktemp("browser-lab")
    old = os.environ.get("FERRY_CONFIG")
    os.environ["FERRY_CONFIG"] = str(base / "client.json")
    lab = Lab(base / "lab")
    try:
        lab.up(2, etcd_members=0)
        yield LabHandle(lab)
    finally:
        lab.down()
        if old is None:
            os.environ.pop("FERRY_CONFIG", None)
        else:
            os.environ["FERRY_CONFIG"] = old


@dataclass
class AdminCenter:
    """A running Admin Center: its URL, the CA, and a user certificate to get tokens with."""

    url: str
    ca: Path
    user: CertPaths
    state_dir: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def admin_center(lab2: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminCenter]:
    """``ferry admin serve`` in a thread of this process, in front of the lab's agents.

    Certificates as docs/admin-center.md says: an HTTPS certificate issued like
    ``ferry cert issue host admin-center --ip 127.0.0.1``, and a service identity issued like
    ``ferry cert issue user admin-center-svc --role admin``.
    """
    from vmferry.web import Agents, ServerTLS, WebSettings, create_app, make_server, start_in_thread

    d = tmp_path_factory.mktemp("admin-center")
    ca = CertificateAuthority(lab2.lab.dir / "pki")
    server = ca.issue(d, "admin-center", role="host", server_names=["127.0.0.1"])
    svc = ca.issue(d, "admin-center-svc", role="admin")
    eps = {}
    for h in ("h1", "h2"):
        lab2.client(h).close()  # checks that the agent's address routes via the lab
        ep = lab2.lab.endpoint(h)
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
            user=CertPaths(lab2.lab.dir / "pki" / "operator.crt",
                           lab2.lab.dir / "pki" / "operator.key", ca.cert_path),
            state_dir=d / "state",
        )  # fmt: skip
    finally:
        srv.should_exit = True
        thread.join(15)
        agents.close()


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
