"""Roles and the rule table: which role may call which API route.

A certificate names exactly one role in a subject-alternative-name URI
``urn:vmferry:role:<role>`` (see docs/security.md for why a URI and not the subject's OU).
The agent's middleware (``api/security.py``) asks :func:`rule_for` which roles may call the
route a request matched, and refuses the others with 403.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

ROLE_URI_PREFIX = "urn:vmferry:role:"


class Role(StrEnum):
    """What a certificate's holder may do."""

    viewer = "viewer"  #: read everything except the audit log
    operator = "operator"  #: VM lifecycle, moves, storage moves, cluster moves of one VM
    admin = "admin"  #: everything an operator may, plus host settings, cluster, certificates
    host = "host"  #: another agent: the agent-to-agent calls, and reads


def role_uri(role: Role) -> str:
    """The SAN URI that carries ``role`` in a certificate."""
    return f"{ROLE_URI_PREFIX}{role.value}"


READ = frozenset(Role)
OPERATE = frozenset({Role.operator, Role.admin})
OPERATE_OR_PEER = frozenset({Role.operator, Role.admin, Role.host})
ADMIN = frozenset({Role.admin})
PEER = frozenset({Role.host})


@dataclass(frozen=True)
class Rule:
    """The roles that may call ``method path`` (``path`` is the route template)."""

    method: str
    path: str
    roles: frozenset[Role]


def _rules(*rows: tuple[str, str, frozenset[Role]]) -> dict[tuple[str, str], Rule]:
    return {(m, p): Rule(m, p, r) for m, p, r in rows}


#: Every route that is not a plain read. A GET route not listed here is open to every role;
#: any other method not listed is admin-only (fail closed). A unit test checks that every
#: mutating route of the app is listed.
RULES: dict[tuple[str, str], Rule] = _rules(
    # host
    ("PATCH", "/v1/host/settings", ADMIN),
    # ferry doctor: the source agent probes a migration listener / the peer agent
    ("POST", "/v1/host/diagnostics/reach", OPERATE),
    ("POST", "/v1/host/diagnostics/peer", OPERATE),
    # VM lifecycle (the failover controller of the cluster's leader starts VMs on other nodes)
    ("POST", "/v1/vms", OPERATE),
    ("DELETE", "/v1/vms/{name}", OPERATE),
    ("POST", "/v1/vms/{name}/actions", OPERATE_OR_PEER),
    ("POST", "/v1/vms/import", OPERATE_OR_PEER),
    # moves (source side)
    ("POST", "/v1/vms/{name}/move", OPERATE),
    ("POST", "/v1/vms/{name}/move-storage", OPERATE),
    ("POST", "/v1/migrations/{job_id}/complete", OPERATE),
    # (the cluster leader cancels the drain moves still queued when the node is resumed)
    ("POST", "/v1/migrations/{job_id}/cancel", OPERATE_OR_PEER),
    # moves (destination side): only the source agent calls these
    ("POST", "/v1/migrations/incoming", PEER),
    ("POST", "/v1/migrations/incoming/{job_id}/start", PEER),
    ("POST", "/v1/migrations/incoming/{job_id}/commit", PEER),
    ("POST", "/v1/migrations/incoming/{job_id}/recover", PEER),
    ("POST", "/v1/migrations/incoming/{job_id}/abort", PEER),
    ("POST", "/v1/migrations/incoming/quick/checks", PEER),
    ("POST", "/v1/migrations/incoming/quick/receive", PEER),
    # cluster: configuration is admin's
    ("POST", "/v1/cluster", ADMIN),
    ("DELETE", "/v1/cluster/{name}", ADMIN),
    ("POST", "/v1/cluster/{name}/nodes", ADMIN),
    ("DELETE", "/v1/cluster/{name}/nodes/{node}", ADMIN),
    ("POST", "/v1/cluster/volumes", ADMIN),
    ("DELETE", "/v1/cluster/volumes", ADMIN),
    ("POST", "/v1/cluster/validate", ADMIN),
    ("POST", "/v1/cluster/vms", ADMIN),
    ("PATCH", "/v1/cluster/vms/{name}", ADMIN),
    ("DELETE", "/v1/cluster/vms/{name}", ADMIN),
    ("POST", "/v1/cluster/{name}/nodes/{node}/drain", ADMIN),
    ("POST", "/v1/cluster/{name}/nodes/{node}/resume", ADMIN),
    # cluster: moving one VM is an operator's job
    ("POST", "/v1/cluster/vms/{name}/move", OPERATE),
    # cluster: agent-to-agent (validation probes, the leader asking an owner to move a VM)
    ("POST", "/v1/cluster/volume-check", PEER),
    ("POST", "/v1/cluster/reach", PEER),
    ("POST", "/v1/cluster/vms/{name}/planned-move", PEER),
    # security
    ("PUT", "/v1/security/crl", ADMIN),
    ("GET", "/v1/audit", ADMIN),
    # Prometheus metrics (api/metrics.py): every role, so a viewer certificate can scrape
    ("GET", "/metrics", READ),
)

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def rule_for(method: str, path: str) -> Rule:
    """The rule for a request that matched the route template ``path``."""
    method = "GET" if method in ("HEAD", "OPTIONS") else method
    rule = RULES.get((method, path))
    if rule is not None:
        return rule
    return Rule(method, path, READ if method == "GET" else ADMIN)


def allowed(role: Role, method: str, path: str) -> bool:
    """Whether ``role`` may call ``method path`` (a route template)."""
    return role in rule_for(method, path).roles


def roles_text(roles: Iterable[Role]) -> str:
    """``operator or admin`` (in the order of :class:`Role`)."""
    names = [r.value for r in Role if r in set(roles)]
    return " or ".join(names) if names else "nobody"


class RoleError(ValueError):
    """A certificate carries no role, an unknown one, or more than one."""


def role_from_uris(uris: Iterable[str]) -> Role:
    """The one role among a certificate's SAN URIs."""
    found = [u.removeprefix(ROLE_URI_PREFIX) for u in uris if u.startswith(ROLE_URI_PREFIX)]
    if not found:
        raise RoleError("carries no vmferry role")
    if len(found) > 1:
        raise RoleError(f"carries {len(found)} roles ({', '.join(found)}); exactly one is allowed")
    try:
        return Role(found[0])
    except ValueError:
        known = ", ".join(r.value for r in Role)
        raise RoleError(f"carries an unknown role {found[0]!r} (known: {known})") from None


@dataclass(frozen=True)
class Principal:
    """Who sent a request: certificate CN, role, serial, and the source address.

    ``role`` is None only when the agent runs without client certificates (in-process tests),
    in which case every route is allowed.
    """

    cn: str
    role: Role | None
    address: str
    serial: int | None = None
    #: The certificate's SAN URIs (role, and a host's delegation targets).
    uris: tuple[str, ...] = ()

    def may(self, method: str, path: str) -> bool:
        """Whether this principal may call ``method path`` (a route template)."""
        return self.role is None or allowed(self.role, method, path)


def peer_cert_fields(cert: Mapping[str, Any]) -> tuple[str | None, int | None, list[str]]:
    """CN, serial number and SAN URIs from :meth:`ssl.SSLSocket.getpeercert`'s dict."""
    cn: str | None = None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                cn = str(value)
    serial_text = cert.get("serialNumber")
    serial = int(str(serial_text), 16) if serial_text else None
    uris = [str(v) for k, v in cert.get("subjectAltName", ()) if k == "URI"]
    return cn, serial, uris
