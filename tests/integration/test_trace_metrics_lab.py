"""A real live move in the lab leaves a trace and moves the agent's metrics (issue 7, 2 and 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import LabHandle, cleanup_vms, move, needs_lab
from prometheus_client.parser import text_string_to_metric_families

pytestmark = needs_lab


def _moves_completed(lab: LabHandle, host: str) -> float:
    with lab.client(host) as c:
        text = c.metrics_text()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "vmferry_moves_total" and s.labels == {
                "kind": "live", "outcome": "completed",
            }:  # fmt: skip
                return float(s.value)
    raise AssertionError("vmferry_moves_total{kind=live,outcome=completed} missing")


def test_live_move_trace_and_metrics(lab: LabHandle) -> None:
    _, ip = lab.make_vm("h1", "tr1", roles="heartbeat,udpecho", disk_mib=32)
    try:
        lab.wait_guest(ip)
        before = _moves_completed(lab, "h1")
        job = move(lab, "h1", "tr1", "h2")  # shared-nothing: the disk is mirrored first
        assert job["state"] == "completed", job["error"]
        assert _moves_completed(lab, "h1") == before + 1

        with lab.client("h1") as c:
            tr = c.migration_trace(job["id"])
        assert [p["phase"] for p in tr["phases"]] == [p["phase"] for p in job["phases"]]
        assert "mirror" in [p["phase"] for p in tr["phases"]]
        starts = [p["start_s"] for p in tr["phases"]]
        assert starts == sorted(starts)
        assert tr["passes"] and any(p["bytes"] > 0 for p in tr["passes"]), tr["passes"]
        assert tr["passes"][0]["pass"] >= 1
        assert any(s["disk_total"] > 0 and s["disk_transferred"] > 0 for s in tr["samples"])

        # ferry migration show ID --trace: the table, and the same trace as JSON
        cmd = [sys.executable, "-m", "vmferry.cli.main", "--host", "h1", "migration", "show",
               job["id"], "--trace"]  # fmt: skip
        env = dict(os.environ)
        table = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
        assert table.returncode == 0, table.stderr
        assert "memory passes" in table.stdout and "precopy" in table.stdout
        raw = subprocess.run([*cmd, "--output", "json"], capture_output=True, text=True,
                             timeout=60, env=env)  # fmt: skip
        assert raw.returncode == 0, raw.stderr
        assert json.loads(raw.stdout)["passes"] == tr["passes"]
    finally:
        cleanup_vms(lab, "tr1")
