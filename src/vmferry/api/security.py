"""Who may call what: identity, revocation, roles, throttling and the audit log of ferryd.

:func:`install_security` adds one HTTP middleware and the ``/v1/security/...`` and
``/v1/audit`` routes. For every request the middleware

1. answers 429 while the source address is throttled (:class:`FailureThrottle`);
2. takes the verified client certificate ``api/server.py`` put in the ASGI scope and refuses
   a missing (401), revoked (401) or role-less (403) one;
3. finds the route the request will reach and refuses it (403) when the certificate's role is
   not in the rule table's roles for it (:mod:`vmferry.security.roles`);
4. records every mutating call and every refusal in the audit log (fsynced before the answer).

Handlers read the caller from ``request.state.principal`` (:class:`Principal`: CN, role,
address, serial); ``request.state.identity`` keeps the CN for older code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.routing import Match

from vmferry.api.peer import CRL_FILE, AgentTLS
from vmferry.errors import (
    AuthError,
    ConflictError,
    FerryError,
    ForbiddenError,
    RefusedError,
    ThrottledError,
)
from vmferry.security.audit import AuditLog, AuditRecord, outcome_of
from vmferry.security.pki import Revocations, serial_hex, verify_crl
from vmferry.security.roles import (
    READ_METHODS,
    ROLE_URI_PREFIX,
    Principal,
    Role,
    RoleError,
    peer_cert_fields,
    role_from_uris,
    roles_text,
    rule_for,
)
from vmferry.security.throttle import FailureThrottle

log = logging.getLogger("vmferry.api.security")

ISSUE_FIX = (
    "ask an admin for a certificate: ferry cert issue user NAME --role viewer|operator|admin"
)


class CRLUpload(BaseModel):
    """``PUT /v1/security/crl``: a PEM revocation list signed by the agents' CA."""

    crl: str = Field(max_length=4 * 1024 * 1024)


class CRLStore:
    """The newest verified CRL of this agent, kept in ``<state>/security/crl.pem``.

    The agent's client side (:meth:`AgentTLS.context`) reads the same file, so a replaced CRL
    also applies to the server certificates of the agents this one calls.
    """

    def __init__(self, state_dir: Path, ca: Path | None) -> None:
        self.path = state_dir / CRL_FILE
        self.ca = ca
        self.current: Revocations | None = None
        if ca is not None and self.path.exists():
            try:
                self.current = verify_crl(self.path.read_bytes(), ca)
            except FerryError as exc:  # written by us after verifying: someone edited it
                log.error("ignoring %s: %s", self.path, exc.message)

    def is_revoked(self, serial: int | None) -> bool:
        """Whether the current CRL lists ``serial``."""
        return self.current is not None and self.current.is_revoked(serial)

    def replace(self, pem: str) -> Revocations:
        """Verify ``pem`` with the CA and make it current (an older CRL number is refused)."""
        if self.ca is None:
            raise RefusedError("this agent runs without a CA; it cannot verify a CRL", field="crl")
        new = verify_crl(pem, self.ca)
        if self.current is not None and new.number < self.current.number:
            raise ConflictError(
                f"this revocation list is number {new.number}; the agent already has "
                f"number {self.current.number}",
                field="crl",
                fix="push the CA's current crl.pem (ferry cert push-crl)",
            )
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(new.pem)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self.current = new
        return new


def _json_error(exc: FerryError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.status, headers=headers)


def _route_path(app: FastAPI, scope: MutableMapping[str, Any]) -> str | None:
    """The template of the route FastAPI will call for ``scope`` (None: 404 or 405)."""
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            path = getattr(route, "path", None)
            return str(path) if path is not None else None
    return None


def principal_of(
    scope: Mapping[str, Any], address: str, crl: CRLStore, require_client_cert: bool
) -> Principal:
    """Who sent the request; raises AuthError (401) or ForbiddenError (403)."""
    tls = scope.get("extensions", {}).get("tls", {})
    cert = tls.get("peer_cert")
    if not cert:
        if require_client_cert:
            raise AuthError(
                "a client certificate signed by this cluster's CA is required",
                fix="pass --cert/--key (the lab writes them to its client config)",
            )
        return Principal(cn="local", role=None, address=address)
    cn, serial, uris = peer_cert_fields(cert)
    who = f"CN={cn}" + (f" serial {serial_hex(serial)}" if serial is not None else "")
    if crl.is_revoked(serial):
        raise AuthError(f"the certificate {who} was revoked", fix=ISSUE_FIX)
    try:
        role = role_from_uris(uris)
    except RoleError as exc:
        raise ForbiddenError(
            f"the certificate {who} {exc}",
            fix="issue one with a role: ferry cert issue user NAME --role viewer|operator|admin "
            "(agents: ferry cert issue host NAME --ip ADDRESS)",
        ) from None
    return Principal(cn=cn or "?", role=role, address=address, serial=serial, uris=tuple(uris))


