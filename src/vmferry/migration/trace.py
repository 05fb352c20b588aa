"""Migration traces: what a move did over time, kept per job beside its record.

A trace is the job's phase timeline (from the job record) plus samples of the copy's figures:
QEMU's ``query-migrate`` (bytes transferred and remaining, dirty rate, throughput, pass =
``dirty-sync-count``, auto-converge throttle) and the disk copy's progress. A sample is taken
when the pass or the phase changes and otherwise at most once per ``interval_s``; when the list
outgrows ``MAX_SAMPLES`` every second periodic sample is dropped and the interval doubles, so a
trace stays bounded however long a move runs while its first and last samples and its pass and
phase boundaries are kept. Samples live in ``<state>/migrations/<id>.trace.json`` (not in the
job record, which the progress display polls several times a second); see docs/migration.md.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from vmferry.migration.model import Job

log = logging.getLogger("vmferry.migration.trace")

#: Samples a trace keeps at most (thinned beyond that).
MAX_SAMPLES = 400
#: A pass shorter than this shows QEMU's throughput figure instead of bytes ÷ time.
MIN_RATE_S = 0.05
#: Periodic sampling interval at the start of a move (doubles each time the trace is thinned).
INTERVAL_S = 1.0
#: While a move runs, its trace file is rewritten at most this often (and at every phase).
WRITE_EVERY_S = 2.0


class TraceSample(BaseModel):
    """The copy's figures at one moment, ``t`` seconds after the job was created."""

    t: float
    phase: str
    #: QEMU's ``dirty-sync-count``: the memory pass (0 before the memory copy starts).
    pass_no: int = 0
    ram_total: int = 0
    ram_transferred: int = 0
    ram_remaining: int = 0
    dirty_rate_bps: float = 0.0
    mbps: float = 0.0
    throttle_pct: int | None = None
    disk_total: int = 0
    disk_transferred: int = 0
    expected_downtime_ms: int | None = None
    #: Taken because the pass or the phase changed (kept when the trace is thinned).
    boundary: bool = False


class TraceData(BaseModel):
    """The samples of one job, as stored in its trace file."""

    job: str
    interval_s: float = INTERVAL_S
    dropped: int = 0
    samples: list[TraceSample] = Field(default_factory=list)


def sample_of(job: Job, now: float, boundary: bool) -> TraceSample:
    """The job's current figures as a sample."""
    p = job.progress
    return TraceSample(
        t=round(now - job.created_at, 3), phase=job.phase.value, pass_no=p.passes,
        ram_total=p.ram_total, ram_transferred=p.ram_transferred, ram_remaining=p.ram_remaining,
        dirty_rate_bps=p.dirty_rate_bps, mbps=p.mbps, throttle_pct=p.throttle_pct,
        disk_total=p.disk_total, disk_transferred=p.disk_transferred,
        expected_downtime_ms=p.expected_downtime_ms, boundary=boundary,
    )  # fmt: skip


def thin(data: TraceData, limit: int = MAX_SAMPLES) -> None:
    """Bring ``data.samples`` to at most ``limit`` (>= 2): drop every second periodic sample
    (doubling the interval) and, if the boundaries alone are too many, every second boundary;
    the first and last samples always stay."""
    s = data.samples
    while len(s) > limit:
        before = len(s)
        periodic = [i for i in range(1, len(s) - 1) if not s[i].boundary]
        if len(periodic) >= 2:
            drop = set(periodic[::2])
            data.interval_s *= 2
        else:
            drop = set(range(1, len(s) - 1, 2))
        s = [x for i, x in enumerate(s) if i not in drop]
        data.dropped += before - len(s)
    data.samples = s


class _Live:
    """A running job's trace in memory."""

    def __init__(self, data: TraceData) -> None:
        self.data = data
        self.last_t = data.samples[-1].t if data.samples else -1e9
        self.written_at = 0.0
        self.dirty = False


