"""The fence guard: stops a node's clustered VMs even when ``ferryd`` itself is dead or hung.

The agent's own watchdog fences when renewals fail, but a killed or hung agent renews nothing
and fences nothing, while its lease runs out and other nodes may start its VMs. So while the
node owns running clustered VMs, the agent keeps a small separate process alive (its own
session, so it outlives the agent) and, after every good renewal, writes
``<state>/cluster-guard.json``: the fence deadline on the host's monotonic clock (shared by
every process) and the QEMU processes (pid + start time) of those VMs. The guard checks every
``PERIOD`` seconds; once the deadline has passed by ``GRACE`` without a newer one, it SIGKILLs
those QEMUs and exits. It also exits when the agent disarms it (no clustered VM left) or the
file is gone. A restarted agent finds the guard by its pid file and keeps feeding it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vmferry.procinfo import pid_matches, pid_start_time, pid_state
from vmferry.qemu import QemuProcess

GUARD_FILE = "cluster-guard.json"
PID_FILE = "cluster-guard.pid"
PERIOD = 0.2
_children: list[subprocess.Popen[bytes]] = []  # reaped here, so an exited guard is no zombie
GRACE = 0.3  # the agent's own watchdog fences at the deadline; the guard just after


def write_orders(state_dir: Path, deadline_mono: float, vms: list[dict[str, Any]]) -> None:
    """Tell the guard the new fence deadline and which QEMUs to stop (atomic write)."""
    data = {"armed": bool(vms), "deadline": deadline_mono, "vms": vms}
    tmp = state_dir / (GUARD_FILE + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, state_dir / GUARD_FILE)


def running_guard(state_dir: Path) -> int | None:
    """The pid of this state directory's guard if it runs."""
    try:
        pid_s, start_s = (state_dir / PID_FILE).read_text().split()
        pid, start = int(pid_s), int(start_s)
    except (OSError, ValueError):
        return None
    for child in list(_children):
        if child.poll() is not None:
            _children.remove(child)
    alive = pid_matches(pid, start) and pid_state(pid) not in ("Z", "X")
    return pid if alive else None


def ensure_guard(state_dir: Path) -> int:
    """Start the guard unless it runs; its pid."""
    pid = running_guard(state_dir)
    if pid is not None:
        return pid
    with open(state_dir / "cluster-guard.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmferry.cluster.guard", "--state-dir", str(state_dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    _children.append(proc)
    start = pid_start_time(proc.pid) or 0
    (state_dir / PID_FILE).write_text(f"{proc.pid} {start}")
    return proc.pid


def run(state_dir: Path) -> str:
    """The guard's loop; returns why it stopped."""
    path = state_dir / GUARD_FILE
    while True:
        try:
            orders = json.loads(path.read_text())
        except FileNotFoundError:
            return "orders gone"
        except (OSError, ValueError):
            time.sleep(PERIOD)  # a torn read cannot happen (atomic replace), but be patient
            continue
        if not orders.get("armed"):
            return "disarmed"
        if time.monotonic() > float(orders["deadline"]) + GRACE:
            killed = []
            for vm in orders.get("vms", []):
                proc = QemuProcess(int(vm["pid"]), int(vm["start_time"]))
                if proc.alive():
                    proc.kill()
                    killed.append(vm["name"])
            return f"fenced {killed} (no lease renewal before the deadline)"
        time.sleep(PERIOD)


def main(argv: list[str] | None = None) -> None:
    """``python -m vmferry.cluster.guard --state-dir DIR``."""
    ap = argparse.ArgumentParser(prog="vmferry-fence-guard")
    ap.add_argument("--state-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    why = run(args.state_dir)
    sys.stderr.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} fence guard: {why}\n")
    (args.state_dir / PID_FILE).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
