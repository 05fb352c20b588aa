"""Start QEMU as a daemon that outlives the agent, and find it again by pid + start time."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from vmferry.procinfo import pid_matches, pid_start_time, pid_state


class QemuStartError(RuntimeError):
    """QEMU refused to start; the message carries what QEMU printed."""


@dataclass(frozen=True)
class QemuProcess:
    """A running QEMU identified by pid and start time (so a recycled pid never matches)."""

    pid: int
    start_time: int

    def alive(self) -> bool:
        """True while this exact process exists and is not a zombie."""
        return pid_matches(self.pid, self.start_time) and pid_state(self.pid) not in ("Z", "X")

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
