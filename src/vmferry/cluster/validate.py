"""``ferry cluster validate``: is this set of hosts fit to be one cluster?

Per node and pairwise, each test is ``pass``, ``warning`` or ``fail`` with the fix:

* agent — the node's agent answers and is the host it is named as;
* version — every node runs the same vmferry version;
* cpu — same CPU vendor (fail), same feature flags (warning: VMs with the host CPU model cannot
  move between them; use a baseline model);
* switches — the same virtual switch names everywhere (fail), their bridges present (warning);
* volumes — every shared volume seen and writable by every node (the volume check);
* migration — each node has an address on its migration networks and reaches every other
  node's (a TCP connect that is accepted or refused proves the address answers);
* clock — node clocks within ``CLOCK_WARN_S`` (warning) / ``CLOCK_FAIL_S`` (fail) of this one;
* etcd — every node reaches an etcd majority (fail), all members (warning).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import secrets
import socket
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, Field, StringConstraints

from vmferry.cluster.volumes import MARKER, NodeApi, VolumeCheck
from vmferry.errors import FerryError
from vmferry.host.settings import HostSettings

CLOCK_WARN_S = 0.5
CLOCK_FAIL_S = 2.0
REACH_PORT = 9  # discard: nothing needs to listen, a refusal proves the address answers
REACH_TIMEOUT_S = 1.5

Result = Literal["pass", "warning", "fail"]


class NodeFacts(BaseModel):
    """``GET /v1/cluster/facts``: what one node reports about itself."""

    node: str
    version: str
    cpu_vendor: str
    cpu_flags: list[str]
    switches: dict[str, bool]  # name -> bridge present
    migration_addresses: list[str]
    storage_roots: list[str]
    time: float
    etcd: list[dict[str, Any]] = Field(default_factory=list)


class ReachRequest(BaseModel):
    """``POST /v1/cluster/reach``: addresses this node should try to reach."""

    addresses: list[Annotated[str, StringConstraints(min_length=1, max_length=45)]] = Field(
        max_length=64
    )


class Check(BaseModel):
    """One line of the report."""

    test: str
    scope: str
    result: Result
    message: str
    fix: str | None = None


class ValidateApi(NodeApi, Protocol):
    """What validation asks each node's agent."""

    async def facts(self, url: str) -> NodeFacts: ...

    async def reach(self, url: str, addresses: list[str]) -> dict[str, bool]: ...


def reach(addresses: list[str], timeout: float = REACH_TIMEOUT_S) -> dict[str, bool]:
    """Whether each address answers a TCP connect (accepted or refused) from here (blocking)."""
    out: dict[str, bool] = {}
    for addr in addresses:
        try:
            with socket.create_connection((addr, REACH_PORT), timeout=timeout):
                out[addr] = True
        except ConnectionRefusedError:
            out[addr] = True
        except OSError as exc:
            out[addr] = exc.errno == errno.ECONNREFUSED
    return out


def _worst(checks: list[Check]) -> Result:
    results = {c.result for c in checks}
    return "fail" if "fail" in results else "warning" if "warning" in results else "pass"


async def validate(api: ValidateApi, nodes: dict[str, str], volumes: list[str]) -> dict[str, Any]:
    """Run every test over ``nodes`` (name -> agent URL) and ``volumes``; the report."""
    checks: list[Check] = []
    t_ask = time.time()
    gathered = await asyncio.gather(
        *(api.facts(url) for url in nodes.values()), return_exceptions=True
    )
    rtt = time.time() - t_ask
    facts: dict[str, NodeFacts] = {}
    for (name, url), got in zip(nodes.items(), gathered, strict=True):
        if isinstance(got, BaseException):
            msg = got.message if isinstance(got, FerryError) else str(got)
            checks.append(
                Check(
                    test="agent",
                    scope=name,
                    result="fail",
                    message=f"the agent at {url} did not answer: {msg}",
                    fix=f"start ferryd on {name}",
                )
            )
        elif got.node != name:
            checks.append(
                Check(
                    test="agent",
                    scope=name,
                    result="fail",
                    message=f"the agent at {url} is host {got.node!r}",
                    fix="use each host's own name",
                )
            )
        else:
            facts[name] = got
            checks.append(Check(test="agent", scope=name, result="pass", message="answers"))
    if facts:
        checks += _versions(facts) + _cpus(facts) + _switches(facts)
        checks += _clocks(facts, rtt) + _etcd(facts)
        checks += await _migration(api, nodes, facts)
        for path in volumes:
            checks += await _volume(api, nodes, facts, path)
    return {
        "result": _worst(checks),
        "nodes": list(nodes),
        "volumes": volumes,
        "checks": [c.model_dump() for c in checks],
    }


