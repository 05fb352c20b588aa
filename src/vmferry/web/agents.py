"""The Admin Center's view of the agents: one client per host, with its own identity.

Everything the Admin Center shows or does goes through :class:`vmferry.client.FerryClient`
(or, in tests, an object with the same methods: :class:`AgentClient`). Calls to several
hosts run in a small thread pool with a short timeout, and a host that does not answer is
reported on the page instead of failing it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from vmferry.client import ClientConfig, FerryClient, FerryError, HostEndpoint, NotFoundError
from vmferry.errors import RefusedError

T = TypeVar("T")

TERMINAL = ("completed", "failed", "cancelled")
#: At most this many unfinished jobs are polled for progress per refresh.
MAX_ACTIVE_POLLED = 20
#: At most this many jobs are listed on the moves page.
MAX_JOBS_LISTED = 50


class AgentClient(Protocol):
    """The part of :class:`FerryClient` the Admin Center uses."""

    def request(
        self, method: str, path: str, *, json: Any = None, timeout: float | None = None
    ) -> Any: ...
    def host(self) -> dict[str, Any]: ...
    def vms(self) -> list[dict[str, Any]]: ...
    def migrations(self) -> list[dict[str, Any]]: ...
    def migration(self, job_id: str) -> dict[str, Any]: ...
    def cancel_migration(self, job_id: str) -> dict[str, Any]: ...
    def move(self, name: str, request: dict[str, Any]) -> dict[str, Any]: ...
    def move_storage(self, name: str, request: dict[str, Any]) -> dict[str, Any]: ...
    def action(self, name: str, action: str, timeout: float = 60.0) -> dict[str, Any]: ...
    def events(self, **filters: Any) -> list[dict[str, Any]]: ...
    def cluster_member(self) -> dict[str, Any]: ...
    def cluster_status(self, name: str | None = None) -> dict[str, Any]: ...
    def cluster_vm_move(
        self, name: str, to: str | None, best: bool, quick: bool, cluster: str | None = None
    ) -> dict[str, Any]: ...
    def cluster_drain(self, cluster: str, node: str) -> dict[str, Any]: ...
    def cluster_resume(self, cluster: str, node: str, failback: bool) -> dict[str, Any]: ...
    def close(self) -> None: ...


@dataclass
class HostView:
    """One host as the dashboard shows it (``error`` set when its agent did not answer)."""

    name: str
    info: dict[str, Any] = field(default_factory=dict)
    vms: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def service_endpoints(
    cfg: ClientConfig,
    hosts: list[str] | None,
    cert: str | None = None,
    key: str | None = None,
    ca: str | None = None,
) -> dict[str, HostEndpoint]:
    """The agents to manage (``hosts``, default every configured host), with the service's
    own certificate (``cert``/``key``/``ca``) replacing the client configuration's."""
    names = hosts or sorted(cfg.hosts)
    unknown = [n for n in names if n not in cfg.hosts]
    if unknown:
        raise RefusedError(
            f"unknown host(s) {', '.join(unknown)} in the client configuration",
            field="--hosts",
            fix="known: " + (", ".join(sorted(cfg.hosts)) or "none; run ferry lab up"),
        )
    if not names:
        raise RefusedError(
            "no hosts to manage", field="--hosts", fix="add hosts to the client configuration"
        )
    out: dict[str, HostEndpoint] = {}
    for n in names:
        ep = cfg.hosts[n]
        out[n] = HostEndpoint(url=ep.url, ca=ca or ep.ca, cert=cert or ep.cert, key=key or ep.key)
    return out


def progress_of(job: dict[str, Any]) -> tuple[float, str]:
    """Percent done and a one-line detail for a job record (as ``ferry move`` shows it)."""
    p = job.get("progress") or {}
    total = int(p.get("ram_total", 0)) + int(p.get("disk_total", 0))
    done = int(p.get("ram_transferred", 0)) + int(p.get("disk_transferred", 0))
    pct = min(99.0, 100.0 * done / total) if total else 0.0
    if job.get("state") == "completed":
        pct = 100.0
    mib = done / 2**20
    if job.get("kind") == "storage":
        detail = f"{mib:,.0f} of {total / 2**20:,.0f} MiB copied"
    elif job.get("kind") == "quick":
        detail = f"{mib:,.0f} MiB of state saved" if done else ""
    else:
        detail = f"{mib:,.0f} MiB sent, pass {p.get('passes', 0)}"
    if p.get("mbps"):
        detail += f", {float(p['mbps']):.0f} Mbit/s"
    if p.get("eta_s") is not None and job.get("state") not in TERMINAL:
        detail += f", ETA {float(p['eta_s']):.0f} s"
    if job.get("queue_position"):
        detail = f"waiting, position {job['queue_position']}"
    return round(pct, 1), detail


