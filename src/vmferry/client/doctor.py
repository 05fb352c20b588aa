"""``ferry doctor SRC DST``: the live-migration troubleshooting list, run for you.

Every check is one :class:`Check`: ``pass`` / ``warn`` / ``fail``, its name, its scope (a host,
``SRC->DST``, a VM), what it saw and, when it is not a pass, the fix (a ``ferry`` command where
one exists). The checks read what the two agents report (:class:`DoctorApi`) and ask the source
agent to try the paths a move takes (``/v1/host/diagnostics/...``, ``api/diagnostics.py``):

* agent — each agent answers and is the host the client configuration names;
* migration enabled, max concurrent, encryption, authentication — settings on both hosts and
  whether they agree;
* migration networks, listener addresses — each host has addresses on its migration networks;
  the destination's listeners in the order a move tries them;
* network reach — the source agent opens TCP connections to each destination listener at both
  ends of its port range (and back);
* names resolve, agent to agent — the source resolves the destination's name and calls its
  agent with its own certificate (and back);
* certificates — the agents' certificates and yours: not expired, not revoked by the other
  host's list, not expiring within :data:`EXPIRY_WARN_DAYS`;
* versions — the destination runs the source's version or newer;
* switches — every switch a VM uses exists on the other host (which VM needs which switch);
* cpu — ``cluster validate``'s CPU test over both hosts, then ``move --what-if``'s CPU checks
  for every running VM of the source;
* delegation allowed — the source's ``migration.authentication`` and the delegation targets in
  its certificate.

The logic is pure over :class:`DoctorApi`; :class:`ClientDoctorApi` is the real one.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from cryptography import x509
from pydantic import BaseModel

from vmferry.client._client import FerryClient
from vmferry.client._config import ClientConfig, HostEndpoint
from vmferry.errors import FerryError, NotFoundError, RefusedError, UnreachableError
from vmferry.security.tickets import delegation_targets, may_delegate

Status = Literal["pass", "warn", "fail"]

#: A certificate expiring within this many days is a warning.
EXPIRY_WARN_DAYS = 14
#: At most this many running VMs get a ``move --what-if`` for their CPU.
MAX_WHAT_IF_VMS = 16
#: Longest the client waits for one TLS handshake when it reads an agent's certificate.
HANDSHAKE_TIMEOUT_S = 5.0


class Check(BaseModel):
    """One line of the doctor's report."""

    status: Status
    check: str
    scope: str
    saw: str
    fix: str | None = None


@dataclass(frozen=True)
class CertInfo:
    """A certificate as the doctor reads it."""

    subject: str
    serial: int
    not_after: float
    uris: tuple[str, ...] = ()
    #: Why TLS verification failed (the certificate was still read), or None.
    verify_error: str | None = None


class DoctorApi(Protocol):
    """What the doctor asks (every method may raise :class:`FerryError`)."""

    def url(self, host: str) -> str: ...
    def health(self, host: str) -> dict[str, Any]: ...
    def settings(self, host: str) -> dict[str, Any]: ...
    def facts(self, host: str) -> dict[str, Any]: ...
    def vms(self, host: str) -> list[dict[str, Any]]: ...
    def crl(self, host: str) -> dict[str, Any] | None: ...
    def certificate(self, host: str) -> CertInfo: ...
    def own_certificate(self) -> CertInfo | None: ...
    def reach(self, host: str, address: str, port: int, peer: str) -> dict[str, Any]: ...
    def peer(self, host: str, url: str) -> dict[str, Any]: ...
    def what_if(self, host: str, vm: str, dest: str, dest_url: str) -> dict[str, Any]: ...


@dataclass
class HostView:
    """What one agent reported; ``errors`` holds what could not be read."""

    name: str
    url: str
    health: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    vms: list[dict[str, Any]] = field(default_factory=list)
    crl: dict[str, Any] | None = None
    cert: CertInfo | None = None
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def mig(self) -> dict[str, Any]:
        """The host's migration settings."""
        m: dict[str, Any] = self.settings.get("migration", {})
        return m

    @property
    def listeners(self) -> list[str]:
        """The host's addresses on its migration networks, in the order a move tries them."""
        return [str(a) for a in self.facts.get("migration_addresses", [])]


