"""The agents' event logs in the lab: what a move, a refusal, a cancel and a failure leave behind,
read through the API and ``ferry events`` (issue 7, item 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from conftest import LabHandle, cleanup_vms, move, needs_lab, wait_for, wait_job

from vmferry.client import ConflictError

pytestmark = needs_lab


def _ferry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", *args],
        capture_output=True, text=True, timeout=60, env=dict(os.environ),
    )  # fmt: skip


def _events(lab: LabHandle, host: str, **flt: Any) -> list[dict[str, Any]]:
    with lab.client(host) as c:
        return c.events(**flt)


def test_events_for_success_refusal_cancel_and_failure(lab: LabHandle) -> None:
    lab.make_vm("h1", "ev1", roles="heartbeat,udpecho")
    ip2 = lab.guest_ip()  # a guest that rewrites 64 MB: a 40 Mbit/s pre-copy never ends
    with lab.client("h1") as c:
        c.create_vm({"name": "ev2", "memory_mib": 256, "nics": [{"switch": "external"}],
                     "probe": {"ip": f"{ip2}/24", "roles": ["heartbeat", "udpecho", "dirty"],
                               "dirty": "64M@0:full"}})  # fmt: skip
        c.action("ev2", "start")
    lab.wait_guest(ip2)
    try:
        # success: every phase, then the outcome with its figures
        job = move(lab, "h1", "ev1", "h2")
        assert job["state"] == "completed"
        evs = _events(lab, "h1", job=job["id"])
        phases = [e["data"]["phase"] for e in evs if e["kind"] == "migration-phase"]
        assert phases == [p["phase"] for p in job["phases"] if p["phase"] != "queued"]
        [done] = [e for e in evs if e["kind"] == "migration-completed"]
        assert done["vm"] == "ev1" and done["data"]["total_s"] == job["total_s"]
        assert done["host"] == "h1" and done["level"] == "info"

        # refusal: starting a VM that runs is refused; the event names it and the fix
        with lab.client("h2") as c, pytest.raises(ConflictError):
            c.action("ev1", "start")
        [ref] = _events(lab, "h2", kind="refused", limit=1)
        assert "/v1/vms/ev1/actions" in ref["message"] and ref["level"] == "warning"

        # cancel: a move that cannot converge, cancelled during pre-copy
        job = move(lab, "h1", "ev2", "h2", wait=False, policy="precopy", bandwidth_mbps=40)
        with lab.client("h1") as c:
            wait_for(lambda: c.migration(job["id"])["phase"] == "precopy", 60, "precopy")
            c.cancel_migration(job["id"])
        assert wait_job(lab, "h1", job["id"])["state"] == "cancelled"
        [can] = [e for e in _events(lab, "h1", job=job["id"]) if e["kind"] != "migration-phase"]
        assert can["kind"] == "migration-cancelled" and can["level"] == "warning"

        # failure: the destination refuses incoming moves; the move fails in its checks
        with lab.client("h1") as c:
            before = c.settings()["migration"]
            c.update_settings(migration={**before, "enabled": False})
        try:
            job = move(lab, "h2", "ev1", "h1")
        finally:
            with lab.client("h1") as c:
                c.update_settings(migration=before)
        assert job["state"] == "failed"
        [fail] = _events(lab, "h2", kind="migration-failed", job=job["id"])
        assert fail["level"] == "error" and "disabled" in fail["message"]

        # ferry events: both hosts merged by time, filtered by VM
        r = _ferry("events", "--vm", "ev1", "--limit", "200", "-o", "json")
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)
        assert {e["host"] for e in rows} == {"h1", "h2"}
        assert [e["at"] for e in rows] == sorted(e["at"] for e in rows)
        assert {"migration-completed", "refused", "migration-failed"} <= {e["kind"] for e in rows}
        r = _ferry("events", "--host", "h2", "--level", "error", "-o", "json")
        assert r.returncode == 0, r.stderr
        assert all(e["level"] == "error" and e["host"] == "h2" for e in json.loads(r.stdout))
    finally:
        cleanup_vms(lab, "ev1", "ev2")