def _claimed(scope: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """CN and role text a (refused) peer certificate claims, for the audit log."""
    cert = scope.get("extensions", {}).get("tls", {}).get("peer_cert")
    if not cert:
        return None, None
    cn, _, uris = peer_cert_fields(cert)
    roles = [u.removeprefix(ROLE_URI_PREFIX) for u in uris if u.startswith(ROLE_URI_PREFIX)]
    return cn, ",".join(roles) or None


class Security:
    """The agent's CRL, audit log and throttle (``app.state.security``)."""

    def __init__(self, state_dir: Path, ca: Path | None) -> None:
        self.crl = CRLStore(state_dir, ca)
        self.audit = AuditLog(state_dir / "audit")
        self.throttle = FailureThrottle()

    async def record(
        self, p: Principal | None, address: str, request: Request, status: int, msg: str | None
    ) -> None:
        """Append one audit record (off the event loop; a full disk is logged, not raised).

        A refused certificate (revoked, no role) is recorded under the CN and role it claims.
        """
        cn, role = (p.cn, p.role.value if p.role else None) if p else _claimed(request.scope)
        rec = AuditRecord(
            time=time.time(),
            cn=cn,
            role=role,
            address=address,
            method=request.method,
            path=request.url.path,
            status=status,
            outcome=outcome_of(status),
            message=msg,
        )
        try:
            await asyncio.to_thread(self.audit.append, rec)
        except OSError as exc:
            log.error("audit log write failed: %s (%s)", exc, rec)


def install_security(
    app: FastAPI, state_dir: Path, tls: AgentTLS | None, require_client_cert: bool
) -> Security:
    """Add the identity/role/audit middleware and the security routes to ``app``."""
    sec = Security(state_dir, tls.ca if tls else None)
    app.state.security = sec

    @app.middleware("http")
    async def authorize(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        address = request.client.host if request.client else "?"
        wait = sec.throttle.blocked_for(address)
        if wait > 0:
            return _json_error(
                ThrottledError(
                    f"too many refused requests from {address}; try again in {wait:.0f} s",
                    fix="fix the client's certificate or role first (ferry whoami)",
                ),
                headers={"Retry-After": str(int(wait) + 1)},
            )
        principal: Principal | None = None
        try:
            principal = principal_of(request.scope, address, sec.crl, require_client_cert)
            template = _route_path(app, request.scope)
            if template is not None and not principal.may(request.method, template):
                rule = rule_for(request.method, template)
                role = principal.role.value if principal.role else "?"
                raise ForbiddenError(
                    f"role {role} (CN={principal.cn}) may not {request.method} {template}: "
                    f"it needs {roles_text(rule.roles)}",
                    fix=f"use a certificate with role {roles_text(rule.roles)}"
                    + (
                        ""
                        if rule.roles == {Role.host}
                        else " (ferry cert issue user NAME --role ROLE)"
                    ),
                )
        except (AuthError, ForbiddenError) as exc:
            if sec.throttle.failure(address):
                log.warning("throttling %s after repeated refusals", address)
                exc.message += " (further requests from this address are throttled)"
            await sec.record(principal, address, request, exc.status, exc.message)
            return _json_error(exc)
        request.state.principal = principal
        request.state.identity = principal.cn
        try:
            response = await call_next(request)
        except Exception:
            if request.method not in READ_METHODS:
                await sec.record(principal, address, request, 500, "internal error")
            raise
        if request.method not in READ_METHODS:
            await sec.record(principal, address, request, response.status_code, None)
        return response

    @app.get("/v1/security/whoami")
    async def whoami(request: Request) -> dict[str, Any]:
        p: Principal = request.state.principal
        return {
            "cn": p.cn,
            "role": p.role.value if p.role else None,
            "address": p.address,
            "serial": serial_hex(p.serial) if p.serial is not None else None,
        }

    @app.get("/v1/security/crl")
    async def crl_show() -> dict[str, Any]:
        cur = sec.crl.current
        return {"crl": cur.summary() if cur else None}

    @app.put("/v1/security/crl")
    async def crl_put(body: CRLUpload) -> dict[str, Any]:
        return {"crl": sec.crl.replace(body.crl).summary()}

    @app.get("/v1/audit")
    async def audit(
        since: float | None = None, limit: int = 200, cn: str | None = None
    ) -> list[dict[str, Any]]:
        if not 1 <= limit <= 10_000:
            raise RefusedError("limit must be 1..10000", field="limit")
        return await asyncio.to_thread(sec.audit.query, since, limit, cn)

    return sec
