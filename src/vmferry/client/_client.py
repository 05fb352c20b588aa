"""A synchronous client for one ferryd agent."""

from __future__ import annotations

import ssl
import urllib.parse
from pathlib import Path
from typing import Any

import httpx

from vmferry.client._config import HostEndpoint
from vmferry.errors import RefusedError, UnreachableError, checked_json
from vmferry.security.tickets import DEFAULT_TICKET_S, SignedTicket, sign_ticket


class FerryClient:
    """Talks to one agent over HTTPS with a client certificate."""

    def __init__(self, endpoint: HostEndpoint, timeout: float = 30.0) -> None:
        self.endpoint = endpoint
        ctx = ssl.create_default_context(cafile=endpoint.ca)
        if endpoint.cert and endpoint.key:
            ctx.load_cert_chain(endpoint.cert, endpoint.key)
        self._http = httpx.Client(base_url=endpoint.url, verify=ctx, timeout=timeout)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> FerryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self, method: str, path: str, *, json: Any = None, timeout: float | None = None
    ) -> Any:
        """Send one request; an error body becomes the matching :class:`FerryError`."""
        try:
            resp = self._http.request(
                method,
                path,
                json=json,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TimeoutException as exc:
            raise UnreachableError(
                f"{self.endpoint.url} did not answer in time ({exc.__class__.__name__})",
                fix="the operation may still be running; check with ferry vm show",
            ) from exc
        except httpx.TransportError as exc:
            raise UnreachableError(
                f"cannot reach the agent at {self.endpoint.url}: {exc}",
                fix="is ferryd running there, and are the CA and client certificate right?",
            ) from exc
        if resp.status_code == 204:
            return None
        return checked_json(resp, f"{self.endpoint.url}{path}")

    # -- host ------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """Liveness and version of the agent."""
        result: dict[str, Any] = self.request("GET", "/v1/health")
        return result

    def host(self) -> dict[str, Any]:
        """The host's facts, settings summary and VM counts."""
        result: dict[str, Any] = self.request("GET", "/v1/host")
        return result

    def settings(self) -> dict[str, Any]:
        """The host's settings."""
        result: dict[str, Any] = self.request("GET", "/v1/host/settings")
        return result

    def update_settings(self, **changes: Any) -> dict[str, Any]:
        """Change host settings (fields left out keep their value)."""
        result: dict[str, Any] = self.request("PATCH", "/v1/host/settings", json=changes)
        return result

    # -- VMs -------------------------------------------------------------------------------
    def vms(self) -> list[dict[str, Any]]:
        """Every VM on the host."""
        result: list[dict[str, Any]] = self.request("GET", "/v1/vms")
        return result

    def vm(self, name: str) -> dict[str, Any]:
        """One VM."""
        result: dict[str, Any] = self.request("GET", f"/v1/vms/{name}")
        return result

    def create_vm(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Create a VM from a VMCreate-shaped dict."""
        result: dict[str, Any] = self.request("POST", "/v1/vms", json=spec)
        return result

    def console(self, name: str, lines: int = 50) -> list[str]:
        """The tail of the VM's serial console."""
        result: list[str] = self.request("GET", f"/v1/vms/{name}/console?lines={lines}")["lines"]
        return result

    def delete_vm(self, name: str) -> None:
        """Delete an off VM and its files."""
        self.request("DELETE", f"/v1/vms/{name}")

    def move(self, name: str, request: dict[str, Any], *, sign: bool = True) -> dict[str, Any]:
        """Start a live move (or, with ``what_if``, only check and plan it).

        With ``sign`` (and a client certificate) the request carries a move ticket signed
        with the client's key, bound to this VM, this host and the destination (hosts with
        ``migration.authentication = delegated`` need one; see docs/security.md).
        """
        dest = request.get("destination")
        if (
            sign
            and "ticket" not in request
            and isinstance(dest, dict)
            and isinstance(dest.get("name"), str)
            and self.endpoint.cert
            and self.endpoint.key
        ):
            request = {**request, "ticket": self.move_ticket(name, request).model_dump()}
        result: dict[str, Any] = self.request(
            "POST", f"/v1/vms/{name}/move", json=request, timeout=180
        )
        return result

    def move_ticket(
        self, name: str, request: dict[str, Any], ttl_s: float = DEFAULT_TICKET_S
    ) -> SignedTicket:
        """A ticket for moving VM ``name`` from this host as ``request`` says."""
        if not (self.endpoint.cert and self.endpoint.key):
            raise RefusedError(
                "signing a move ticket needs a client certificate and key", field="cert"
            )
        quick = bool(request.get("options", {}).get("quick"))
        return sign_ticket(
            Path(self.endpoint.cert), Path(self.endpoint.key), vm=name,
            source=str(self.host()["name"]), destination=str(request["destination"]["name"]),
            service="quick" if quick else "live", ttl_s=ttl_s,
        )  # fmt: skip

    def move_storage(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        """Start a storage move (a StorageMoveRequest-shaped dict); returns the job."""
        result: dict[str, Any] = self.request(
            "POST", f"/v1/vms/{name}/move-storage", json=request, timeout=60
        )
        return result

    def import_vm(self, path: str, peers: dict[str, str] | None = None) -> dict[str, Any]:
        """Register the VM whose folder on a shared volume is ``path`` (``ferry vm import``).

        ``peers`` (host name -> agent URL) lets the agent ask the VM's owner about it.
        """
        result: dict[str, Any] = self.request(
            "POST", "/v1/vms/import", json={"path": path, "peers": peers or {}}, timeout=60
        )
        return result

    def migrations(self) -> list[dict[str, Any]]:
        """Moves this host started, newest first."""
        result: list[dict[str, Any]] = self.request("GET", "/v1/migrations")
        return result

    def migration(self, job_id: str) -> dict[str, Any]:
        """One move job with its phases and figures."""
        result: dict[str, Any] = self.request("GET", f"/v1/migrations/{job_id}")
        return result

    def migration_trace(self, job_id: str) -> dict[str, Any]:
        """A move's trace: phase timeline, memory passes and figure samples."""
        result: dict[str, Any] = self.request("GET", f"/v1/migrations/{job_id}/trace")
        return result

    def metrics_text(self) -> str:
        """The agent's Prometheus metrics (text exposition format)."""
        try:
            resp = self._http.get("/metrics")
        except httpx.TransportError as exc:
            raise UnreachableError(f"cannot reach the agent at {self.endpoint.url}: {exc}") from exc
        if resp.status_code >= 400:
            checked_json(resp, f"{self.endpoint.url}/metrics")
        return resp.text

    def complete_migration(self, job_id: str) -> dict[str, Any]:
        """Finish a move whose hand-over to the destination agent failed after QEMU completed."""
        result: dict[str, Any] = self.request("POST", f"/v1/migrations/{job_id}/complete")
        return result

    def cancel_migration(self, job_id: str) -> dict[str, Any]:
        """Cancel a move before switchover."""
        result: dict[str, Any] = self.request("POST", f"/v1/migrations/{job_id}/cancel")
        return result

    def action(self, name: str, action: str, timeout: float = 60.0) -> dict[str, Any]:
        """Run start|stop|shutdown|pause|resume|save|restore on a VM and return its new state."""
        result: dict[str, Any] = self.request(
            "POST",
            f"/v1/vms/{name}/actions",
            json={"action": action, "timeout": timeout},
            timeout=timeout + 120,
        )
        return result

    # -- cluster (cluster/, api/cluster_routes.py) -------------------------------------------
    def cluster_create(
        self, name: str, nodes: dict[str, str], force: bool = False
    ) -> dict[str, Any]:
        """Create a cluster of ``nodes`` (node name -> agent URL); validated unless ``force``."""
        body = {
            "name": name,
            "nodes": [{"name": n, "url": u} for n, u in nodes.items()],
            "force": force,
        }
        result: dict[str, Any] = self.request("POST", "/v1/cluster", json=body, timeout=60)
        return result

    def cluster_validate(
        self,
        cluster: str | None = None,
        nodes: dict[str, str] | None = None,
        volumes: list[str] | None = None,
    ) -> dict[str, Any]:
        """Validate a cluster (or the given nodes and volumes): pass/warning/fail per test."""
        body = {
            "cluster": cluster,
            "nodes": [{"name": n, "url": u} for n, u in (nodes or {}).items()],
            "volumes": volumes or [],
        }
        result: dict[str, Any] = self.request("POST", "/v1/cluster/validate", json=body, timeout=60)
        return result

    def cluster_status(self, name: str | None = None) -> dict[str, Any]:
        """Nodes, leases, leader, volumes (of ``name``, or of this host's cluster)."""
        path = "/v1/cluster" + (f"?name={name}" if name else "")
        result: dict[str, Any] = self.request("GET", path)
        return result

    def cluster_join(self, name: str, node: str, url: str) -> dict[str, Any]:
        """Add node ``node`` (its agent at ``url``) to cluster ``name``."""
        result: dict[str, Any] = self.request(
            "POST", f"/v1/cluster/{name}/nodes", json={"name": node, "url": url}
        )
        return result

    def cluster_leave(self, name: str, node: str) -> dict[str, Any]:
        """Remove node ``node`` from cluster ``name``."""
        result: dict[str, Any] = self.request("DELETE", f"/v1/cluster/{name}/nodes/{node}")
        return result

    def cluster_destroy(self, name: str) -> dict[str, Any]:
        """Delete cluster ``name`` (its nodes become standalone)."""
        result: dict[str, Any] = self.request("DELETE", f"/v1/cluster/{name}")
        return result

    def cluster_member(self) -> dict[str, Any]:
        """This agent's own view: its cluster, lease, leader, fencing."""
        result: dict[str, Any] = self.request("GET", "/v1/cluster/member")
        return result

    def cluster_volumes(self, cluster: str | None = None) -> list[dict[str, Any]]:
        """The cluster's shared volumes."""
        q = f"?cluster={cluster}" if cluster else ""
        result: list[dict[str, Any]] = self.request("GET", f"/v1/cluster/volumes{q}")
        return result

    def cluster_volume_add(self, path: str, cluster: str | None = None) -> dict[str, Any]:
        """Check ``path`` on every node and add it as a shared volume."""
        result: dict[str, Any] = self.request(
            "POST", "/v1/cluster/volumes", json={"path": path, "cluster": cluster}, timeout=60
        )
        return result

    def cluster_volume_remove(self, path: str, cluster: str | None = None) -> dict[str, Any]:
        """Forget a shared volume."""
        from urllib.parse import urlencode

        q = urlencode({"path": path, **({"cluster": cluster} if cluster else {})})
        result: dict[str, Any] = self.request("DELETE", f"/v1/cluster/volumes?{q}")
        return result

    # -- clustered VMs and failover (cluster/vms.py, cluster/controller.py) ----------------------
    def cluster_vms(self, cluster: str | None = None) -> list[dict[str, Any]]:
        """Clustered VMs with their owner and properties."""
        q = f"?cluster={cluster}" if cluster else ""
        result: list[dict[str, Any]] = self.request("GET", f"/v1/cluster/vms{q}")
        return result

    def events(self, **filters: Any) -> list[dict[str, Any]]:
        """This agent's events (filters: vm, job, level, kind, since, after, limit)."""
        params = {k: v for k, v in filters.items() if v is not None}
        result: list[dict[str, Any]] = self.request(
            "GET", "/v1/events?" + urllib.parse.urlencode(params)
        )
        return result

    def cluster_vm_move(
        self, name: str, to: str | None, best: bool, quick: bool, cluster: str | None = None
    ) -> dict[str, Any]:
        """Start a planned move of a clustered VM (its owner runs it); the job is in ``job``."""
        body = {"to": to, "best": best, "quick": quick, "cluster": cluster}
        result: dict[str, Any] = self.request("POST", f"/v1/cluster/vms/{name}/move", json=body)
        return result

    def cluster_drain(self, cluster: str, node: str) -> dict[str, Any]:
        """Pause ``node`` and move its clustered VMs away (the leader works through it)."""
        result: dict[str, Any] = self.request("POST", f"/v1/cluster/{cluster}/nodes/{node}/drain")
        return result

    def cluster_resume(self, cluster: str, node: str, failback: bool) -> dict[str, Any]:
        """Unpause ``node``; with ``failback``, move back what its drain moved away."""
        result: dict[str, Any] = self.request(
            "POST", f"/v1/cluster/{cluster}/nodes/{node}/resume", json={"failback": failback}
        )
        return result

    def cluster_vm_add(self, name: str, **props: Any) -> dict[str, Any]:
        """Make a VM of this host clustered (priority, preferred, possible, anti_affinity)."""
        result: dict[str, Any] = self.request(
            "POST", "/v1/cluster/vms", json={"name": name, **props}
        )
        return result

    def cluster_vm_set(self, name: str, cluster: str | None = None, **props: Any) -> dict[str, Any]:
        """Change a clustered VM's properties (those given)."""
        q = f"?cluster={cluster}" if cluster else ""
        result: dict[str, Any] = self.request("PATCH", f"/v1/cluster/vms/{name}{q}", json=props)
        return result

    def cluster_vm_remove(self, name: str, cluster: str | None = None) -> dict[str, Any]:
        """Stop clustering a VM (it keeps running)."""
        q = f"?cluster={cluster}" if cluster else ""
        result: dict[str, Any] = self.request("DELETE", f"/v1/cluster/vms/{name}{q}")
        return result

    def cluster_events(self, cluster: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """The cluster's last events (failovers, VMs added, unplaced VMs), oldest first."""
        q = f"?limit={limit}" + (f"&cluster={cluster}" if cluster else "")
        result: list[dict[str, Any]] = self.request("GET", f"/v1/cluster/events{q}")
        return result
