"""The agent's audit log: one JSON line per mutating or refused call, fsynced before the answer.

Files live in ``<state>/audit/``: ``audit.jsonl`` is appended to; when it passes
:data:`ROTATE_BYTES` it becomes ``audit.1.jsonl`` (older ones shift up to
:data:`KEEP_FILES`), so the log's disk use is bounded.
"""

from __future__ import annotations

import json
import os
import threading
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROTATE_BYTES = 16 * 1024 * 1024
KEEP_FILES = 4


@dataclass(frozen=True)
class AuditRecord:
    """Who did what, from where, and how it ended."""

    time: float
    cn: str | None
    role: str | None
    address: str | None
    method: str
    path: str
    status: int
    outcome: str  #: ok, refused (4xx), error (5xx), throttled
    message: str | None = None  #: the refusal's or error's message

    def to_json(self) -> dict[str, Any]:
        """The record as stored (and returned by ``GET /v1/audit``)."""
        return asdict(self)


def outcome_of(status: int) -> str:
    """ok / refused / throttled / error for an HTTP status."""
    if status < 400:
        return "ok"
    if status == 429:
        return "throttled"
    return "refused" if status < 500 else "error"


class AuditLog:
    """Append-only JSON-lines log with size-based rotation; safe from several threads."""

    def __init__(
        self, directory: Path, rotate_bytes: int = ROTATE_BYTES, keep: int = KEEP_FILES
    ) -> None:
        self.dir = directory
        self.path = directory / "audit.jsonl"
        self.rotate_bytes = rotate_bytes
        self.keep = keep
        self._lock = threading.Lock()

    def _files(self) -> list[Path]:
        """Oldest first."""
        older = [self.dir / f"audit.{i}.jsonl" for i in range(self.keep - 1, 0, -1)]
        return [p for p in [*older, self.path] if p.exists()]

    def _rotate(self) -> None:
        for i in range(self.keep - 1, 0, -1):
            src = self.path if i == 1 else self.dir / f"audit.{i - 1}.jsonl"
            if src.exists():
                os.replace(src, self.dir / f"audit.{i}.jsonl")

    def append(self, record: AuditRecord) -> None:
        """Write one record and fsync it (blocking: call it from a thread in async code)."""
        line = (json.dumps(record.to_json(), separators=(",", ":")) + "\n").encode()
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                if self.path.stat().st_size + len(line) > self.rotate_bytes:
                    self._rotate()
            except FileNotFoundError:
                pass
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def query(
        self, since: float | None = None, limit: int = 200, cn: str | None = None
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` records at or after ``since`` (oldest first), optionally by CN."""
        found: deque[dict[str, Any]] = deque(maxlen=max(1, limit))
        with self._lock:
            files = self._files()
        for path in files:
            with open(path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue  # a torn last line after a crash
                    if not isinstance(rec, dict):
                        continue
                    if since is not None and float(rec.get("time", 0)) < since:
                        continue
                    if cn is not None and rec.get("cn") != cn:
                        continue
                    found.append(rec)
        return list(found)
