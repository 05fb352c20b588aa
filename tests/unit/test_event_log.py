"""The agent's event log (host/events.py): durable, filtered, followable."""

from __future__ import annotations

import threading
from pathlib import Path

from vmferry.host.events import EventLog


def test_events_survive_a_reopen_and_filter(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.db", host="h1")
    a = log.record("phase", "move m1 of web: precopy", vm="web", job="m1", data={"pass": 1})
    log.record("refused", "VM 'db' is off", level="warning", vm="db")
    log.record("fenced", "node h1 fenced itself", level="error", data={"vms": ["web"]})
    log.close()
    log = EventLog(tmp_path / "events.db", host="h1")
    evs = log.query()
    assert [e.kind for e in evs] == ["phase", "refused", "fenced"]  # oldest first
    assert evs[0].id == a and evs[0].data == {"pass": 1} and evs[0].host == "h1"
    assert [e.kind for e in log.query(vm="web")] == ["phase"]
    assert [e.kind for e in log.query(job="m1")] == ["phase"]
    assert [e.kind for e in log.query(level="warning")] == ["refused", "fenced"]
    assert [e.kind for e in log.query(kind="fenced")] == ["fenced"]
    assert [e.kind for e in log.query(limit=2)] == ["refused", "fenced"]  # the newest two
    assert log.query(since=evs[-1].at + 1) == []
    # following: what came after the last id seen, in order
    new = log.record("phase", "move m1 of web: cleanup", vm="web", job="m1")
    assert [e.id for e in log.query(after=evs[-1].id)] == [new]
    assert log.query(after=new) == []


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.db", host="h1")

    def write(n: int) -> None:
        for i in range(200):
            log.record("t", f"{n}-{i}")

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(log.query(limit=10_000)) == 800
    assert len({e.id for e in log.query(limit=10_000)}) == 800


def test_a_broken_database_does_not_raise(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.db", host="h1")
    log.close()
    assert log.record("x", "after close") == 0  # logged, not raised
