"""Helpers of the browser tests that are not fixtures (the fixtures are in conftest.py).

They live in a module of their own name so that a test module imports them the same way
whichever ``conftest`` pytest loaded last (``pytest tests/browser tests/integration/...``
loads both directories' conftests before importing any test module).

The lab helpers (``LabHandle``, ``wait_for``, ``needs_lab``, ...) are the integration tests'
own, loaded from ``tests/integration/conftest.py`` under another module name (this directory
cannot see that conftest's fixtures). ``tests/integration`` is also put on ``sys.path`` so
that browser tests can import the integration modules' helpers (``from test_failover import
ha_cluster``); those modules' ``from conftest import ...`` finds these names in either
conftest (tests/browser/conftest.py re-exports them).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from vmferry.security import CertPaths

INTEGRATION = Path(__file__).parents[1] / "integration"
_spec = importlib.util.spec_from_file_location(
    "vmferry_integration_helpers", INTEGRATION / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)
LabHandle = helpers.LabHandle
wait_for = helpers.wait_for
needs_lab = helpers.needs_lab
cleanup_vms = helpers.cleanup_vms
vm_names = helpers.vm_names  # test_cluster_moves imports it from "conftest"
if str(INTEGRATION) not in sys.path:
    sys.path.append(str(INTEGRATION))

T = TypeVar("T")

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


@dataclass
class AdminCenter:
    """A running Admin Center: its URL, the CA, and a user certificate to get tokens with."""

    url: str
    ca: Path
    user: CertPaths
    state_dir: Path

    def cert_of(self, role: str) -> CertPaths:
        """The lab's user certificate of ``role`` (admin, operator or viewer)."""
        pki = self.user.cert.parent
        return CertPaths(pki / f"{role}.crt", pki / f"{role}.key", self.ca)


def off_loop(fn: Callable[[], T]) -> T:
    """Run a lab call in a worker thread: Playwright's sync API keeps an asyncio loop running
    in this thread, and pyroute2 (the lab's route check) needs one of its own."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result(timeout=300)


@contextlib.contextmanager
def off_loop_cm(cm: contextlib.AbstractContextManager[T]) -> Iterator[T]:
    """Enter and exit a lab context manager (``ha_cluster``) in worker threads, as
    :func:`off_loop` does for one call."""
    value = off_loop(cm.__enter__)
    try:
        yield value
    except BaseException as exc:
        if not off_loop(functools.partial(cm.__exit__, type(exc), exc, exc.__traceback__)):
            raise
    else:
        off_loop(lambda: cm.__exit__(None, None, None))


def admin_token(ac: AdminCenter, role: str = "operator") -> dict[str, Any]:
    """``ferry admin token`` (the real command) with the lab's certificate of ``role``."""
    user = ac.cert_of(role)
    out = subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", "admin", "token", "--url", ac.url,
         "--cert", str(user.cert), "--key", str(user.key), "--ca", str(ac.ca), "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def log_in(browser: Any, ac: AdminCenter, token: str) -> tuple[Any, Any]:
    """A new browser context (laptop screen) logged in with ``token``: (context, page)."""
    # the Admin Center's certificate comes from the lab CA, which chromium does not know
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1366, "height": 768})
    page = ctx.new_page()
    page.set_default_timeout(30_000)
    page.goto(ac.url + "/")
    assert page.url.endswith("/login")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(ac.url + "/")
    return ctx, page
