"""Start QEMU as a daemon that outlives the agent, and find it again by pid + start time."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


class QemuStartError(RuntimeError):
    """QEMU refused to start; the message carries what QEMU printed."""


def pid_start_time(pid: int) -> int | None:
    """The process start time (clock ticks since boot) of ``pid``, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces; fields after the last ')' are fixed.
    rest = stat[stat.rfind(")") + 2 :].split()
    return int(rest[19])


@dataclass(frozen=True)
class QemuProcess:
    """A running QEMU identified by pid and start time (so a recycled pid never matches)."""

    pid: int
    start_time: int

    def alive(self) -> bool:
        """True while this exact process exists and is not a zombie."""
        if pid_start_time(self.pid) != self.start_time:
            return False
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return state[state.rfind(")") + 2 :].split()[0] != "Z"

    def kill(self, timeout: float = 5.0) -> None:
        """SIGKILL the process (only if it is still the same process) and wait for it to go."""
        if not self.alive():
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.02)

    def wait_gone(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to exit; True if it did."""
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True


def spawn_daemon(argv: list[str], pidfile: Path, timeout: float = 30.0) -> QemuProcess:
    """Run a ``-daemonize`` QEMU command line and return the daemon it left behind.

    QEMU reports configuration errors before it detaches, so a non-zero exit of the launcher
    raises :class:`QemuStartError` with QEMU's own words.
    """
    pidfile.unlink(missing_ok=True)
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired as exc:
        raise QemuStartError(f"QEMU did not daemonize within {timeout:.0f} s") from exc
    except FileNotFoundError as exc:
        raise QemuStartError(
            f"{argv[0]} is not installed (apt-get install qemu-system-x86)"
        ) from exc
    if done.returncode != 0:
        detail = " ".join((done.stderr or done.stdout).split())
        raise QemuStartError(detail[-600:] or f"QEMU exited with {done.returncode}")
    pid = int(pidfile.read_text().strip())
    start = pid_start_time(pid)
    if start is None:
        raise QemuStartError("QEMU exited right after starting; see its log")
    return QemuProcess(pid, start)
