"""Processes inside lab namespaces: detached daemons (recorded) and short commands."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from vmferry.lab.records import LabRecords, pid_matches, pid_start_time, pid_state

# Popen objects of daemons we spawned, so we can reap them (and avoid zombies/ResourceWarnings).
_children: dict[int, subprocess.Popen[bytes]] = {}


def _netns_argv(netns: str | None, argv: list[str]) -> list[str]:
    if not argv:
        raise ValueError("empty argv")
    if netns is None:
        return list(argv)
    if not netns or netns.startswith("-") or "/" in netns:
        raise ValueError(f"bad netns name {netns!r}")
    # `ip netns exec` execs the command, so the pid of this process is the command's pid.
    return ["ip", "netns", "exec", netns, *argv]


def spawn_in_netns(
    records: LabRecords,
    netns: str | None,
    argv: list[str],
    log_path: Path,
    what: str,
    env: dict[str, str] | None = None,
) -> int:
    """Start a detached process in ``netns`` (None = root), record it, return its pid."""
    full = _netns_argv(netns, argv)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(
            full,
            stdin=devnull,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=env,
        )
    start = pid_start_time(proc.pid)
    _children[proc.pid] = proc
    # A process that already exited and was reaped has no start time; record 0 (never matches).
    records.add("pid", pid=proc.pid, start_time=start if start is not None else 0, what=what)
    return proc.pid


def _gone(pid: int, start_time: int) -> bool:
    proc = _children.get(pid)
    if proc is not None:
        if proc.poll() is not None:
            del _children[pid]
            return True
        return False
    return not pid_matches(pid, start_time) or pid_state(pid) in ("Z", "X")


def _wait_gone(pid: int, start_time: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if _gone(pid, start_time):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def stop_pid(pid: int, start_time: int | None, timeout: float = 10.0) -> bool:
    """SIGTERM, wait up to ``timeout``, then SIGKILL the process ``pid``.

    Acts only if the pid still belongs to the same process (start time matches; ``None``
    means unknown, so nothing is signalled). Returns True if such a process was found and
    has exited; False if nothing matched (or, rarely, it survived SIGKILL).
    """
    if start_time is None or not pid_matches(pid, start_time) or _gone(pid, start_time):
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not pid_matches(pid, start_time):
            break
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        if _wait_gone(pid, start_time, wait):
            return True
    return _wait_gone(pid, start_time, 0.0)


def run_in_netns(netns: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a short command in ``netns``; output captured, never raises on a nonzero exit."""
    return subprocess.run(
        _netns_argv(netns, argv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def alive(pid: int) -> bool:
    """True while the process runs (a zombie waiting to be reaped does not count)."""
    return pid_state(pid) not in (None, "Z", "X")


def qemus_of(uuid: str) -> list[int]:
    """Every live QEMU process on this machine (any lab host) running the VM with ``uuid``."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and uuid.encode() in argv and alive(int(p.name)):
            found.append(int(p.name))
    return found
