"""The `ferry` CLI against a lab agent: JSON listings, settings, errors with exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import LabHandle, needs_lab

pytestmark = needs_lab


def ferry(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", *args],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )  # fmt: skip


def test_vm_lifecycle_through_cli(lab: LabHandle) -> None:
    ip = lab.guest_ip()
    r = ferry("--host", "h2", "vm", "create", "cli1", "--memory", "128", "--disk", "16",
              "--nic", "external", "--ip", f"{ip}/24", "--output", "json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    vm = json.loads(r.stdout)
    assert vm["state"] == "off" and vm["nics"][0]["mac"].startswith("52:54:00:")
    try:
        assert ferry("--host", "h2", "vm", "start", "cli1").returncode == 0
        listing = json.loads(ferry("--host", "h2", "vm", "list", "--output", "json").stdout)
        assert [(v["name"], v["state"]) for v in listing] == [("cli1", "running")]
        lab.wait_guest(ip)
        assert "FERRY-READY" in ferry("--host", "h2", "vm", "console", "cli1").stdout
        # A refused request: non-zero exit, the message names the field and the fix.
        bad = ferry("--host", "h2", "vm", "delete", "cli1")
        assert bad.returncode == 1
        assert "running" in bad.stderr and "ferry vm stop cli1" in bad.stderr
    finally:
        lab.remove_vm("h2", "cli1")


def test_host_settings_through_cli(lab: LabHandle) -> None:
    r = ferry("--host", "h1", "host", "set", "--switch", "internal=br-int",
              "--memory-reserve", "300", "--output", "json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["switches"]["internal"]["bridge"] == "br-int" and s["memory_reserve_mib"] == 300
    show = json.loads(ferry("--host", "h1", "host", "show", "--output", "json").stdout)
    assert {"name": "internal", "bridge": "br-int", "uplink": None, "present": True} in show[
        "switches"
    ]
    bad = ferry("--host", "h1", "host", "set", "--add-storage-root", "/nonexistent/x")
    assert bad.returncode == 1 and "storage_roots" in bad.stderr
    r = ferry("--host", "h1", "host", "set", "--remove-switch", "internal",
              "--memory-reserve", "256")  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_unknown_host_is_a_clear_error(lab: LabHandle) -> None:
    r = ferry("--host", "nosuch", "vm", "list")
    assert r.returncode == 1 and "unknown host 'nosuch'" in r.stderr
