"""How one agent asks another about cluster matters (``cluster.service.AgentApi``)."""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from vmferry.api.peer import AgentTLS
from vmferry.cluster.validate import NodeFacts
from vmferry.cluster.volumes import VolumeCheck, VolumeCheckResult
from vmferry.errors import NotFoundError, UnreachableError, checked_json


class HttpClusterPeer:
    """Short HTTPS calls to other agents with this agent's certificate."""

    def __init__(self, tls: AgentTLS | None, timeout: float = 10.0) -> None:
        self._tls = tls
        self._timeout = timeout

    async def _call(self, method: str, url: str, body: Any = None) -> Any:
        # The context per call: rebuilt by AgentTLS when the CRL was replaced.
        verify: ssl.SSLContext | bool = self._tls.context() if self._tls else False
        try:
            async with httpx.AsyncClient(verify=verify, timeout=self._timeout) as http:
                r = await http.request(method, url, json=body)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise UnreachableError(
                f"agent at {url} did not answer: {exc.__class__.__name__} {exc}",
                fix="is ferryd running there and reachable on its management address?",
            ) from exc
        return checked_json(r, url)

    async def member(self, url: str) -> dict[str, Any]:
        """The other agent's node name, etcd endpoints and lease state."""
        result: dict[str, Any] = await self._call("GET", f"{url.rstrip('/')}/v1/cluster/member")
        return result

    async def volume_check(self, url: str, check: VolumeCheck) -> VolumeCheckResult:
        """Ask the other agent to check a shared volume."""
        data = await self._call(
            "POST", f"{url.rstrip('/')}/v1/cluster/volume-check", check.model_dump()
        )
        return VolumeCheckResult.model_validate(data)

    async def facts(self, url: str) -> NodeFacts:
        """The other agent's facts for ``cluster validate``."""
        return NodeFacts.model_validate(
            await self._call("GET", f"{url.rstrip('/')}/v1/cluster/facts")
        )

    async def reach(self, url: str, addresses: list[str]) -> dict[str, bool]:
        """Ask the other agent which of ``addresses`` it reaches."""
        data = await self._call(
            "POST", f"{url.rstrip('/')}/v1/cluster/reach", {"addresses": addresses}
        )
        return {str(k): bool(v) for k, v in data.items()}

    # -- the failover controller's calls (cluster/controller.py: AgentCalls) ----------------------
    async def host_info(self, url: str) -> dict[str, Any]:
        """The other agent's host facts (free memory for VMs)."""
        result: dict[str, Any] = await self._call("GET", f"{url.rstrip('/')}/v1/host")
        return result

    async def vm(self, url: str, name: str) -> dict[str, Any] | None:
        """The VM as that agent has it, or None when it has no VM of that name."""
        try:
            result: dict[str, Any] = await self._call("GET", f"{url.rstrip('/')}/v1/vms/{name}")
        except NotFoundError:
            return None
        return result

    async def import_vm(self, url: str, path: str) -> dict[str, Any]:
        """Ask that agent to register the VM whose folder on a shared volume is ``path``."""
        result: dict[str, Any] = await self._call(
            "POST", f"{url.rstrip('/')}/v1/vms/import", {"path": path, "peers": {}}
        )
        return result

    async def start_vm(self, url: str, name: str) -> dict[str, Any]:
        """Ask that agent to start the VM."""
        result: dict[str, Any] = await self._call(
            "POST", f"{url.rstrip('/')}/v1/vms/{name}/actions", {"action": "start", "timeout": 60}
        )
        return result

    # -- planned moves and drains (cluster/planned.py: MoveCalls) ---------------------------------
    async def start_planned_move(
        self,
        url: str,
        vm: str,
        to: str,
        quick: bool,
        reason: str,
        group: str | None = None,
        group_limit: int = 0,
    ) -> dict[str, Any]:
        """Ask the VM's owner to mark and start a planned move; its answer holds the job."""
        body = {
            "to": to, "quick": quick, "reason": reason, "group": group,
            "group_limit": group_limit,
        }  # fmt: skip
        result: dict[str, Any] = await self._call(
            "POST", f"{url.rstrip('/')}/v1/cluster/vms/{vm}/planned-move", body
        )
        return result

    async def cancel_migration(self, url: str, job_id: str) -> dict[str, Any]:
        """Cancel a migration job on that agent."""
        result: dict[str, Any] = await self._call(
            "POST", f"{url.rstrip('/')}/v1/migrations/{job_id}/cancel"
        )
        return result

    async def migration(self, url: str, job_id: str) -> dict[str, Any]:
        """A migration job as that agent has it."""
        result: dict[str, Any] = await self._call(
            "GET", f"{url.rstrip('/')}/v1/migrations/{job_id}"
        )
        return result
