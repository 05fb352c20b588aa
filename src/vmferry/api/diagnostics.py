"""ferryd's ``/v1/host/diagnostics/...`` routes: what ``ferry doctor`` asks a source agent to try.

* ``POST /v1/host/diagnostics/reach {address, port, peer}`` — open one TCP connection (at most
  :data:`CONNECT_TIMEOUT_S`) to a migration listener and say what happened. Only targets a move
  could use are allowed: an address inside one of this host's migration networks (a CIDR, not
  ``any``) on a port of this host's migration range, or one of the migration addresses the peer
  agent at ``peer`` lists (asked over mutual TLS with this agent's certificate) on a port of the
  peer's range. Anything else is refused, so the endpoint cannot scan ports.
* ``POST /v1/host/diagnostics/peer {url}`` — resolve the host part of another agent's URL and
  call its ``/v1/health`` with this agent's certificate: the name, the route and both
  certificates as a move from this host would use them.

Both are for operators and admins (``security/roles.py``).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import ssl
import time
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI
from pydantic import BaseModel, Field, field_validator

from vmferry.api.peer import AgentTLS
from vmferry.errors import FerryError, RefusedError, UnreachableError, checked_json
from vmferry.host import Host
from vmferry.validation import check_agent_url

#: Longest a probe connection, a name lookup or a call to the peer agent may take.
CONNECT_TIMEOUT_S = 3.0

#: ``no-route``: this host has no route to the address (its own side of the network is down).
Outcome = Literal["accepted", "refused", "timeout", "unreachable", "no-route", "error"]


class ReachProbe(BaseModel):
    """``POST /v1/host/diagnostics/reach``: one migration listener to connect to."""

    address: str = Field(min_length=1, max_length=45)
    port: int = Field(ge=1, le=65535)
    #: The agent URL of the peer whose listed migration addresses may be probed.
    peer: str | None = Field(default=None, max_length=300)

    @field_validator("address")
    @classmethod
    def _ip(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v))
        except ValueError as exc:
            raise ValueError(f"{v[:45]!r} is not an IP address") from exc

    @field_validator("peer")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return None if v is None else check_agent_url(v).rstrip("/")


class PeerProbe(BaseModel):
    """``POST /v1/host/diagnostics/peer``: another agent's URL."""

    url: str = Field(min_length=1, max_length=300)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_agent_url(v).rstrip("/")


def in_networks(address: str, networks: list[str]) -> str | None:
    """The first CIDR of ``networks`` that holds ``address`` (``any`` never counts), or None."""
    ip = ipaddress.ip_address(address)
    for net in networks:
        if net != "any" and ip in ipaddress.ip_network(net):
            return net
    return None


def classify(exc: BaseException | None) -> Outcome:
    """What a connect attempt's exception (None: it was accepted) says about the path."""
    if exc is None:
        return "accepted"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno in (errno.ENETUNREACH, errno.ENETDOWN):
        return "no-route"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.EHOSTDOWN):
        return "unreachable"
    return "error"


async def connect_once(
    address: str, port: int, timeout: float = CONNECT_TIMEOUT_S
) -> dict[str, Any]:
    """One TCP connect to ``address:port``, closed at once; the outcome and how long it took."""
    t0 = time.monotonic()
    failure: BaseException | None = None
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
        writer.close()
    except (OSError, TimeoutError) as exc:
        failure = exc
    outcome = classify(failure)
    return {
        "address": address,
        "port": port,
        "result": outcome,
        # a refusal proves the address answers: nothing listens there until a move starts
        "ok": outcome in ("accepted", "refused"),
        "ms": round((time.monotonic() - t0) * 1000, 1),
        "error": _describe(failure, timeout),
    }


def _describe(failure: BaseException | None, timeout: float) -> str | None:
    if failure is None:
        return None
    if isinstance(failure, TimeoutError):
        return f"no answer within {timeout:g} s"
    return f"{failure.__class__.__name__}: {failure}"


