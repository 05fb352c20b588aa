"""The fence guard stops the listed processes once the deadline passes without a newer one."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmferry.cluster import guard
from vmferry.procinfo import pid_start_time, pid_state


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def _orders(p: subprocess.Popen[bytes]) -> list[dict[str, object]]:
    return [{"name": "vm1", "pid": p.pid, "start_time": pid_start_time(p.pid)}]


def test_kills_after_the_deadline(tmp_path: Path, victim: subprocess.Popen[bytes]) -> None:
    guard.write_orders(tmp_path, time.monotonic() + 0.5, _orders(victim))
    t0 = time.monotonic()
    why = guard.run(tmp_path)
    took = time.monotonic() - t0
    assert "fenced ['vm1']" in why
    assert 0.5 + guard.GRACE - 0.05 <= took < 0.5 + guard.GRACE + 2 * guard.PERIOD + 0.5
    victim.wait(5)
    assert pid_state(victim.pid) is None


def test_a_fed_guard_does_not_kill_and_disarm_ends_it(
    tmp_path: Path, victim: subprocess.Popen[bytes]
) -> None:
    guard.write_orders(tmp_path, time.monotonic() + 0.6, _orders(victim))
    pid = guard.ensure_guard(tmp_path)
    assert guard.ensure_guard(tmp_path) == pid  # one guard per state directory
    for _ in range(8):  # keep feeding it well past the first deadline
        time.sleep(0.3)
        guard.write_orders(tmp_path, time.monotonic() + 0.6, _orders(victim))
    assert victim.poll() is None
    guard.write_orders(tmp_path, 0.0, [])
    deadline = time.monotonic() + 5
    while guard.running_guard(tmp_path) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert guard.running_guard(tmp_path) is None
    assert victim.poll() is None
    assert "disarmed" in (tmp_path / "cluster-guard.log").read_text()


def test_a_recycled_pid_is_never_killed(tmp_path: Path, victim: subprocess.Popen[bytes]) -> None:
    wrong = [{"name": "vm1", "pid": victim.pid, "start_time": 1}]  # same pid, other process
    guard.write_orders(tmp_path, time.monotonic() - 1, wrong)
    assert "fenced []" in guard.run(tmp_path)
    assert victim.poll() is None


def test_the_guard_process_loads_no_etcd_client_or_host_layer() -> None:
    """The guard starts when a node gets its first clustered VM: it must start fast (it loaded
    the etcd client, requests and pyroute2 through the package before, ~0.5 s of CPU)."""
    code = (
        "import sys, vmferry.cluster.guard; "
        "print(sorted(m for m in ('vmferry.cluster.etcd', 'vmferry.cluster.member', "
        "'vmferry.host', 'requests', 'pyroute2') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.strip() == "[]", out.stdout