def _same(facts: dict[str, NodeFacts], test: str, value: Any, what: str, fix: str) -> list[Check]:
    groups: dict[str, list[str]] = {}
    for name, f in facts.items():
        groups.setdefault(str(value(f)), []).append(name)
    if len(groups) == 1:
        return [
            Check(
                test=test,
                scope="all",
                result="pass",
                message=f"{what} {next(iter(groups))} on every node",
            )
        ]
    detail = "; ".join(f"{v}: {', '.join(n)}" for v, n in groups.items())
    return [
        Check(test=test, scope="all", result="fail", message=f"{what} differs ({detail})", fix=fix)
    ]


def _versions(facts: dict[str, NodeFacts]) -> list[Check]:
    return _same(
        facts,
        "version",
        lambda f: f.version,
        "vmferry",
        "install the same vmferry version on every node",
    )


def _cpus(facts: dict[str, NodeFacts]) -> list[Check]:
    checks = _same(
        facts,
        "cpu",
        lambda f: f.cpu_vendor,
        "CPU vendor",
        "a VM cannot move between CPU vendors: keep one vendor per cluster",
    )
    common = set.intersection(*(set(f.cpu_flags) for f in facts.values()))
    for name, f in facts.items():
        extra = sorted(set(f.cpu_flags) - common)
        if extra:
            checks.append(
                Check(
                    test="cpu",
                    scope=name,
                    result="warning",
                    message=f"{name} has CPU features others lack: {', '.join(extra[:8])}"
                    + (" …" if len(extra) > 8 else ""),
                    fix="give clustered VMs a baseline CPU model, not the host model",
                )
            )
    return checks


def _switches(facts: dict[str, NodeFacts]) -> list[Check]:
    every = set().union(*(set(f.switches) for f in facts.values()))
    checks = []
    for name, f in facts.items():
        missing = sorted(every - set(f.switches))
        absent = sorted(s for s, present in f.switches.items() if not present)
        if missing:
            checks.append(
                Check(
                    test="switches",
                    scope=name,
                    result="fail",
                    message=f"{name} has no switch named {', '.join(missing)}",
                    fix=f"ferry --host {name} host set --switch {missing[0]}=BRIDGE[:UPLINK]",
                )
            )
        elif absent:
            checks.append(
                Check(
                    test="switches",
                    scope=name,
                    result="warning",
                    message=f"{name}: the bridge of switch {', '.join(absent)} does not exist",
                    fix=f"restart ferryd on {name} (it creates the bridges) or fix the setting",
                )
            )
        else:
            checks.append(
                Check(
                    test="switches",
                    scope=name,
                    result="pass",
                    message=f"switches {', '.join(sorted(f.switches)) or 'none'}",
                )
            )
    return checks


def _clocks(facts: dict[str, NodeFacts], rtt: float) -> list[Check]:
    checks = []
    now = time.time()
    for name, f in facts.items():
        # the node read its clock somewhere within the round trip: allow for that much
        off = max(0.0, abs(f.time - (now - rtt / 2)) - rtt / 2)
        result: Result = "pass" if off <= CLOCK_WARN_S else "warning"
        if off > CLOCK_FAIL_S:
            result = "fail"
        checks.append(
            Check(
                test="clock",
                scope=name,
                result=result,
                message=f"{name}'s clock is within {off:.2f} s of this host's",
                fix=None if result == "pass" else f"run NTP (chrony) on {name}",
            )
        )
    return checks


