"""Who is using the Admin Center: certificate or token log-in, sessions, roles, revocation.

A browser either presents a user certificate signed by the vmferry CA (the TLS layer checks
the chain; :func:`user_from_scope` checks the role and the revocation list), or logs in with a
short-lived token that ``ferry admin token`` obtained with the user's certificate
(``POST /login/token`` over mutual TLS). A token is single use; logging in with it opens a
server-side session named by an HttpOnly, Secure, SameSite=Strict cookie.

Whether a user may do something is decided with the agents' own rule table
(:mod:`vmferry.security.roles`): every Admin Center action names the agent route it calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmferry.errors import AuthError, FerryError, ForbiddenError
from vmferry.security.pki import Revocations, serial_hex, verify_crl
from vmferry.security.roles import (
    Role,
    RoleError,
    allowed,
    peer_cert_fields,
    role_from_uris,
    roles_text,
    rule_for,
)

#: Roles a person may log in with (``host`` belongs to agents).
USER_ROLES = frozenset({Role.viewer, Role.operator, Role.admin})
TOKEN_TTL_S = 300.0
SESSION_TTL_S = 8 * 3600.0
MAX_TOKENS = 1000
MAX_SESSIONS = 10_000
COOKIE = "ferry_session"


@dataclass(frozen=True)
class User:
    """A logged-in person: certificate CN, role, serial and how they logged in."""

    cn: str
    role: Role
    serial: int | None
    via: str  #: "certificate" or "token"

    def may(self, method: str, agent_route: str) -> bool:
        """Whether this user may cause ``method agent_route`` on an agent."""
        return allowed(self.role, method, agent_route)

    def require(self, method: str, agent_route: str) -> None:
        """Raise ForbiddenError unless :meth:`may`; the message names the role needed."""
        if not self.may(method, agent_route):
            need = roles_text(rule_for(method, agent_route).roles)
            raise ForbiddenError(
                f"role {self.role.value} ({self.cn}) may not do this: it needs {need}",
                fix=f"log in with a certificate of role {need}",
            )


def user_from_cert(cert: Mapping[str, Any], via: str) -> User:
    """The user a verified peer certificate (``getpeercert()`` dict) names."""
    cn, serial, uris = peer_cert_fields(cert)
    try:
        role = role_from_uris(uris)
    except RoleError as exc:
        raise ForbiddenError(
            f"the certificate CN={cn} {exc}",
            fix="ferry cert issue user NAME --role viewer|operator|admin",
        ) from None
    if role not in USER_ROLES:
        raise ForbiddenError(
            f"the certificate CN={cn} has role {role.value}, which belongs to agents",
            fix="log in with a user certificate (role viewer, operator or admin)",
        )
    return User(cn=cn or "?", role=role, serial=serial, via=via)


def peer_cert(scope: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The verified client certificate the server put in the ASGI scope, if any."""
    cert = scope.get("extensions", {}).get("tls", {}).get("peer_cert")
    return cert if cert else None


class RevocationCheck:
    """Revoked serials from the CA's CRL file and from the agents' CRLs, refreshed now and then.

    ``agent_serials`` returns the serials the agents report (``GET /v1/security/crl``; they
    verified the list's signature when it was pushed). The file, if given, is verified with the
    CA here and re-read when it changes.
    """

    def __init__(
        self,
        crl_file: Path | None,
        ca: Path | None,
        agent_serials: Callable[[], Iterable[int]] | None = None,
        refresh_s: float = 30.0,
    ) -> None:
        self.crl_file = crl_file
        self.ca = ca
        self.agent_serials = agent_serials
        self.refresh_s = refresh_s
        self._file_mtime: float | None = None
        self._file: Revocations | None = None
        self._agents: frozenset[int] = frozenset()
        self._agents_at = -1e9
        self._lock = threading.Lock()

    def _load_file(self) -> None:
        if self.crl_file is None or self.ca is None:
            return
        try:
            mtime = self.crl_file.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime != self._file_mtime:
            self._file = verify_crl(self.crl_file.read_bytes(), self.ca)
            self._file_mtime = mtime

    def revoked(self) -> frozenset[int]:
        """Every serial currently known to be revoked."""
        with self._lock:
            self._load_file()
            now = time.monotonic()
            if self.agent_serials is not None and now - self._agents_at > self.refresh_s:
                self._agents_at = now
                # on failure keep the last answer; the file still counts
                with contextlib.suppress(FerryError):
                    self._agents = frozenset(self.agent_serials())
            own = self._file.serials if self._file else frozenset()
            return own | self._agents

    def check(self, user: User) -> None:
        """Raise AuthError if the user's certificate is revoked."""
        if user.serial is not None and user.serial in self.revoked():
            raise AuthError(
                f"the certificate of {user.cn} (serial {serial_hex(user.serial)}) was revoked",
                fix="ask an admin for a new one: ferry cert issue user NAME --role ROLE",
            )


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class _Expiring:
    """A bounded map of secret digests to users with expiry times (thread-safe)."""

    def __init__(self, ttl_s: float, limit: int) -> None:
        self.ttl_s = ttl_s
        self.limit = limit
        self._items: dict[str, tuple[User, float]] = {}
        self._lock = threading.Lock()

    def _prune(self, now: float) -> None:
        for key in [k for k, (_, exp) in self._items.items() if exp <= now]:
            del self._items[key]

    def add(self, user: User) -> tuple[str, float]:
        """A new random secret for ``user`` and its expiry (Unix time)."""
        secret = secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            self._prune(now)
            if len(self._items) >= self.limit:  # drop the oldest
                oldest = min(self._items, key=lambda k: self._items[k][1])
                del self._items[oldest]
            self._items[_digest(secret)] = (user, now + self.ttl_s)
        return secret, now + self.ttl_s

    def get(self, secret: str, consume: bool = False) -> User | None:
        """The user of a valid secret (removed if ``consume``), else None."""
        key = _digest(secret)
        with self._lock:
            item = self._items.pop(key, None) if consume else self._items.get(key)
        if item is None or item[1] <= time.time():
            return None
        return item[0]

    def drop(self, secret: str) -> None:
        """Forget a secret."""
        with self._lock:
            self._items.pop(_digest(secret), None)


class Logins:
    """Tokens (single use, minutes) and sessions (hours) of the Admin Center."""

    def __init__(self, token_ttl_s: float = TOKEN_TTL_S, session_ttl_s: float = SESSION_TTL_S):
        self.tokens = _Expiring(token_ttl_s, MAX_TOKENS)
        self.sessions = _Expiring(session_ttl_s, MAX_SESSIONS)

    def issue_token(self, user: User) -> tuple[str, float]:
        """A token bound to ``user`` (who proved it with a certificate) and its expiry."""
        return self.tokens.add(user)

    def redeem(self, token: str) -> tuple[User, str, float]:
        """Trade a token for a session: the user, the session id and its expiry."""
        user = self.tokens.get(token.strip(), consume=True)
        if user is None:
            raise AuthError(
                "this token is unknown, used or expired",
                field="token",
                fix="get a new one: ferry admin token --url URL (with your certificate)",
            )
        session_user = User(cn=user.cn, role=user.role, serial=user.serial, via="token")
        sid, expires = self.sessions.add(session_user)
        return session_user, sid, expires

    def session(self, sid: str | None) -> User | None:
        """The user of a session cookie, or None."""
        return self.sessions.get(sid) if sid else None

    def logout(self, sid: str | None) -> None:
        """End a session."""
        if sid:
            self.sessions.drop(sid)
