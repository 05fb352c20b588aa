"""The agent's event log: structured events kept durably in SQLite (``<state>/events.db``).

Every layer records what it did or refused — a migration phase, a refusal, a failover decision,
a fence — with :meth:`EventLog.record`; ``ferry events`` and the Admin Center read them back with
filters, or follow new ones (``after`` = the last id seen). Writes are small single-row
transactions in WAL mode, so a reader never blocks a writer; the log keeps the newest
``MAX_ROWS`` events and prunes the rest now and then.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

log = logging.getLogger("vmferry.events")

Level = Literal["debug", "info", "warning", "error"]
LEVELS: tuple[Level, ...] = ("debug", "info", "warning", "error")
MAX_ROWS = 200_000
PRUNE_EVERY = 1_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    level TEXT NOT NULL,
    kind TEXT NOT NULL,
    host TEXT NOT NULL,
    vm TEXT,
    job TEXT,
    message TEXT NOT NULL,
    data TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
CREATE INDEX IF NOT EXISTS events_vm ON events (vm, id);
"""


class Event(BaseModel):
    """One thing that happened on a host."""

    id: int
    at: float
    level: Level
    kind: str
    host: str
    vm: str | None = None
    job: str | None = None
    message: str
    data: dict[str, Any] = Field(default_factory=dict)


class EventLog:
    """The events of one agent (thread-safe; each call is one short SQLite transaction)."""

    def __init__(self, path: Path, host: str | Callable[[], str] = "?") -> None:
        self.path = path
        self._host = host
        self._lock = threading.Lock()
        self._writes = 0
        #: Called with ``(kind, level)`` after each event is written (the agent's metrics).
        self.listeners: list[Callable[[str, Level], None]] = []
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    @property
    def host(self) -> str:
        """The host name events are recorded under (the host's current name)."""
        return self._host() if callable(self._host) else self._host

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def record(
        self,
        kind: str,
        message: str,
        *,
        level: Level = "info",
        vm: str | None = None,
        job: str | None = None,
        data: dict[str, Any] | None = None,
        host: str | None = None,
    ) -> int:
        """Append an event; its id. Never raises: a full disk must not fail the operation."""
        try:
            payload = json.dumps(data or {}, default=str)
            with self._lock:
                cur = self._db.execute(
                    "INSERT INTO events (at, level, kind, host, vm, job, message, data)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (time.time(), level, kind, host or self.host, vm, job, message, payload),
                )
                self._writes += 1
                if self._writes % PRUNE_EVERY == 0:
                    self._db.execute(
                        "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - ?",
                        (MAX_ROWS,),
                    )
                event_id = int(cur.lastrowid or 0)
        except (sqlite3.Error, TypeError, ValueError) as exc:
            log.error("event not recorded (%s: %s): %s", kind, message, exc)
            return 0
        for listener in self.listeners:
            try:
                listener(kind, level)
            except Exception:  # an observer must never fail the operation
                log.exception("event listener failed on %s", kind)
        return event_id

    def query(
        self,
        *,
        vm: str | None = None,
        job: str | None = None,
        level: Level | None = None,
        kind: str | None = None,
        since: float | None = None,
        after: int | None = None,
        limit: int = 100,
    ) -> list[Event]:
        """Events matching every given filter, oldest first: the newest ``limit`` of them (or,
        with ``after``, the first ``limit`` newer than that id — for following)."""
        where: list[str] = ["1=1"]
        args: list[Any] = []
        if vm is not None:
            where.append("vm = ?")
            args.append(vm)
        if job is not None:
            where.append("job = ?")
            args.append(job)
        if level is not None:
            wanted = LEVELS[LEVELS.index(level) :]  # this level and the ones above it
            where.append(f"level IN ({','.join('?' * len(wanted))})")
            args += list(wanted)
        if kind is not None:
            where.append("kind = ?")
            args.append(kind)
        if since is not None:
            where.append("at >= ?")
            args.append(since)
        if after is not None:
            where.append("id > ?")
            args.append(after)
        order = "ASC" if after is not None else "DESC"
        sql = (
            "SELECT id, at, level, kind, host, vm, job, message, data FROM events"
            f" WHERE {' AND '.join(where)} ORDER BY id {order} LIMIT ?"
        )
        args.append(max(1, min(limit, 10_000)))
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        events = [
            Event(id=r[0], at=r[1], level=r[2], kind=r[3], host=r[4], vm=r[5], job=r[6],
                  message=r[7], data=json.loads(r[8] or "{}"))
            for r in rows
        ]  # fmt: skip
        return events if after is not None else events[::-1]
