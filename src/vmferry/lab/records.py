"""Append-only journal of lab resources, written before each resource is created.

Every namespace, root-namespace link, process and directory the lab creates is
recorded here first (intent), and fsynced, so a teardown after a crash or a
half-finished ``up`` can find and remove exactly what the lab made - nothing
is ever cleaned up by name pattern.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

RECORDS_NAME = "records.jsonl"


class LabRecords:
    """JSON-lines journal at ``<lab_dir>/records.jsonl``."""

    def __init__(self, lab_dir: Path) -> None:
        self.lab_dir = Path(lab_dir)
        self.path = self.lab_dir / RECORDS_NAME
        self._lock = threading.Lock()

    def add(self, kind: str, **fields: str | int) -> None:
        """Append one entry and fsync it before returning."""
        if not kind:
            raise ValueError("record kind must be non-empty")
        entry: dict[str, Any] = {"kind": kind, **fields}
        line = json.dumps(entry, sort_keys=True) + "\n"
        with self._lock:
            self.lab_dir.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                _fsync_dir(self.lab_dir)

    def entries(self) -> list[dict[str, Any]]:
        """All entries in order; a torn (partially written) line is skipped."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        out: list[dict[str, Any]] = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and "kind" in entry:
                out.append(entry)
        return out

    def clear(self) -> None:
        """Forget all entries (call only after everything recorded is gone)."""
        with self._lock:
            try:
                self.path.unlink()
            except FileNotFoundError:
                return
            _fsync_dir(self.lab_dir)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from field 3 (state) on, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may contain spaces and parentheses: split at the last ')'.
    _, sep, rest = raw.rpartition(")")
    if not sep:
        return None
    return rest.split()


def pid_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot, /proc/<pid>/stat field 22) or None."""
    if pid <= 0:
        return None
    fields = _read_stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])  # field 22; fields[0] is field 3
    except ValueError:
        return None


def pid_state(pid: int) -> str | None:
    """Process state letter (R, S, Z, ...) or None if the pid does not exist."""
    if pid <= 0:
        return None
    fields = _read_stat_fields(pid)
    return fields[0] if fields else None


def pid_matches(pid: int, start_time: int) -> bool:
    """True if ``pid`` exists and is the same process (same start time)."""
    current = pid_start_time(pid)
    return current is not None and current == start_time
