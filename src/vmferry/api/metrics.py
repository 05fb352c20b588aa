"""Prometheus metrics of one agent: ``GET /metrics`` on its mutual-TLS API (any role may read).

Each app has its own :class:`CollectorRegistry` (tests run several agents in one process).
Counters and histograms are fed by observing the layers below, which know nothing of
Prometheus: the move store tells its job listeners when a job starts and ends
(``Moves.listeners``), the event log tells its listeners each event's kind and level
(``EventLog.listeners``). Gauges and the cluster member's own counters are read at scrape time.
Metric names and labels: docs/observability.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from vmferry.host.events import LEVELS, Level
from vmferry.host.vms import VMManager, VMState
from vmferry.migration.engine import Moves
from vmferry.migration.model import Job
from vmferry.migration.slots import Slots

if TYPE_CHECKING:
    from vmferry.cluster.member import ClusterMember

KINDS = ("live", "storage", "quick")
OUTCOMES = ("completed", "failed", "cancelled")
DURATION_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)
BLACKOUT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class AgentMetrics:
    """The metrics of one agent, in a registry of their own."""

    def __init__(
        self,
        vms: VMManager,
        moves: Moves,
        queues: Mapping[str, Slots],
        member: ClusterMember | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.started = Counter("vmferry_moves_started", "Move jobs started, by kind",
                               ["kind"], registry=reg)  # fmt: skip
        self.ended = Counter("vmferry_moves", "Move jobs that ended, by kind and outcome",
                             ["kind", "outcome"], registry=reg)  # fmt: skip
        self.duration = Histogram(
            "vmferry_move_duration_seconds", "Time from submitting a move to its end",
            ["kind", "outcome"], buckets=DURATION_BUCKETS, registry=reg,
        )  # fmt: skip
        self.blackout = Histogram(
            "vmferry_move_blackout_seconds",
            "Guest outage of completed moves: measured (figure=guest) for quick moves, QEMU's "
            "downtime (figure=qemu, the source's view) for live moves",
            ["kind", "figure"], buckets=BLACKOUT_BUCKETS, registry=reg,
        )  # fmt: skip
        self.bytes = Counter("vmferry_moved_bytes", "Bytes moves copied (memory or saved "
                             "state, and disks)", ["kind", "what"], registry=reg)  # fmt: skip
        self.events = Counter("vmferry_events", "Events written to the agent's event log",
                              ["level"], registry=reg)  # fmt: skip
        for kind in KINDS:
            self.started.labels(kind)
            for outcome in OUTCOMES:
                self.ended.labels(kind, outcome)
            for what in ("memory", "disk"):
                self.bytes.labels(kind, what)
        for level in LEVELS:
            self.events.labels(level)
        reg.register(_ScrapeTime(vms, queues, member))
        moves.listeners.append(self.on_job)
        vms.events.listeners.append(self.on_event)

    def on_job(self, what: str, job: Job) -> None:
        """A move job started or ended (``Moves.listeners``)."""
        if what == "started":
            self.started.labels(job.kind).inc()
            return
        if what != "ended" or not job.state.terminal:
            return
        outcome = job.state.value
        self.ended.labels(job.kind, outcome).inc()
        if job.total_s is not None:
            self.duration.labels(job.kind, outcome).observe(job.total_s)
        memory = max(job.bytes_sent, job.progress.ram_transferred)
        if memory:
            self.bytes.labels(job.kind, "memory").inc(memory)
        if job.progress.disk_transferred:
            self.bytes.labels(job.kind, "disk").inc(job.progress.disk_transferred)
        if outcome == "completed":
            if job.downtime_ms is not None:
                self.blackout.labels(job.kind, "guest").observe(job.downtime_ms / 1000)
            elif job.qemu_downtime_ms is not None:
                self.blackout.labels(job.kind, "qemu").observe(job.qemu_downtime_ms / 1000)

    def on_event(self, kind: str, level: Level) -> None:
        """An event was written (``EventLog.listeners``)."""
        self.events.labels(level).inc()

    def scrape(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)


class _ScrapeTime(Collector):
    """Figures read when Prometheus scrapes: VMs by state, queues, the cluster lease."""

    def __init__(
        self, vms: VMManager, queues: Mapping[str, Slots], member: ClusterMember | None
    ) -> None:
        self.vms, self.queues, self.member = vms, queues, member

    def collect(self) -> Iterator[Metric]:
        """Yield the scrape-time metric families."""
        counts = {s.value: 0 for s in VMState}
        for info in self.vms.list():
            counts[info.state.value] = counts.get(info.state.value, 0) + 1
        vms = GaugeMetricFamily("vmferry_vms", "VMs on this host, by state", labels=["state"])
        for state, n in counts.items():
            vms.add_metric([state], n)
        yield vms
        queued = GaugeMetricFamily(
            "vmferry_move_queue_length", "Moves waiting for a slot", labels=["queue"]
        )
        busy = GaugeMetricFamily(
            "vmferry_move_slots_in_use", "Move slots taken (outgoing and incoming)",
            labels=["queue"],
        )  # fmt: skip
        for name, slots in self.queues.items():
            queued.add_metric([name], slots.waiting)
            busy.add_metric([name], len(slots.in_use))
        yield queued
        yield busy
        m = self.member
        renewals = CounterMetricFamily(
            "vmferry_cluster_lease_renewals", "Cluster lease renewals since the agent started",
            labels=["result"],
        )  # fmt: skip
        renewals.add_metric(["ok"], m.renewals_ok if m else 0)
        renewals.add_metric(["failed"], m.renewals_failed if m else 0)
        yield renewals
        yield CounterMetricFamily(
            "vmferry_fences",
            "Times this node fenced itself since the agent started",
            value=m.fences if m else 0,
        )
        yield GaugeMetricFamily(
            "vmferry_cluster_lease_held",
            "1 while this node holds a cluster lease",
            value=1 if m and m.lease else 0,
        )


def install_metrics(app: FastAPI, metrics: AgentMetrics) -> None:
    """Add ``GET /metrics`` (Prometheus text format) to ``app``."""
    app.state.metrics = metrics

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.scrape(), media_type=CONTENT_TYPE_LATEST)
