"""Migration traces and the agent's Prometheus metrics (issue 7, items 2 and 3).

A move job is driven through the engine's own hooks (``Moves._enter`` for phases,
``Moves._record`` with fake ``query-migrate`` answers for the memory copy) on a real agent app
with a temporary state directory; no QEMU runs. The trace is read back through the API and
from disk, the metrics through ``GET /metrics``, parsed with prometheus_client's parser.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from vmferry.api import create_app
from vmferry.host import Host
from vmferry.migration.engine import Moves
from vmferry.migration.model import Job, JobState, MoveOptions, Phase, PhaseRecord
from vmferry.migration.trace import TraceData, TraceSample, pass_table, thin
from vmferry.security.roles import Role, allowed

MiB = 2**20


def _host(state: Path, storage: Path) -> Host:
    storage.mkdir(parents=True, exist_ok=True)
    h = Host(state, image=lambda: (Path("/nonexistent"), Path("/nonexistent")))
    h.settings = h.settings.model_copy(update={"storage_roots": [str(storage)], "name": "h1"})
    return h


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return _host(tmp_path / "state", tmp_path / "storage")


@pytest.fixture
def api(host: Host) -> Iterator[TestClient]:
    with TestClient(create_app(host, require_client_cert=False)) as c:
        yield c


def _answer(pass_no: int, sent: int, left: int, dirty_pages: int = 0, **extra: Any) -> Any:
    """A ``query-migrate`` answer as QEMU gives it during a pre-copy."""
    return {
        "status": extra.pop("status", "active"),
        "ram": {"total": 256 * MiB, "transferred": sent, "remaining": left,
                "dirty-sync-count": pass_no, "dirty-pages-rate": dirty_pages,
                "page-size": 4096, "mbps": 800.0},
        **extra,
    }  # fmt: skip


def _fake_live_move(moves: Moves, outcome: JobState = JobState.COMPLETED) -> Job:
    """A live job taken through its phases with fake QMP answers, ended with ``outcome``."""
    job = Job(vm="vm1", source="h1", destination="h2", destination_url="https://h2.example:7443",
              options=MoveOptions())  # fmt: skip
    job.phases.append(PhaseRecord(phase=Phase.QUEUED, started_at=time.time()))
    moves.jobs[job.id] = job
    moves._save(job)
    for phase in (Phase.CHECKS, Phase.SETUP, Phase.PRECOPY):
        moves._enter(job, phase)
    answers = [
        _answer(1, 10 * MiB, 246 * MiB),
        _answer(1, 60 * MiB, 196 * MiB),  # same pass, too soon for a periodic sample
        _answer(2, 110 * MiB, 20 * MiB, dirty_pages=1000),
        _answer(3, 130 * MiB, 5 * MiB, dirty_pages=500, **{"cpu-throttle-percentage": 20}),
        _answer(4, 136 * MiB, 0, dirty_pages=400, status="completed", downtime=42),
    ]
    for info in answers:
        moves._record(job, info)
    job.qemu_downtime_ms, job.bytes_sent = 42, 136 * MiB
    for phase in (Phase.SWITCHOVER, Phase.RESUME, Phase.ANNOUNCE, Phase.CLEANUP):
        moves._enter(job, phase)
    job.state = outcome
    job.phases[-1].ended_at = job.finished_at = time.time()
    job.total_s = round(job.finished_at - job.created_at, 3)
    moves._save(job)
    return job


def test_trace_records_passes_and_phases(api: TestClient, host: Host) -> None:
    moves: Moves = api.app.state.moves  # type: ignore[attr-defined]
    job = _fake_live_move(moves)
    r = api.get(f"/v1/migrations/{job.id}/trace")
    assert r.status_code == 200, r.text
    tr = r.json()
    assert [p["phase"] for p in tr["phases"]] == [
        "queued", "checks", "setup", "precopy", "switchover", "resume", "announce", "cleanup",
    ]  # fmt: skip
    starts = [p["start_s"] for p in tr["phases"]]
    assert starts == sorted(starts) and all(p["duration_s"] >= 0 for p in tr["phases"])
    rows = {p["pass"]: p for p in tr["passes"]}
    assert sorted(rows) == [1, 2, 3, 4]
    # Pass 1 sent everything up to the start of pass 2; QEMU's dirty rate is pages x page size.
    assert rows[1]["bytes"] == 110 * MiB and rows[1]["remaining_bytes"] == 246 * MiB
    assert rows[1]["dirty_rate_bps"] == 1000 * 4096
    assert rows[2]["bytes"] == 20 * MiB and rows[3]["bytes"] == 6 * MiB
    assert rows[3]["throttle_pct"] == 20 and rows[1]["throttle_pct"] is None
    assert rows[1]["complete"] and not rows[4]["complete"]
    # (these passes take no time: their throughput is QEMU's own figure)
    assert rows[1]["duration_s"] < 0.05 and rows[1]["mbps"] == 800.0
    # Bounded: one sample per pass or phase change (+ the end), none of the in-pass repeats.
    assert len(tr["samples"]) <= 15 and tr["dropped_samples"] == 0
    assert 60 * MiB not in [s["ram_transferred"] for s in tr["samples"]]
    # Stored beside the job record, and read back by a restarted agent.
    path = host.state_dir / "migrations" / f"{job.id}.trace.json"
    assert path.exists()
    again = Moves(host.vms, lambda: host.settings, moves.slots, host.state_dir, moves._peers)
    assert set(again.jobs) == set(moves.jobs)  # the trace file is not taken for a job
    assert again.trace.load(job.id).samples == moves.trace.load(job.id).samples
    assert api.get("/v1/migrations/nope/trace").status_code == 404


def test_pass_throughput_is_bytes_over_time() -> None:
    # QEMU's ram.mbps reads 0 through a first pass shorter than its bandwidth period
    samples = [
        TraceSample(t=1.0, phase="precopy", pass_no=1, ram_transferred=0),
        TraceSample(t=1.5, phase="precopy", pass_no=1, ram_transferred=50 * MiB),
        TraceSample(t=2.0, phase="precopy", pass_no=2, ram_transferred=100 * MiB, mbps=900.0),
        TraceSample(t=2.01, phase="switchover", pass_no=3, ram_transferred=101 * MiB, mbps=900.0),
    ]
    rows = pass_table(samples)
    assert rows[0]["mbps"] == pytest.approx(100 * MiB * 8 / 1.0 / 1e6, abs=0.1)
    assert rows[1]["duration_s"] == pytest.approx(0.01) and rows[1]["mbps"] == 900.0


def test_thinning_keeps_boundaries_and_ends() -> None:
    data = TraceData(job="j")
    for i in range(100):
        data.samples.append(TraceSample(t=float(i), phase="precopy", pass_no=i // 10 + 1,
                                        boundary=i % 10 == 0))  # fmt: skip
    thin(data, limit=30)
    ts = [s.t for s in data.samples]
    assert len(ts) <= 30 and ts[0] == 0.0 and ts[-1] == 99.0
    assert {float(i) for i in range(0, 100, 10)} <= set(ts)  # every pass boundary stays
    assert data.dropped == 100 - len(ts) and data.interval_s > 1.0
    # Too many boundaries: those are thinned too, still ends kept.
    data = TraceData(job="j", samples=[TraceSample(t=float(i), phase="p", boundary=True)
                                       for i in range(50)])  # fmt: skip
    thin(data, limit=10)
    assert len(data.samples) <= 10 and data.samples[-1].t == 49.0 and data.dropped > 0


def _metrics(api: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = api.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }


def test_metrics_change_after_job_outcomes(api: TestClient, host: Host) -> None:
    before = _metrics(api)
    live_done = ("vmferry_moves_total", (("kind", "live"), ("outcome", "completed")))
    assert before[live_done] == 0
    assert before[("vmferry_vms", (("state", "off"),))] == 0
    assert before[("vmferry_move_queue_length", (("queue", "migration"),))] == 0
    assert before[("vmferry_cluster_lease_renewals_total", (("result", "ok"),))] == 0

    assert api.post("/v1/vms", json={"name": "vm1", "memory_mib": 64}).status_code == 201
    moves: Moves = api.app.state.moves  # type: ignore[attr-defined]
    _fake_live_move(moves)
    _fake_live_move(moves, JobState.FAILED)
    after = _metrics(api)

    assert after[live_done] == 1
    assert after[("vmferry_moves_total", (("kind", "live"), ("outcome", "failed")))] == 1
    assert after[("vmferry_moves_started_total", (("kind", "live"),))] == 2
    assert after[("vmferry_moved_bytes_total", (("kind", "live"), ("what", "memory")))] == (
        2 * 136 * MiB
    )
    dur = ("vmferry_move_duration_seconds_count", (("kind", "live"), ("outcome", "completed")))
    assert after[dur] == 1
    # QEMU's 42 ms downtime of the completed move only, in the 50 ms bucket and not below.
    bucket = "vmferry_move_blackout_seconds_bucket"
    assert after[(bucket, (("figure", "qemu"), ("kind", "live"), ("le", "0.05")))] == 1
    assert after[(bucket, (("figure", "qemu"), ("kind", "live"), ("le", "0.025")))] == 0
    assert after[("vmferry_vms", (("state", "off"),))] == 1
    # Every event the agent wrote is counted once, by level.
    logged = host.vms.events.query(limit=10_000)
    counted = {lv: after[("vmferry_events_total", (("level", lv),))] for lv in
               ("debug", "info", "warning", "error")}  # fmt: skip
    assert sum(counted.values()) == len(logged)
    assert counted["error"] == 1  # the failed move's outcome


def test_metrics_per_app_and_readable_by_viewers(tmp_path: Path) -> None:
    # Two agents in one process each get their own registry (no duplicate-metric error).
    a = create_app(_host(tmp_path / "a", tmp_path / "sa"), require_client_cert=False)
    b = create_app(_host(tmp_path / "b", tmp_path / "sb"), require_client_cert=False)
    assert a.state.metrics.registry is not b.state.metrics.registry
    assert allowed(Role.viewer, "GET", "/metrics") and allowed(Role.host, "GET", "/metrics")
