"""How one agent talks to another during a move: HTTPS with the agent's own certificate."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from vmferry.errors import NotFoundError, UnreachableError, check_response
from vmferry.migration.model import CheckResult, Destination, IncomingPlan, IncomingRequest
from vmferry.migration.quick import QuickRequest


@dataclass(frozen=True)
class AgentTLS:
    """This agent's certificate, key and the CA that signs its peers."""

    cert: Path
    key: Path
    ca: Path

    def context(self) -> ssl.SSLContext:
        """A client context presenting this agent's certificate."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


class HttpPeer:
    """The destination agent's incoming-move API."""

    def __init__(self, dest: Destination, tls: AgentTLS | None) -> None:
        self.dest = dest
        verify: ssl.SSLContext | bool = tls.context() if tls else False
        self._http = httpx.AsyncClient(base_url=dest.url, verify=verify, timeout=120)

    async def _call(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> Any:
        try:
            r = await self._http.request(
                method, path, json=body, timeout=timeout or httpx.USE_CLIENT_DEFAULT
            )
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise UnreachableError(
                f"destination agent {self.dest.name} ({self.dest.url}) did not answer: {exc}",
                fix="is ferryd running there and reachable on its management address?",
            ) from exc
        if r.status_code == 204:
            return None
        try:
            data = r.json()
        except ValueError:
            data = None
        check_response(r.status_code, data, f"destination {self.dest.name}")
        return data

    async def prepare(self, req: IncomingRequest) -> IncomingPlan:
        """Check (dry run) or build the skeleton VM on the destination."""
        data = await self._call("POST", "/v1/migrations/incoming", req.model_dump(mode="json"))
        return IncomingPlan.model_validate(data)

    async def start(self, job_id: str, address: str) -> None:
        """Let the destination listen for the stream on ``address``."""
        await self._call("POST", f"/v1/migrations/incoming/{job_id}/start", {"address": address})

    async def status(self, job_id: str) -> dict[str, Any]:
        """The destination QEMU's state."""
        result: dict[str, Any] = await self._call("GET", f"/v1/migrations/incoming/{job_id}")
        return result

    async def commit(self, job_id: str, paused: bool, started_at: float | None) -> dict[str, Any]:
        """The stream completed: the destination owns and announces the VM."""
        result: dict[str, Any] = await self._call(
            "POST",
            f"/v1/migrations/incoming/{job_id}/commit",
            {"paused": paused, "started_at": started_at},
        )
        return result

    async def abort(self, job_id: str) -> None:
        """Undo the destination's preparations."""
        await self._call("POST", f"/v1/migrations/incoming/{job_id}/abort")

    async def recover(self, job_id: str, address: str) -> int:
        """Post-copy recovery: the destination listens again and says on which port."""
        data = await self._call(
            "POST", f"/v1/migrations/incoming/{job_id}/recover", {"address": address}
        )
        return int(data["port"])

    # -- quick moves and imports (migration/quick.py) ------------------------------------------
    async def quick_checks(self, req: QuickRequest) -> list[CheckResult]:
        """The destination's checks for a quick move."""
        data = await self._call(
            "POST", "/v1/migrations/incoming/quick/checks", req.model_dump(mode="json")
        )
        return [CheckResult.model_validate(c) for c in data]

    async def quick_receive(self, req: QuickRequest) -> dict[str, Any]:
        """The destination imports the VM from the shared volume and restores it."""
        result: dict[str, Any] = await self._call(
            "POST", "/v1/migrations/incoming/quick/receive", req.model_dump(mode="json"),
            timeout=900,
        )  # fmt: skip
        return result

    async def vm(self, name: str) -> dict[str, Any] | None:
        """The agent's view of one VM; None when it has no VM of that name."""
        try:
            result: dict[str, Any] = await self._call("GET", f"/v1/vms/{name}")
        except NotFoundError:
            return None
        return result

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()