class Agents:
    """Named agent clients (created on first use, kept open) and fan-out helpers."""

    def __init__(
        self,
        endpoints: dict[str, HostEndpoint],
        factory: Callable[[HostEndpoint], AgentClient] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.endpoints = endpoints
        self.timeout = timeout
        self._factory = factory or (lambda ep: FerryClient(ep, timeout=timeout))
        self._clients: dict[str, AgentClient] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=min(8, max(1, len(endpoints))))

    @property
    def names(self) -> list[str]:
        """The managed hosts, sorted."""
        return sorted(self.endpoints)

    def url(self, host: str) -> str:
        """The agent URL of ``host``."""
        return self.endpoints[self.known(host)].url

    def known(self, host: str) -> str:
        """``host`` if it is managed here, else a NotFoundError naming the known ones."""
        if host not in self.endpoints:
            raise NotFoundError(
                f"host {host!r} is not managed by this Admin Center",
                field="host",
                fix="managed: " + ", ".join(self.names),
            )
        return host

    def client(self, host: str) -> AgentClient:
        """The (shared) client of ``host``."""
        self.known(host)
        with self._lock:
            c = self._clients.get(host)
            if c is None:
                c = self._clients[host] = self._factory(self.endpoints[host])
            return c

    def close(self) -> None:
        """Close every client and the thread pool."""
        with self._lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def each(
        self, fn: Callable[[AgentClient], T], hosts: list[str] | None = None
    ) -> dict[str, T | FerryError]:
        """``fn(client)`` on every host (or ``hosts``) at once; a failure is kept as its
        FerryError."""

        def one(host: str) -> T | FerryError:
            try:
                return fn(self.client(host))
            except FerryError as exc:
                return exc

        futures = {h: self._pool.submit(one, h) for h in (hosts or self.names)}
        return {h: f.result() for h, f in futures.items()}

    # -- what the pages show --------------------------------------------------------------------
    def hosts(self) -> list[HostView]:
        """Every host with its facts and VMs."""
        results = self.each(lambda c: (c.host(), c.vms()))
        views = []
        for h, r in results.items():
            if isinstance(r, FerryError):
                views.append(HostView(name=h, error=r.message))
            else:
                views.append(HostView(name=h, info=r[0], vms=r[1]))
        return views

    def cluster(self) -> dict[str, Any] | None:
        """The status of the cluster the first answering host is in, or None (standalone)."""
        for h in self.names:
            try:
                member = self.client(h).cluster_member()
            except FerryError:
                continue
            name = member.get("cluster")
            if not name:
                return None
            try:
                return self.client(h).cluster_status(name)
            except FerryError as exc:
                return {"name": name, "error": exc.message, "nodes": []}
        return None

    def find_vm(self, vm: str) -> tuple[str, dict[str, Any]]:
        """The host that has VM ``vm`` and its record."""
        for view in self.hosts():
            for v in view.vms:
                if v.get("name") == vm:
                    return view.name, v
        raise NotFoundError(
            f"no managed host has a VM named {vm!r}", field="vm", fix="see the dashboard"
        )

    def jobs(self) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """Recent jobs of every host (newest first, bounded) with live progress for the
        unfinished ones, and the hosts that did not answer (host -> error)."""
        results = self.each(lambda c: c.migrations())
        rows: list[dict[str, Any]] = []
        errors: dict[str, str] = {}
        for h, r in results.items():
            if isinstance(r, FerryError):
                errors[h] = r.message
                continue
            rows += [{**j, "host": h} for j in r]
        rows.sort(key=lambda j: float(j.get("created_at") or 0), reverse=True)
        rows = rows[:MAX_JOBS_LISTED]
        active = [j for j in rows if j.get("state") not in TERMINAL][:MAX_ACTIVE_POLLED]
        for j in active:
            try:
                full = self.client(j["host"]).migration(j["id"])
            except FerryError:
                continue
            j.update(state=full.get("state"), phase=full.get("phase"), progress=full["progress"])
        for j in rows:
            if "progress" in j:
                j["pct"], j["detail"] = progress_of(j)
            else:  # ended: the listing has no figures, only the outcome and the total time
                j["pct"] = 100.0 if j.get("state") == "completed" else 0.0
                j["detail"] = f"total {j['total_s']:.1f} s" if j.get("total_s") else ""
        return rows, errors

    def job(self, host: str, job_id: str) -> dict[str, Any]:
        """One job record with its progress figures."""
        job = self.client(host).migration(job_id)
        job["host"] = host
        job["pct"], job["detail"] = progress_of(job)
        return job

    def trace(self, host: str, job_id: str) -> dict[str, Any] | None:
        """The job's trace (``GET /v1/migrations/{id}/trace``), or None where the agent has
        none (an older agent, or a job without one)."""
        try:
            result = self.client(host).request("GET", f"/v1/migrations/{job_id}/trace")
        except NotFoundError:
            return None
        return result if isinstance(result, dict) else None

    def events(
        self, hosts: list[str], **filters: Any
    ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """Events of ``hosts`` merged by time (newest last), and hosts that did not answer."""
        rows: list[dict[str, Any]] = []
        errors: dict[str, str] = {}
        results = self.each(lambda c: c.events(**filters), [self.known(h) for h in hosts])
        for h, r in results.items():
            if isinstance(r, FerryError):
                errors[h] = r.message
            else:
                rows += r
        rows.sort(key=lambda e: (e.get("at", 0), e.get("host", ""), e.get("id", 0)))
        return rows, errors

    def revoked_serials(self) -> set[int]:
        """Serials the agents' revocation lists name (``GET /v1/security/crl``)."""
        serials: set[int] = set()
        for r in self.each(lambda c: c.request("GET", "/v1/security/crl", timeout=5)).values():
            if isinstance(r, dict) and r.get("crl"):
                serials |= {int(s, 16) for s in r["crl"].get("revoked", [])}
        return serials
