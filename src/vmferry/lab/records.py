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

from vmferry.procinfo import pid_matches, pid_start_time, pid_state

__all__ = ["LabRecords", "pid_matches", "pid_start_time", "pid_state"]

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