class TraceRecorder:
    """Takes samples of running jobs and keeps their trace files (``<dir>/<id>.trace.json``)."""

    def __init__(self, directory: Path, limit: int = MAX_SAMPLES) -> None:
        self.dir = directory
        self.limit = max(2, limit)
        self._live: dict[str, _Live] = {}

    def path(self, job_id: str) -> Path:
        """Where a job's samples are stored."""
        return self.dir / f"{job_id}.trace.json"

    def load(self, job_id: str) -> TraceData:
        """A job's stored samples (an empty trace if it has none)."""
        live = self._live.get(job_id)
        if live is not None:
            return live.data.model_copy(deep=True)
        try:
            return TraceData.model_validate_json(self.path(job_id).read_text())
        except (OSError, ValueError):
            return TraceData(job=job_id)

    def sample(self, job: Job) -> None:
        """Note the job's current figures if the pass or phase changed or a sample is due;
        write the trace file when due and once the job has ended. Never raises."""
        try:
            self._sample(job)
        except OSError as exc:  # a full disk must not fail the move
            log.error("trace of %s not written: %s", job.id, exc)

    def _sample(self, job: Job) -> None:
        live = self._live.get(job.id)
        if live is None:
            if job.state.terminal and job.finished_at is not None and self.path(job.id).exists():
                return  # ended and written (e.g. a record saved again after a restart)
            live = self._live[job.id] = _Live(self.load(job.id))
        now = time.time()
        data = live.data
        last = data.samples[-1] if data.samples else None
        changed = (
            last is None or last.phase != job.phase.value or last.pass_no != job.progress.passes
        )
        ended = job.state.terminal and job.finished_at is not None
        t = now - job.created_at
        if changed or ended or t - live.last_t >= data.interval_s:
            data.samples.append(sample_of(job, now, boundary=changed))
            live.last_t, live.dirty = t, True
            thin(data, self.limit)
        phase_changed = last is None or last.phase != job.phase.value
        if ended or (live.dirty and (phase_changed or now - live.written_at >= WRITE_EVERY_S)):
            self._write(data)
            live.written_at, live.dirty = now, False
        if ended:
            self._live.pop(job.id, None)

    def _write(self, data: TraceData) -> None:
        tmp = self.dir / f"{data.job}.trace.tmp"
        tmp.write_text(data.model_dump_json())
        os.replace(tmp, self.path(data.job))


def phase_timeline(job: Job) -> list[dict[str, Any]]:
    """Each phase with its start (seconds after the job was created) and duration."""
    end = job.finished_at or time.time()
    return [
        {
            "phase": ph.phase.value,
            "start_s": round(ph.started_at - job.created_at, 3),
            "duration_s": round((ph.ended_at or end) - ph.started_at, 3),
            "open": ph.ended_at is None,
        }
        for ph in job.phases
    ]


def pass_table(samples: list[TraceSample]) -> list[dict[str, Any]]:
    """One row per memory pass (``dirty-sync-count``): when it began, how long it took, the
    bytes it sent, what remained at its start, the guest's dirty rate, throughput, throttle."""
    rows: list[dict[str, Any]] = []
    passes = [s for s in samples if s.pass_no > 0]
    groups: list[list[TraceSample]] = []
    for s in passes:
        if groups and groups[-1][0].pass_no == s.pass_no:
            groups[-1].append(s)
        else:
            groups.append([s])
    for i, group in enumerate(groups):
        first, last = group[0], group[-1]
        nxt = groups[i + 1][0] if i + 1 < len(groups) else None
        end = nxt or last
        # The first pass starts at zero bytes (QEMU counts from the start of the stream).
        base = 0 if i == 0 and first.pass_no == 1 else first.ram_transferred
        sent = max(0, end.ram_transferred - base)
        seconds = max(0.0, end.t - first.t)
        # The throttle QEMU applied during this pass (set at the sync that began it).
        throttles = [s.throttle_pct for s in group if s.throttle_pct is not None]
        # QEMU measures the dirty rate over the pass that just ended and publishes it at the end
        # of the next sync, a moment after the pass number changed: read it late in the next pass.
        rate = groups[i + 1][-1] if i + 1 < len(groups) else last
        rows.append({
            "pass": first.pass_no,
            "phase": first.phase,
            "start_s": first.t,
            "duration_s": round(seconds, 3),
            "bytes": sent,
            "remaining_bytes": first.ram_remaining,
            "dirty_rate_bps": rate.dirty_rate_bps,
            # what the pass achieved (QEMU's own ram.mbps stays 0 until its first bandwidth
            # sample, so a short first pass would read 0)
            "mbps": round(sent * 8 / seconds / 1e6, 1)
            if seconds >= MIN_RATE_S
            else round(max(s.mbps for s in group), 1),
            "throttle_pct": max(throttles) if throttles else None,
            "complete": nxt is not None,
        })  # fmt: skip
    return rows


def trace_json(job: Job, data: TraceData) -> dict[str, Any]:
    """``GET /v1/migrations/{id}/trace``: the job, its phase timeline, passes and samples."""
    return {
        "id": job.id,
        "kind": job.kind,
        "vm": job.vm,
        "source": job.source,
        "destination": job.destination,
        "state": job.state.value,
        "created_at": job.created_at,
        "total_s": job.total_s,
        "phases": phase_timeline(job),
        "passes": pass_table(data.samples),
        "samples": [s.model_dump() for s in data.samples],
        "interval_s": data.interval_s,
        "dropped_samples": data.dropped,
        "max_samples": MAX_SAMPLES,
    }
