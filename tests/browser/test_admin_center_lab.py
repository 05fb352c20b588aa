"""The Admin Center in a real browser against the lab: log in, see, move live, read the log."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from conftest import ARTIFACTS, AdminCenter, cleanup_vms, needs_browser, needs_lab, wait_for

pytestmark = [*needs_browser, *needs_lab]

VM = "webui1"
T = TypeVar("T")


def off_loop(fn: Callable[[], T]) -> T:
    """Run a lab call in a worker thread: Playwright's sync API keeps an asyncio loop running
    in this thread, and pyroute2 (the lab's route check) needs one of its own."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result(timeout=300)


def _token(ac: AdminCenter) -> dict[str, Any]:
    """``ferry admin token`` with the lab's operator certificate (the real command)."""
    out = subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", "admin", "token", "--url", ac.url,
         "--cert", str(ac.user.cert), "--key", str(ac.user.key), "--ca", str(ac.ca), "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_log_in_see_hosts_move_live_and_find_the_event(
    lab2: Any, admin_center: AdminCenter, chromium: Any
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    _, ip = off_loop(lambda: lab2.make_vm("h1", VM, roles="heartbeat,udpecho", memory=128))
    off_loop(lambda: lab2.wait_guest(ip))
    tok = _token(admin_center)
    assert tok["cn"] == "operator" and tok["role"] == "operator"

    # the Admin Center's certificate comes from the lab CA, which chromium does not know
    ctx = chromium.new_context(ignore_https_errors=True, viewport={"width": 1366, "height": 768})
    page = ctx.new_page()
    page.set_default_timeout(30_000)
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    try:
        page.goto(admin_center.url + "/")
        assert page.url.endswith("/login")
        page.fill("#token", tok["token"])
        page.click("button[type=submit]")
        page.wait_for_url(admin_center.url + "/")
        for host in ("h1", "h2"):
            row = page.locator(f'tr[data-host="{host}"]')
            assert row.is_visible() and "up" in row.inner_text()
        vm_row = page.locator(f'tr[data-vm="{VM}"]')
        assert "running" in vm_row.inner_text() and "h1" in vm_row.inner_text()
        assert "operator" in page.locator("header").inner_text()
        page.screenshot(path=str(ARTIFACTS / "1-dashboard.png"), full_page=True)

        # the wizard: h2, live, what-if first, then start
        vm_row.locator("a", has_text="Move").first.click()
        page.wait_for_url(re.compile(r"/move\?vm="))
        page.check('input[name=destination][value="h2"]')
        page.check('input[name=mode][value="live"]')
        page.click("#what-if-button")
        page.wait_for_selector("text=every check passed")
        page.screenshot(path=str(ARTIFACTS / "2-what-if.png"), full_page=True)
        page.click("#start-button")
        page.wait_for_url(re.compile(r"/migrations/h1/[0-9a-f]+$"))
        job_id = page.url.rsplit("/", 1)[1]

        # progress updates by itself (SSE); the page reloads once the job has ended
        started = time.monotonic()
        ended = ", ".join(
            f'.progress-line[data-state="{st}"]' for st in ("completed", "failed", "cancelled")
        )
        page.wait_for_selector(ended, timeout=180_000)
        state = page.inner_text("#job-state").strip()
        page.screenshot(path=str(ARTIFACTS / "3-migration.png"), full_page=True)
        assert state == "completed", page.inner_text("main")
        page.wait_for_selector("svg.chart rect")
        took = time.monotonic() - started
        # the progress came over the job's server-sent event stream
        assert admin_center.url + f"/migrations/h1/{job_id}/stream" in urls

        page.goto(admin_center.url + "/moves")
        row = page.locator(f'tr[data-job="{job_id}"]')
        assert "completed" in row.inner_text()
        page.screenshot(path=str(ARTIFACTS / "4-moves.png"), full_page=True)

        page.goto(admin_center.url + f"/events?vm={VM}")
        page.wait_for_selector(f"text=move {job_id} of {VM} to h2 completed")
        page.screenshot(path=str(ARTIFACTS / "5-events.png"), full_page=True)

        def owner_on_dashboard() -> str:
            page.goto(admin_center.url + "/")
            return page.locator(f'tr[data-vm="{VM}"] td').nth(2).inner_text()

        assert wait_for(lambda: owner_on_dashboard() == "h2", 30, "the VM on h2")
    finally:
        ctx.close()
        off_loop(lambda: cleanup_vms(lab2, VM))
    assert took < 180
    audit = (admin_center.state_dir / "audit" / "audit.jsonl").read_text()
    assert f'"message":"move {VM} to h2"' in audit and '"cn":"operator"' in audit
