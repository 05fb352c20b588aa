"""``ferry doctor h1 h2`` in the lab (issue 7, item 4): all pass on a healthy lab; a broken
migration link, a wrong migration network and a VM on a switch h2 lacks each show up as a
FAIL with the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from conftest import LabHandle, cleanup_vms, needs_lab

pytestmark = needs_lab


def _doctor() -> tuple[int, list[dict[str, Any]]]:
    r = subprocess.run(
        [sys.executable, "-m", "vmferry.cli.main", "doctor", "h1", "h2", "-o", "json"],
        capture_output=True, text=True, timeout=180, env=dict(os.environ),
    )  # fmt: skip
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def _not_passing(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in checks if c["status"] != "pass"]


@contextmanager
def _link_down(lab: LabHandle, host: str) -> Iterator[None]:
    h = lab.topo.host(host)
    subprocess.run(["ip", "-n", h.netns, "link", "set", h.migration_if, "down"], check=True)
    try:
        yield
    finally:
        subprocess.run(["ip", "-n", h.netns, "link", "set", h.migration_if, "up"], check=True)


def test_doctor_in_the_lab(lab: LabHandle) -> None:
    h2 = lab.topo.host("h2")

    # healthy: every check passes, the source really connected to h2's migration listener and
    # the running VM passed move --what-if's CPU checks
    lab.make_vm("h1", "doc0", memory=128)
    try:
        rc, checks = _doctor()
    finally:
        cleanup_vms(lab, "doc0")
    assert rc == 0, _not_passing(checks)
    assert any(c["check"] == "cpu" and "1 running VM(s) pass" in c["saw"] for c in checks)
    [reach] = [c for c in checks if c["check"] == "network reach" and c["scope"].startswith("h1->")]
    assert reach["scope"] == f"h1->h2 {h2.migration_ip}" and "opened TCP" in reach["saw"]
    assert {"versions", "switches", "cpu", "certificates", "names resolve"} <= {
        c["check"] for c in checks
    }

    # the destination's migration link is down: the reach check fails with the fix
    with _link_down(lab, "h2"):
        rc, checks = _doctor()
    assert rc == 1
    [bad] = [c for c in checks if c["scope"] == f"h1->h2 {h2.migration_ip}"]
    assert bad["check"] == "network reach" and bad["status"] == "fail"
    assert f"bring up h2's interface with {h2.migration_ip}" in bad["fix"]
    assert not [c for c in _not_passing(checks) if c["check"] not in ("network reach",)]

    # a wrong migration network on h2 (through the API): h2 listens nowhere
    with lab.client("h2") as c:
        before = c.settings()["migration"]
        c.update_settings(migration={**before, "networks": ["10.250.0.0/24"],
                                     "trusted_networks": []})  # fmt: skip
    try:
        rc, checks = _doctor()
    finally:
        with lab.client("h2") as c:
            c.update_settings(migration=before)
    assert rc == 1
    fails = {(c["check"], c["scope"]): c for c in checks if c["status"] == "fail"}
    fix = f"ferry --host h2 host migration-network add {lab.topo.migration_cidr} --position 1"
    assert fails[("migration networks", "h2")]["fix"] == fix
    assert fails[("network reach", "h1->h2")]["fix"] == fix

    # a VM on h1 on a switch only h1 has: the switch check names the VM and the switch
    with lab.client("h1") as c:
        switches = c.settings()["switches"]
        c.update_settings(switches={**switches, "doctorsw": {"bridge": "br-doctor"}})
        c.create_vm({"name": "doc1", "memory_mib": 64, "nics": [{"switch": "doctorsw"}]})
    try:
        rc, checks = _doctor()
    finally:
        with lab.client("h1") as c:
            c.delete_vm("doc1")
            c.update_settings(switches=switches)
    assert rc == 1
    [bad] = _not_passing(checks)
    assert (bad["check"], bad["scope"], bad["status"]) == ("switches", "h1->h2 doc1", "fail")
    assert "VM doc1" in bad["saw"] and "'doctorsw'" in bad["saw"]
    assert bad["fix"].startswith("ferry --host h2 host set --switch doctorsw=br-doctor")

    # and healthy again
    rc, checks = _doctor()
    assert rc == 0, _not_passing(checks)