def _ask(view: HostView, what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except FerryError as exc:
        view.errors[what] = exc.message
        return None


def gather(api: DoctorApi, host: str) -> HostView:
    """Read everything the checks need from ``host``'s agent."""
    view = HostView(name=host, url=api.url(host))
    view.health = _ask(view, "health", lambda: api.health(host)) or {}
    if "health" in view.errors:
        return view
    view.settings = _ask(view, "settings", lambda: api.settings(host)) or {}
    view.facts = _ask(view, "facts", lambda: api.facts(host)) or {}
    view.vms = _ask(view, "vms", lambda: api.vms(host)) or []
    view.crl = _ask(view, "crl", lambda: api.crl(host))
    view.cert = _ask(view, "certificate", lambda: api.certificate(host))
    return view


def _c(status: Status, check: str, scope: str, saw: str, fix: str | None = None) -> Check:
    return Check(status=status, check=check, scope=scope, saw=saw, fix=fix)


def _url_host(url: str) -> str:
    return urlsplit(url).hostname or url


# -- the checks (pure) -------------------------------------------------------------------------
def check_agents(src: HostView, dst: HostView) -> list[Check]:
    """Each agent answers and is the host it is named as."""
    out = []
    for v in (src, dst):
        if "health" in v.errors:
            out.append(
                _c(
                    "fail",
                    "agent",
                    v.name,
                    f"the agent at {v.url} did not answer: {v.errors['health']}",
                    f"start ferryd on {v.name}, or correct its URL in the client configuration",
                )
            )
        elif v.health.get("host") != v.name:
            out.append(
                _c(
                    "fail",
                    "agent",
                    v.name,
                    f"the agent at {v.url} is host {v.health.get('host')!r}",
                    f"point {v.name} at its own agent in the client configuration (FERRY_CONFIG)",
                )
            )
        else:
            missing = ", ".join(sorted(v.errors))
            out.append(
                _c(
                    "fail" if missing else "pass",
                    "agent",
                    v.name,
                    f"{v.url} answers as {v.name}"
                    + (
                        f"; could not read {missing}: " + "; ".join(v.errors.values())
                        if missing
                        else ""
                    ),
                    "use an operator or admin certificate" if missing else None,
                )
            )
    return out


def check_enabled(src: HostView, dst: HostView) -> list[Check]:
    """Live migration is enabled on both hosts."""
    out = []
    for v in (src, dst):
        on = bool(v.mig.get("enabled"))
        out.append(
            _c(
                "pass" if on else "fail",
                "migration enabled",
                v.name,
                "live migration is enabled" if on else "live migration is disabled",
                None if on else f"ferry --host {v.name} host set --migration-enabled",
            )
        )
    return out


def check_settings(src: HostView, dst: HostView) -> list[Check]:
    """Max concurrent moves, encryption and authentication agree on both hosts."""
    pair = f"{src.name},{dst.name}"
    out = []
    a, b = int(src.mig.get("max_concurrent", 0)), int(dst.mig.get("max_concurrent", 0))
    if a == b:
        out.append(_c("pass", "max concurrent", pair, f"{a} live moves at once on both"))
    else:
        low, high = (src.name, b) if a < b else (dst.name, a)
        out.append(
            _c(
                "warn",
                "max concurrent",
                pair,
                f"{src.name} allows {a} moves at once, {dst.name} {b}: moves between "
                f"them run at most {min(a, b)} at once",
                f"ferry --host {low} host set --max-concurrent {high}",
            )
        )
    ta, tb = list(src.mig.get("trusted_networks", [])), list(dst.mig.get("trusted_networks", []))
    if set(ta) == set(tb):
        out.append(
            _c(
                "pass",
                "encryption",
                pair,
                "moves are encrypted (TLS, host certificates); trusted for "
                f"--no-encryption: {', '.join(ta) or 'none'} on both",
            )
        )
    else:
        only = sorted(set(ta) ^ set(tb))
        lacking = dst.name if only[0] in ta else src.name
        out.append(
            _c(
                "warn",
                "encryption",
                pair,
                f"trusted networks differ ({src.name}: {', '.join(ta) or 'none'}; "
                f"{dst.name}: {', '.join(tb) or 'none'}): --no-encryption works only "
                "over a network both trust",
                f"ferry --host {lacking} host migration-network add {only[0]} --trusted",
            )
        )
    ma, mb = src.mig.get("authentication"), dst.mig.get("authentication")
    if ma is not None or mb is not None:  # hosts without the setting skip this check
        if ma == mb:
            out.append(
                _c("pass", "authentication", pair, f"migration.authentication = {ma} on both")
            )
        else:
            local = src.name if ma == "local" else dst.name
            out.append(
                _c(
                    "fail",
                    "authentication",
                    pair,
                    f"migration.authentication differs ({src.name}: {ma}, {dst.name}: "
                    f"{mb}): a move one side starts the other side refuses",
                    f"ferry --host {local} host set --migration-authentication delegated",
                )
            )
    return out


def _network_of(address: str, networks: list[str]) -> str | None:
    ip = ipaddress.ip_address(address)
    for net in networks:
        if net == "any" or ip in ipaddress.ip_network(net):
            return net
    return None


def _suggest_cidr(v: HostView, other: HostView) -> str:
    nets = [n for n in other.mig.get("networks", []) if n != "any"]
    return nets[0] if nets else "CIDR"


def check_networks(src: HostView, dst: HostView) -> list[Check]:
    """Each host has addresses on its migration networks; ``any`` is a warning."""
    out = []
    for v, other in ((src, dst), (dst, src)):
        nets = list(v.mig.get("networks", []))
        if not v.listeners:
            out.append(
                _c(
                    "fail",
                    "migration networks",
                    v.name,
                    f"no address of {v.name} lies in its migration networks "
                    f"({', '.join(nets) or 'none'})",
                    f"ferry --host {v.name} host migration-network add "
                    f"{_suggest_cidr(v, other)} --position 1",
                )
            )
        elif "any" in nets:
            out.append(
                _c(
                    "warn",
                    "migration networks",
                    v.name,
                    f"{', '.join(nets)}: 'any' lets moves use every address, the "
                    "management network too",
                    f"ferry --host {v.name} host migration-network add "
                    f"{_suggest_cidr(v, other)} --position 1  (a dedicated network)",
                )
            )
        else:
            out.append(_c("pass", "migration networks", v.name, ", ".join(nets)))
    return out


def check_listeners(src: HostView, dst: HostView) -> list[Check]:
    """The destination's listener addresses in order; on the source's networks; one per net."""
    out = []
    for s, d in ((src, dst), (dst, src)):
        scope = f"{s.name}->{d.name}"
        nets = list(d.mig.get("networks", []))
        if not d.listeners:
            out.append(
                _c(
                    "fail",
                    "listener addresses",
                    scope,
                    f"{d.name} would listen on no address (migration networks "
                    f"{', '.join(nets) or 'none'})",
                    f"ferry --host {d.name} host migration-network add "
                    f"{_suggest_cidr(d, s)} --position 1",
                )
            )
            continue
        ports = f"TCP {d.mig.get('port_min')}-{d.mig.get('port_max')}"
        order = "; ".join(
            f"{i}. {a} ({_network_of(a, nets)})" for i, a in enumerate(d.listeners, 1)
        )
        snets = list(s.mig.get("networks", []))
        off = [a for a in d.listeners if "any" not in snets and _network_of(a, snets) is None]
        by_net: dict[str | None, list[str]] = {}
        for a in d.listeners:
            by_net.setdefault(_network_of(a, nets), []).append(a)
        doubled = [f"{n}: {', '.join(a)}" for n, a in by_net.items() if len(a) > 1]
        if off:
            out.append(
                _c(
                    "warn",
                    "listener addresses",
                    scope,
                    f"{d.name} listens on {order}, {ports}; {', '.join(off)} lie on none "
                    f"of {s.name}'s migration networks ({', '.join(snets)})",
                    f"ferry --host {s.name} host migration-network add {_network_of(off[0], nets)}",
                )
            )
        elif doubled:
            out.append(
                _c(
                    "warn",
                    "listener addresses",
                    scope,
                    f"{d.name} listens on {order}, {ports}; several addresses on one "
                    f"network ({'; '.join(doubled)}) may take the same wire",
                    f"give {d.name} one address per migration network, or list single "
                    f"addresses: ferry --host {d.name} host migration-network add "
                    "ADDRESS/32 --position 1",
                )
            )
        else:
            out.append(
                _c("pass", "listener addresses", scope, f"{d.name} listens on {order}, {ports}")
            )
    return out


def check_reach(api: DoctorApi, src: HostView, dst: HostView) -> list[Check]:
    """The source agent connects to every destination listener at both ends of its ports."""
    out = []
    for s, d in ((src, dst), (dst, src)):
        if not d.listeners:
            out.append(
                _c(
                    "fail",
                    "network reach",
                    f"{s.name}->{d.name}",
                    f"{d.name} has no migration listener to connect to",
                    f"ferry --host {d.name} host migration-network add "
                    f"{_suggest_cidr(d, s)} --position 1",
                )
            )
            continue
        lo, hi = int(d.mig.get("port_min", 0)), int(d.mig.get("port_max", 0))
        ports = [lo] if lo == hi else [lo, hi]
        results: dict[str, list[dict[str, Any]]] = {}
        for addr in d.listeners:
            for port in ports:
                try:
                    r = api.reach(s.name, addr, port, d.url)
                except FerryError as exc:
                    r = {
                        "address": addr,
                        "port": port,
                        "ok": False,
                        "result": "not asked",
                        "error": exc.message,
                        "ms": 0,
                    }
                results.setdefault(addr, []).append(r)
        good = [a for a, rs in results.items() if all(r.get("ok") for r in rs)]
        nets = list(d.mig.get("networks", []))
        for addr, rs in results.items():
            scope = f"{s.name}->{d.name} {addr}"
            seen = addr + ", ".join(
                f":{r['port']} {r['result']} ({r.get('ms', 0):.0f} ms)" for r in rs
            )
            if all(r.get("ok") for r in rs):
                why = (
                    " (nothing listens until a move; the path is open)"
                    if any(r["result"] == "refused" for r in rs)
                    else ""
                )
                out.append(
                    _c("pass", "network reach", scope, f"{s.name} opened TCP to {seen}{why}")
                )
                continue
            bad = next(r for r in rs if not r.get("ok"))
            err = f": {bad['error']}" if bad.get("error") else ""
            net = _network_of(addr, nets) or addr
            if good:
                fix = (
                    f"ferry --host {d.name} host migration-network remove {net}  "
                    f"(moves use {good[0]} meanwhile; or repair the link)"
                )
            elif bad.get("result") == "no-route":  # the source's own side is down
                fix = (
                    f"bring up {s.name}'s interface on {net} (or add a route to {addr} on "
                    f"{s.name}), then: ferry doctor {s.name} {d.name}"
                )
            else:
                fix = (
                    f"bring up {d.name}'s interface with {addr} and open TCP "
                    f"{lo}-{hi} from {s.name} (routes, firewalls), then: "
                    f"ferry doctor {s.name} {d.name}"
                )
            out.append(
                _c(
                    "fail",
                    "network reach",
                    scope,
                    f"{s.name} cannot connect to {seen}{err}",
                    fix,
                )
            )
    return out


def check_peers(api: DoctorApi, src: HostView, dst: HostView) -> list[Check]:
    """The source resolves the destination's name and reaches its agent over mutual TLS."""
    out = []
    for s, d in ((src, dst), (dst, src)):
        scope = f"{s.name}->{d.name}"
        try:
            p = api.peer(s.name, d.url)
        except FerryError as exc:
            out.append(
                _c(
                    "fail",
                    "names resolve",
                    scope,
                    f"{s.name} could not be asked: {exc.message}",
                    exc.fix,
                )
            )
            continue
        name = p.get("hostname") or _url_host(d.url)
        if p.get("resolve_error"):
            out.append(
                _c(
                    "fail",
                    "names resolve",
                    scope,
                    f"{s.name} cannot resolve {name}: {p['resolve_error']}",
                    f"add {name} to {s.name}'s DNS or /etc/hosts, or put {d.name}'s "
                    "address in the client configuration's URL",
                )
            )
            continue
        if p.get("is_address"):
            saw = f"{d.name} is addressed as {name} (an address: nothing to resolve)"
        else:
            saw = f"{s.name} resolves {name} to {', '.join(p.get('addresses', []))}"
        out.append(_c("pass", "names resolve", scope, saw))
        if not p.get("answered"):
            out.append(
                _c(
                    "fail",
                    "agent to agent",
                    scope,
                    f"{s.name}'s agent cannot call {d.name}'s at {d.url}: {p.get('error')}",
                    f"check the management network and both certificates "
                    f"(ferry cert list); then: ferry doctor {s.name} {d.name}",
                )
            )
        elif p.get("name") != d.name:
            out.append(
                _c(
                    "fail",
                    "agent to agent",
                    scope,
                    f"{d.url} answers {s.name} as host {p.get('name')!r}, not {d.name}",
                    f"point {d.name} at its own agent in the client configuration",
                )
            )
        else:
            out.append(
                _c(
                    "pass",
                    "agent to agent",
                    scope,
                    f"{s.name}'s agent calls {d.name}'s over mutual TLS "
                    f"(vmferry {p.get('version')})",
                )
            )
    return out


def _revoked_by(cert: CertInfo, views: list[HostView]) -> list[str]:
    out = []
    for v in views:
        serials = {int(s, 16) for s in ((v.crl or {}).get("revoked") or [])}
        if cert.serial in serials:
            out.append(v.name)
    return out


def _cert_line(scope: str, cert: CertInfo, now: float, revokers: list[str], reissue: str) -> Check:
    days = (cert.not_after - now) / 86400
    until = time.strftime("%Y-%m-%d", time.gmtime(cert.not_after))
    who = f"{cert.subject} (serial {cert.serial:x})"
    if days <= 0:
        return _c("fail", "certificates", scope, f"{who} expired on {until}", reissue)
    if revokers:
        return _c(
            "fail",
            "certificates",
            scope,
            f"{who} is revoked (in the revocation list of {', '.join(revokers)})",
            reissue,
        )
    if cert.verify_error:
        return _c(
            "fail", "certificates", scope, f"{who} does not verify: {cert.verify_error}", reissue
        )
    if days < EXPIRY_WARN_DAYS:
        return _c(
            "warn", "certificates", scope, f"{who} expires on {until}, in {days:.1f} days", reissue
        )
    return _c("pass", "certificates", scope, f"{who} valid until {until} ({days:.0f} days)")


def check_certificates(
    src: HostView, dst: HostView, own: CertInfo | None, now: float | None = None
) -> list[Check]:
    """Each agent's certificate (revoked per the other host's list) and yours."""
    t = time.time() if now is None else now
    out = []
    for v, other in ((src, dst), (dst, src)):
        if v.cert is None:
            out.append(
                _c(
                    "fail",
                    "certificates",
                    v.name,
                    f"could not read {v.name}'s certificate: "
                    f"{v.errors.get('certificate', 'not asked')}",
                    "check the client configuration's CA",
                )
            )
            continue
        reissue = (
            f"ferry cert issue host {v.name} --ip {_url_host(v.url)}"
            f"{_delegate_opts(v.cert)}, then restart ferryd on {v.name} with it"
        )
        out.append(_cert_line(v.name, v.cert, t, _revoked_by(v.cert, [other]), reissue))
    if own is not None:
        out.append(
            _cert_line(
                "you",
                own,
                t,
                _revoked_by(own, [src, dst]),
                f"ferry cert issue user {own.subject} --role operator",
            )
        )
    return out


def _delegate_opts(cert: CertInfo) -> str:
    from vmferry.security.tickets import delegation_targets

    hosts = sorted({h for _, h in delegation_targets(cert.uris)})
    return "".join(f" --delegate {h}" for h in hosts)


def check_versions(src: HostView, dst: HostView) -> list[Check]:
    """The destination runs the source's vmferry version or a newer one."""
    from vmferry.migration.incoming import version_tuple

    a, b = str(src.health.get("version")), str(dst.health.get("version"))
    pair = f"{src.name}->{dst.name}"
    if version_tuple(a) == version_tuple(b):
        return [_c("pass", "versions", pair, f"vmferry {a} on both")]
    if version_tuple(b) > version_tuple(a):
        return [
            _c(
                "warn",
                "versions",
                pair,
                f"{src.name} runs {a}, {dst.name} {b}: moves back from {dst.name} are refused",
                f"upgrade vmferry on {src.name} to {b}",
            )
        ]
    return [
        _c(
            "fail",
            "versions",
            pair,
            f"{dst.name} runs {b}, older than {src.name}'s {a}: moves to it are refused",
            f"upgrade vmferry on {dst.name} to {a}",
        )
    ]


def check_switches(src: HostView, dst: HostView) -> list[Check]:
    """Every switch a VM of one host uses exists (by name) on the other."""
    out = []
    for s, d in ((src, dst), (dst, src)):
        scope = f"{s.name}->{d.name}"
        theirs: dict[str, Any] = d.settings.get("switches", {})
        present: dict[str, bool] = d.facts.get("switches", {})
        mine: dict[str, Any] = s.settings.get("switches", {})
        bad = 0
        used: set[str] = set()
        for vm in s.vms:
            for i, nic in enumerate(vm.get("nics", [])):
                sw = str(nic.get("switch"))
                used.add(sw)
                if sw not in theirs:
                    bad += 1
                    bridge = (mine.get(sw) or {}).get("bridge") or "BRIDGE"
                    out.append(
                        _c(
                            "fail",
                            "switches",
                            f"{scope} {vm['name']}",
                            f"VM {vm['name']} (nic {i}) needs switch {sw!r}, which "
                            f"{d.name} lacks (it has: {', '.join(sorted(theirs)) or 'none'})",
                            f"ferry --host {d.name} host set --switch {sw}={bridge}  "
                            f"(or move with --switch-map {sw}=NAME)",
                        )
                    )
        absent = sorted(sw for sw in used if sw in theirs and present.get(sw) is False)
        if absent:
            bad += 1
            out.append(
                _c(
                    "warn",
                    "switches",
                    scope,
                    f"{d.name} has switch {', '.join(absent)} but not its bridge",
                    f"restart ferryd on {d.name} (it creates the bridges)",
                )
            )
        if not bad:
            names = ", ".join(sorted(used)) or "none"
            out.append(
                _c(
                    "pass",
                    "switches",
                    scope,
                    f"every switch {s.name}'s {len(s.vms)} VM(s) use exists on {d.name} ({names})",
                )
            )
    return out


def check_cpu(api: DoctorApi, src: HostView, dst: HostView) -> list[Check]:
    """``cluster validate``'s CPU test over both hosts, then each running VM's what-if."""
    from vmferry.cluster.validate import NodeFacts, _cpus

    pair = f"{src.name},{dst.name}"
    out = []
    try:
        facts = {v.name: NodeFacts.model_validate(v.facts) for v in (src, dst)}
    except ValueError:
        return [
            _c(
                "fail",
                "cpu",
                pair,
                "the hosts' CPU facts could not be read",
                "use an operator or admin certificate",
            )
        ]
    for c in _cpus(facts):
        status: Status = "warn" if c.result == "warning" else c.result
        scope = pair if c.scope == "all" else c.scope
        out.append(_c(status, "cpu", scope, c.message, c.fix))
    running = [v for v in src.vms if v.get("state") in ("running", "paused")]
    checked = 0
    for vm in running[:MAX_WHAT_IF_VMS]:
        scope = f"{src.name}->{dst.name} {vm['name']}"
        try:
            plan = api.what_if(src.name, vm["name"], dst.name, dst.url)
        except FerryError as exc:
            out.append(
                _c(
                    "warn",
                    "cpu",
                    scope,
                    f"move --what-if of {vm['name']} was refused: {exc.message}",
                    exc.fix,
                )
            )
            continue
        cpu = [c for c in plan.get("checks", []) if str(c.get("name", "")).startswith("cpu")]
        for c in cpu:
            if not c.get("ok"):
                out.append(_c("fail", "cpu", scope, f"{vm['name']}: {c['message']}", c.get("fix")))
        if all(c.get("ok") for c in cpu):
            checked += 1
    if running:
        more = len(running) - MAX_WHAT_IF_VMS
        if checked:
            out.append(
                _c(
                    "pass",
                    "cpu",
                    f"{src.name}->{dst.name}",
                    f"{checked} running VM(s) pass move --what-if's CPU checks"
                    + (f" ({more} more not checked)" if more > 0 else ""),
                )
            )
    return out


def check_delegation(src: HostView, dst: HostView) -> list[Check]:
    """The source's ``migration.authentication`` and whether its certificate may delegate."""
    mode = src.mig.get("authentication")
    if mode is None:
        return []  # an agent without the setting
    scope = f"{src.name}->{dst.name}"
    if mode == "local":
        return [
            _c(
                "warn",
                "delegation allowed",
                scope,
                f"{src.name} has migration.authentication = local: moves start only on "
                f"{src.name} itself, not from this client",
                f"ferry --host {src.name} host set --migration-authentication delegated",
            )
        ]
    if src.cert is None:
        return [
            _c(
                "fail",
                "delegation allowed",
                scope,
                f"{src.name} has migration.authentication = {mode}; its certificate could "
                "not be read",
                "check the client configuration's CA",
            )
        ]
    targets = ", ".join(f"{h}:{s}" for s, h in delegation_targets(src.cert.uris)) or "none"
    if may_delegate(src.cert.uris, "live", dst.name):
        return [
            _c(
                "pass",
                "delegation allowed",
                scope,
                f"{src.name} has migration.authentication = {mode}; its certificate may "
                f"act for users towards {dst.name} (targets: {targets})",
            )
        ]
    return [
        _c(
            "fail",
            "delegation allowed",
            scope,
            f"{src.name} has migration.authentication = {mode} but its certificate does "
            f"not list {dst.name} as a live delegation target (targets: {targets})",
            f"ferry cert issue host {src.name} --ip {_url_host(src.url)} --delegate "
            f"{dst.name}, then restart ferryd on {src.name} with it",
        )
    ]


def run(api: DoctorApi, src: str, dst: str, now: float | None = None) -> list[Check]:
    """Every check for moves between ``src`` and ``dst``, in the order they are printed."""
    s, d = gather(api, src), gather(api, dst)
    checks = check_agents(s, d)
    if "health" in s.errors or "health" in d.errors:
        return checks  # nothing else can be asked
    own: CertInfo | None = None
    try:
        own = api.own_certificate()
    except FerryError:
        own = None
    checks += check_enabled(s, d) + check_settings(s, d) + check_delegation(s, d)
    checks += check_networks(s, d) + check_listeners(s, d) + check_reach(api, s, d)
    checks += check_peers(api, s, d) + check_certificates(s, d, own, now)
    checks += check_versions(s, d) + check_switches(s, d) + check_cpu(api, s, d)
    return checks


def exit_code(checks: list[Check]) -> int:
    """0 when every check passed, 1 otherwise."""
    return 0 if all(c.status == "pass" for c in checks) else 1


def render(checks: list[Check]) -> str:
    """One line per check: status, name, scope and what it saw, then the fix."""
    width = max((len(c.check) for c in checks), default=0)
    lines = []
    for c in checks:
        line = f"{c.status.upper():<4}  {c.check:<{width}}  {c.scope}: {c.saw}"
        if c.fix and c.status != "pass":
            line += f"  -> fix: {c.fix}"
        lines.append(line)
    return "\n".join(lines)


# -- the real API: the client's certificate, both agents -----------------------------------------
def cert_info(der: bytes, verify_error: str | None = None) -> CertInfo:
    """A :class:`CertInfo` from a DER (or PEM) certificate."""
    cert = (
        x509.load_pem_x509_certificate(der)
        if der.lstrip().startswith(b"-----")
        else x509.load_der_x509_certificate(der)
    )
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = ()
    return CertInfo(
        subject=str(cn[0].value) if cn else cert.subject.rfc4514_string(),
        serial=cert.serial_number,
        not_after=cert.not_valid_after_utc.timestamp(),
        uris=uris,
        verify_error=verify_error,
    )


def presented_certificate(ep: HostEndpoint, timeout: float = HANDSHAKE_TIMEOUT_S) -> CertInfo:
    """The certificate the agent at ``ep`` presents in a TLS handshake (read even if it fails
    verification, which is then reported)."""
    parts = urlsplit(ep.url)
    host, port = parts.hostname or "", parts.port or 443
    ctx = ssl.create_default_context(cafile=ep.ca)
    if ep.cert and ep.key:
        ctx.load_cert_chain(ep.cert, ep.key)
    verify_error: str | None = None
    try:
        der = _handshake(ctx, host, port, timeout)
    except ssl.SSLCertVerificationError as exc:
        verify_error = str(exc.verify_message or exc)
        loose = ssl.create_default_context(cafile=ep.ca)
        loose.check_hostname = False
        loose.verify_mode = ssl.CERT_NONE  # only to read the failing certificate's dates
        der = _handshake(loose, host, port, timeout)
    except OSError as exc:
        raise UnreachableError(f"no TLS handshake with {ep.url}: {exc}") from exc
    return cert_info(der, verify_error)


def _handshake(ctx: ssl.SSLContext, host: str, port: int, timeout: float) -> bytes:
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("the agent presented no certificate")
    return der


class ClientDoctorApi:
    """:class:`DoctorApi` over the client configuration's hosts (one client per host)."""

    def __init__(self, cfg: ClientConfig, timeout: float = 30.0) -> None:
        self.cfg = cfg
        self._clients: dict[str, FerryClient] = {}
        self._timeout = timeout

    def _ep(self, host: str) -> HostEndpoint:
        ep = self.cfg.hosts.get(host)
        if ep is None:
            raise NotFoundError(
                f"unknown host {host!r}",
                field="host",
                fix="known hosts: " + (", ".join(sorted(self.cfg.hosts)) or "none"),
            )
        return ep

    def _c(self, host: str) -> FerryClient:
        if host not in self._clients:
            self._clients[host] = FerryClient(self._ep(host), timeout=self._timeout)
        return self._clients[host]

    def close(self) -> None:
        """Close every client."""
        for c in self._clients.values():
            c.close()
        self._clients.clear()

    def url(self, host: str) -> str:
        return self._ep(host).url.rstrip("/")

    def health(self, host: str) -> dict[str, Any]:
        return self._c(host).health()

    def settings(self, host: str) -> dict[str, Any]:
        return self._c(host).settings()

    def facts(self, host: str) -> dict[str, Any]:
        result: dict[str, Any] = self._c(host).request("GET", "/v1/cluster/facts")
        return result

    def vms(self, host: str) -> list[dict[str, Any]]:
        return self._c(host).vms()

    def crl(self, host: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self._c(host).request("GET", "/v1/security/crl")["crl"]
        return result

    def certificate(self, host: str) -> CertInfo:
        return presented_certificate(self._ep(host))

    def own_certificate(self) -> CertInfo | None:
        paths = {ep.cert for ep in self.cfg.hosts.values() if ep.cert}
        if len(paths) != 1:
            return None  # none, or one per host: nothing single to report
        path = next(iter(paths))
        try:
            return cert_info(Path(path).read_bytes())
        except (OSError, ValueError) as exc:
            raise RefusedError(f"cannot read your certificate {path}: {exc}", field="cert") from exc

    def reach(self, host: str, address: str, port: int, peer: str) -> dict[str, Any]:
        body = {"address": address, "port": port, "peer": peer}
        result: dict[str, Any] = self._c(host).request(
            "POST", "/v1/host/diagnostics/reach", json=body
        )
        return result

    def peer(self, host: str, url: str) -> dict[str, Any]:
        result: dict[str, Any] = self._c(host).request(
            "POST", "/v1/host/diagnostics/peer", json={"url": url}
        )
        return result

    def what_if(self, host: str, vm: str, dest: str, dest_url: str) -> dict[str, Any]:
        return self._c(host).move(
            vm, {"destination": {"name": dest, "url": dest_url}, "what_if": True}
        )