def _etcd(facts: dict[str, NodeFacts]) -> list[Check]:
    checks = []
    for name, f in facts.items():
        ok = sum(1 for e in f.etcd if e.get("ok"))
        total = len(f.etcd)
        if total == 0:
            checks.append(
                Check(
                    test="etcd",
                    scope=name,
                    result="fail",
                    message=f"{name} has no etcd configured",
                    fix="set cluster.etcd in its settings",
                )
            )
        elif ok <= total // 2:
            checks.append(
                Check(
                    test="etcd",
                    scope=name,
                    result="fail",
                    message=f"{name} reaches {ok} of {total} etcd members (no majority)",
                    fix="check etcd and the node's management network",
                )
            )
        else:
            checks.append(
                Check(
                    test="etcd",
                    scope=name,
                    result="pass" if ok == total else "warning",
                    message=f"{name} reaches {ok} of {total} etcd members",
                    fix=None if ok == total else "bring the missing etcd member back",
                )
            )
    return checks


async def _migration(
    api: ValidateApi, nodes: dict[str, str], facts: dict[str, NodeFacts]
) -> list[Check]:
    checks = []
    for name, f in facts.items():
        if not f.migration_addresses:
            checks.append(
                Check(
                    test="migration",
                    scope=name,
                    result="fail",
                    message=f"{name} has no address on its migration networks",
                    fix=f"ferry --host {name} host migration-network add CIDR",
                )
            )
    names = [n for n in facts if facts[n].migration_addresses]

    async def pair(a: str, b: str) -> Check:
        target = facts[b].migration_addresses[0]
        try:
            ok = (await api.reach(nodes[a], [target])).get(target, False)
        except FerryError as exc:
            return Check(
                test="migration",
                scope=f"{a}->{b}",
                result="fail",
                message=f"{a} could not be asked: {exc.message}",
            )
        if ok:
            return Check(
                test="migration",
                scope=f"{a}->{b}",
                result="pass",
                message=f"{a} reaches {b} at {target}",
            )
        return Check(
            test="migration",
            scope=f"{a}->{b}",
            result="fail",
            message=f"{a} cannot reach {b}'s migration address {target}",
            fix="check the migration network's cabling and routes",
        )

    pairs = [(a, b) for a in names for b in names if a != b]
    checks += await asyncio.gather(*(pair(a, b) for a, b in pairs))
    return checks


async def _volume(
    api: ValidateApi, nodes: dict[str, str], facts: dict[str, NodeFacts], path: str
) -> list[Check]:
    token = secrets.token_hex(8)
    marker = Path(path) / f"{MARKER}{token}"
    try:
        await asyncio.to_thread(marker.write_text, token + "\n")
    except OSError as exc:
        return [
            Check(
                test="volumes",
                scope="all",
                result="fail",
                message=f"{path} cannot be written here: {exc.strerror}",
                fix=f"mount the shared volume at {path} and make it writable",
            )
        ]
    try:
        results = await asyncio.gather(
            *(api.volume_check(nodes[n], VolumeCheck(path=path, token=token)) for n in facts),
            return_exceptions=True,
        )
    finally:
        with contextlib.suppress(OSError):
            marker.unlink()
    checks = []
    for n, r in zip(facts, results, strict=True):
        if isinstance(r, BaseException):
            checks.append(
                Check(
                    test="volumes",
                    scope=n,
                    result="fail",
                    message=f"{n} could not check {path}: {r}",
                )
            )
        else:
            checks.append(
                Check(
                    test="volumes",
                    scope=n,
                    result="pass" if r.ok else "fail",
                    message=f"{path}: {r.message}",
                    fix=r.fix,
                )
            )
    return checks


def facts_here(settings: HostSettings) -> NodeFacts:
    """This node's facts for validation (blocking: netlink, /proc, etcd)."""
    from vmferry import __version__
    from vmferry.cluster.member import etcd_for
    from vmferry.host.host import cpu_info
    from vmferry.host.network import link_exists
    from vmferry.migration.incoming import local_addresses, migration_addresses

    cpu = cpu_info()
    etcd_health: list[dict[str, Any]] = []
    if settings.cluster.etcd.endpoints:
        client = etcd_for(settings, timeout=1.0)
        try:
            etcd_health = client.health()
        finally:
            client.close()
    return NodeFacts(
        node=settings.name,
        version=__version__,
        cpu_vendor=str(cpu["vendor"]),
        cpu_flags=list(cpu["flags"]),
        switches={n: link_exists(sw.bridge) for n, sw in settings.switches.items()},
        migration_addresses=migration_addresses(settings.migration.networks, local_addresses()),
        storage_roots=settings.storage_roots,
        time=time.time(),
        etcd=etcd_health,
    )