class _PeerAgent:
    """Short GETs to another agent with this agent's certificate."""

    def __init__(self, tls: AgentTLS | None) -> None:
        self._tls = tls

    async def get(self, url: str, path: str) -> Any:
        verify: ssl.SSLContext | bool = self._tls.context() if self._tls else False  # + CRL
        try:
            async with httpx.AsyncClient(verify=verify, timeout=CONNECT_TIMEOUT_S) as http:
                r = await http.get(f"{url}{path}")
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise UnreachableError(
                f"the agent at {url} did not answer: {exc.__class__.__name__} {exc}"
            ) from exc
        return checked_json(r, url)


async def _resolve(hostname: str) -> list[str]:
    infos = await asyncio.wait_for(
        asyncio.get_running_loop().getaddrinfo(hostname, None, type=socket.SOCK_STREAM),
        CONNECT_TIMEOUT_S,
    )
    out: list[str] = []
    for info in infos:
        addr = str(info[4][0])
        if addr not in out:
            out.append(addr)
    return out


def add_diagnostics_routes(app: FastAPI, host: Host, tls: AgentTLS | None) -> None:
    """Add ``/v1/host/diagnostics/reach`` and ``/v1/host/diagnostics/peer`` to ``app``."""
    peers = _PeerAgent(tls)

    async def allowed_by(probe: ReachProbe) -> str:
        mig = host.settings.migration
        net = in_networks(probe.address, mig.networks)
        if net is not None and mig.port_min <= probe.port <= mig.port_max:
            return f"this host's migration network {net}"
        if probe.peer is not None:
            try:
                facts = await peers.get(probe.peer, "/v1/cluster/facts")
                theirs = await peers.get(probe.peer, "/v1/host/settings")
            except FerryError as exc:
                raise RefusedError(
                    f"could not ask the peer agent for its migration listeners: {exc.message}",
                    field="peer",
                    fix="check the peer's URL (ferry doctor checks the agent-to-agent path too)",
                ) from exc
            listed = [str(a) for a in facts.get("migration_addresses", [])]
            pmig = theirs.get("migration", {})
            lo, hi = int(pmig.get("port_min", 0)), int(pmig.get("port_max", -1))
            if probe.address in listed and lo <= probe.port <= hi:
                return f"a migration listener of {facts.get('node', probe.peer)}"
        raise RefusedError(
            f"{probe.address}:{probe.port} is not a migration listener this agent may probe: "
            f"it must lie in this host's migration networks ({', '.join(mig.networks)}) on a "
            f"port of {mig.port_min}-{mig.port_max}, or be one the peer agent lists on a port "
            "of its range",
            field="address",
            fix="probe only migration listener addresses (ferry doctor SRC DST picks them)",
        )

    @app.post("/v1/host/diagnostics/reach")
    async def diagnostics_reach(probe: ReachProbe) -> dict[str, Any]:
        why = await allowed_by(probe)
        return {**await connect_once(probe.address, probe.port), "allowed_by": why,
                "from": host.settings.name}  # fmt: skip

    @app.post("/v1/host/diagnostics/peer")
    async def diagnostics_peer(probe: PeerProbe) -> dict[str, Any]:
        hostname = urlsplit(probe.url).hostname or ""
        out: dict[str, Any] = {
            "from": host.settings.name, "url": probe.url, "hostname": hostname,
            "is_address": False, "addresses": [], "resolve_error": None,
            "answered": False, "name": None, "version": None, "error": None,
        }  # fmt: skip
        try:
            ipaddress.ip_address(hostname)
            out["is_address"] = True
            out["addresses"] = [hostname]
        except ValueError:
            try:
                out["addresses"] = await _resolve(hostname)
            except (OSError, TimeoutError) as exc:
                out["resolve_error"] = f"{exc.__class__.__name__}: {exc}"
                return out
        try:
            health = await peers.get(probe.url, "/v1/health")
        except FerryError as exc:
            out["error"] = exc.message
            return out
        out.update(answered=True, name=health.get("host"), version=health.get("version"))
        return out
