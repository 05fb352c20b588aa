"""How one agent talks to another during a move: HTTPS with the agent's own certificate."""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from vmferry.errors import FerryError, NotFoundError, UnreachableError, checked_json
from vmferry.migration.model import CheckResult, Destination, IncomingPlan, IncomingRequest
from vmferry.migration.quick import QuickRequest
from vmferry.security.pki import verify_crl

log = logging.getLogger("vmferry.api.peer")

#: Where an agent keeps its current verified revocation list, under its state directory
#: (written by ``api.security.CRLStore``, read by :meth:`AgentTLS.context`).
CRL_FILE = Path("security") / "crl.pem"


def _file_sig(path: Path | None) -> tuple[int, int, int] | None:
    """(inode, mtime, size) of ``path``: changes whenever the file is replaced."""
    if path is None:
        return None
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass(frozen=True)
class AgentTLS:
    """This agent's certificate, key and the CA that signs its peers.

    ``crl`` is the agent's revocation list file (``<state>/security/crl.pem``); while it
    exists, a peer agent whose *server* certificate it lists is refused in the handshake.
    """

    cert: Path
    key: Path
    ca: Path
    crl: Path | None = None
    #: The last context built and the CRL file signature it was built for.
    _cached: dict[str, Any] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def with_state_dir(self, state_dir: Path) -> AgentTLS:
        """The same identity, checking peers against the CRL kept in ``state_dir``."""
        return AgentTLS(self.cert, self.key, self.ca, state_dir / CRL_FILE)

    def context(self) -> ssl.SSLContext:
        """A client context presenting this agent's certificate.

        With a CRL, the peer's leaf certificate is checked against it too
        (``VERIFY_CRL_CHECK_LEAF``). The context is kept until the CRL file is replaced, so
        callers fetch it per connection and a pushed CRL applies to the next call.
        """
        sig = _file_sig(self.crl)
        cached = self._cached.get("ctx")
        if cached is not None and cached[0] == sig:
            ctx: ssl.SSLContext = cached[1]
            return ctx
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.cert), str(self.key))
        if sig is not None and self.crl is not None:
            self._load_crl(ctx, self.crl)
        self._cached["ctx"] = (sig, ctx)
        return ctx

    def _load_crl(self, ctx: ssl.SSLContext, path: Path) -> None:
        """Add the CRL at ``path`` to ``ctx`` if the CA signed it (as ``CRLStore`` does)."""
        try:
            pem = path.read_bytes()
            crl = verify_crl(pem, self.ca)
        except (OSError, FerryError) as exc:
            msg = exc.message if isinstance(exc, FerryError) else str(exc)
            log.error("peer agents' certificates are not checked against %s: %s", path, msg)
            return
        if crl.next_update is not None and crl.next_update < time.time():
            # OpenSSL refuses every peer once the CRL is past its next update; the agents
            # keep using the newest list they have (docs/security.md), so skip it here.
            log.error(
                "the revocation list %s is past its next update; peer agents' server "
                "certificates are not checked against it until a newer one is pushed",
                path,
            )
            return
        # ssl loads CRLs only from a file (cadata takes certificates only): the verified bytes.
        fd, tmp = tempfile.mkstemp(prefix=".crl-", suffix=".pem", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
            ctx.load_verify_locations(cafile=tmp)
        finally:
            os.unlink(tmp)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


class HttpPeer:
    """The destination agent's incoming-move API."""

    def __init__(self, dest: Destination, tls: AgentTLS | None) -> None:
        self.dest = dest
        # A client per move: the context reflects the CRL current when the move starts.
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
        return checked_json(r, f"destination {self.dest.name}")

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
