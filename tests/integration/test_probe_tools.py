"""The blackout and session probes against a real guest paused for ~0.5 s (needs root, QEMU)."""

from __future__ import annotations

import time

import pytest
from conftest import LabHandle, needs_lab

from vmferry.errors import RefusedError
from vmferry.lab.lab import start_probe

pytestmark = needs_lab


def test_blackout_and_session_across_a_pause(lab: LabHandle) -> None:
    name = "probe-tools"
    _, ip = lab.make_vm("h1", name)
    try:
        lab.wait_guest(ip)
        with pytest.raises(RefusedError):
            start_probe(lab.lab, "blackout", "192.0.2.1", 1)
        bo = start_probe(lab.lab, "blackout", ip, 3)
        ses = start_probe(lab.lab, "session", ip, 3)
        try:
            time.sleep(1.0)
            with lab.client("h1") as c:
                c.action(name, "pause")
                time.sleep(0.5)
                c.action(name, "resume")
            time.sleep(1.0)
        finally:
            r_bo = bo.stop(timeout=30)
            r_ses = ses.stop(timeout=30)
        assert r_bo["ok"] is True, r_bo
        assert r_bo["longest_gap_ms"] >= 400, r_bo
        assert r_bo["received"] > 500, r_bo
        assert r_ses["ok"] is True and r_ses["reset"] is False, r_ses
        assert r_ses["longest_stall_ms"] >= 300, r_ses
    finally:
        lab.remove_vm("h1", name)
