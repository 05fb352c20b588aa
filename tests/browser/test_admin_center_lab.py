"""The Admin Center in a real browser against the lab: log in, see, move live, read the log;
move a running VM's storage through the storage form."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from browser_support import (
    ARTIFACTS,
    AdminCenter,
    admin_token,
    cleanup_vms,
    log_in,
    needs_browser,
    needs_lab,
    off_loop,
    wait_for,
)

pytestmark = [*needs_browser, *needs_lab]

VM = "webui1"
STORAGE_VM = "webui2"


def test_log_in_see_hosts_move_live_and_find_the_event(
    lab2: Any, admin_center: AdminCenter, chromium: Any
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    _, ip = off_loop(lambda: lab2.make_vm("h1", VM, roles="heartbeat,udpecho", memory=128))
    off_loop(lambda: lab2.wait_guest(ip))
    tok = admin_token(admin_center)
    assert tok["cn"] == "operator" and tok["role"] == "operator"
    ctx, page = log_in(chromium, admin_center, tok["token"])
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    try:
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


def _vm(lab: Any, host: str, name: str) -> dict[str, Any]:
    with lab.client(host) as c:
        vm: dict[str, Any] = c.vm(name)
    return vm


def _disk_file(vm: dict[str, Any]) -> Path:
    """The VM's first disk as the agent reports it (its folder joined with the file)."""
    return Path(os.path.normpath(Path(vm["storage_dir"], vm["disks"][0]["file"])))


def test_storage_move_through_the_form_keeps_the_vm_running(
    lab2: Any, admin_center: AdminCenter, chromium: Any
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    _, ip = off_loop(
        lambda: lab2.make_vm("h1", STORAGE_VM, roles="heartbeat,udpecho", disk_mib=16, memory=128)
    )
    off_loop(lambda: lab2.wait_guest(ip))
    before = off_loop(lambda: _vm(lab2, "h1", STORAGE_VM))
    old_disk = _disk_file(before)
    assert old_disk.is_file()
    # another folder under h1's first storage root (absolute, as an admin would type it)
    target = lab2.lab.host_dir("h1") / "storage" / "moved" / STORAGE_VM
    hb = off_loop(lambda: lab2.stat(ip))["hb"]
    ctx, page = log_in(chromium, admin_center, admin_token(admin_center)["token"])
    try:
        row = page.locator(f'tr[data-vm="{STORAGE_VM}"]')
        assert "running" in row.inner_text()
        row.locator("a", has_text="Move storage").click()
        page.wait_for_url(re.compile(r"/storage\?vm="))
        assert before["storage_dir"] in page.inner_text("main")  # where it is now
        page.fill("#to", str(target))
        page.screenshot(path=str(ARTIFACTS / "6-storage-form.png"), full_page=True)
        page.click('form[action="/storage/start"] button[type=submit]')
        page.wait_for_url(re.compile(r"/migrations/h1/[0-9a-f]+$"))
        job_id = page.url.rsplit("/", 1)[1]
        assert "Storage move" in page.inner_text("h1")
        ended = ", ".join(
            f'.progress-line[data-state="{st}"]' for st in ("completed", "failed", "cancelled")
        )
        page.wait_for_selector(ended, timeout=180_000)
        state = page.inner_text("#job-state").strip()
        page.screenshot(path=str(ARTIFACTS / "7-storage-move.png"), full_page=True)
        assert state == "completed", page.inner_text("main")

        # the agent's view: new folder and disk file, the VM still running, the guest not
        # restarted (its heartbeat counter kept counting)
        after = off_loop(lambda: _vm(lab2, "h1", STORAGE_VM))
        assert os.path.normpath(after["storage_dir"]) == str(target)
        new_disk = _disk_file(after)
        assert new_disk != old_disk and new_disk.parent == target
        assert new_disk.is_file() and not old_disk.exists()
        assert after["state"] == "running" and after["uuid"] == before["uuid"]
        assert off_loop(lambda: lab2.stat(ip))["hb"] > hb, "the guest restarted"

        # and the storage form now shows the new folder
        page.goto(admin_center.url + f"/storage?vm={STORAGE_VM}")
        assert str(target) in page.inner_text("main")
        page.goto(admin_center.url + "/moves")
        assert "completed" in page.locator(f'tr[data-job="{job_id}"]').inner_text()
    finally:
        ctx.close()
        off_loop(lambda: cleanup_vms(lab2, STORAGE_VM))
    audit = (admin_center.state_dir / "audit" / "audit.jsonl").read_text()
    assert f'"message":"storage move of {STORAGE_VM}"' in audit
