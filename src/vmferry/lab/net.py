"""The lab's network: N "hosts" as network namespaces joined by three switched networks.

Layout (``tag`` is the lab id, every name below contains it or lives in a lab namespace)::

    root netns:  vfl<tag>m (root_if, mgmt .1/24) ──────────────┐
    fabric netns vfl<tag>-fab:  br-mgmt   br-mig   br-vm        │ rootm
    host netns vfl<tag>-h<i>:   mgmt0 ── h<i>m on br-mgmt  (mgmt .10+i/24)
                                mig0  ── h<i>g on br-mig   (migration .10+i/24)
                                uplink0 ─ h<i>u on br-vm   (no IP; the host agent bridges it)
    client netns vfl<tag>-cl:   eth0 ── cl on br-vm        (vm .250/24)

Safety: all subnets come from 198.18.0.0/15, a block is refused if it overlaps any address or
route of the root namespace, the root namespace reaches the lab only through ``root_if``
(:func:`check_lab_route`), and teardown removes only what :class:`LabRecords` recorded.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import re
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.netlink.exceptions import NetlinkError

from vmferry.lab.records import LabRecords

log = logging.getLogger(__name__)

LAB_SUPERNET = ipaddress.IPv4Network("198.18.0.0/15")
MAX_INDEX = 84  # block k uses 198.18.(3k..3k+2).0/24; 3*84+2 = 254
MAX_HOSTS = 40
MAX_GUESTS = 190  # guests .11 .. .200
CLIENT_HOST = 250
ROOT_HOST = 1
HOST_BASE = 10  # host i gets .10+i
GUEST_BASE = 10  # guest n gets .10+n
PREFIX = 24

BR_MGMT = "br-mgmt"
BR_MIG = "br-mig"
BR_VM = "br-vm"
ROOT_PEER = "rootm"  # fabric-side peer of root_if
CLIENT_PEER = "cl"
CLIENT_IF = "eth0"
UPLINK_IF = "uplink0"

NETNS_DIR = "/var/run/netns"
_TAG_RE = re.compile(r"[0-9a-f]{4}")
#: Queue depth of a shaped link, in milliseconds of traffic at its rate.
QUEUE_MS = 2
# tbf's rate field is 32-bit bytes/s; faster rates would need TCA_TBF_RATE64.
_MAX_TBF_BYTES = 2**32 - 1
_RATE_UNITS = {"": 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


class LabNetError(Exception):
    """The lab network cannot be built, used or checked safely."""


@dataclass(frozen=True)
class HostNet:
    """One lab host's namespace and addresses."""

    name: str
    netns: str
    mgmt_ip: str
    migration_ip: str
    uplink: str
    mgmt_if: str = "mgmt0"
    migration_if: str = "mig0"


@dataclass(frozen=True)
class Topology:
    """Everything needed to use (and describe) a built lab network."""

    tag: str
    index: int
    mgmt_cidr: str
    migration_cidr: str
    vm_cidr: str
    root_if: str
    root_ip: str
    fabric_netns: str
    client_netns: str
    client_ip: str
    hosts: tuple[HostNet, ...]
    link_rate: str | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (round-trips through :meth:`from_json`)."""
        d = asdict(self)
        d["hosts"] = [asdict(h) for h in self.hosts]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Topology:
        """Inverse of :meth:`to_json`."""
        fields = dict(d)
        fields["hosts"] = tuple(HostNet(**h) for h in d["hosts"])
        return cls(**fields)

    def guest_ip(self, n: int) -> str:
        """The n-th guest address on the VM network (n=1 -> .11, up to .200)."""
        if not 1 <= n <= MAX_GUESTS:
            raise ValueError(f"guest number must be 1..{MAX_GUESTS}, got {n}")
        return _host_addr(self.vm_cidr, GUEST_BASE + n)

    def host(self, name: str) -> HostNet:
        """The host called ``name`` ("h1", ...)."""
        for h in self.hosts:
            if h.name == name:
                return h
        raise LabNetError(f"no lab host named {name!r} (have {[h.name for h in self.hosts]})")


# --------------------------------------------------------------------------- naming / subnets


def block_cidrs(index: int) -> tuple[str, str, str]:
    """(mgmt, migration, vm) /24s of subnet block ``index``."""
    if not 0 <= index <= MAX_INDEX:
        raise LabNetError(f"subnet block index must be 0..{MAX_INDEX}, got {index}")
    return tuple(f"198.18.{3 * index + j}.0/{PREFIX}" for j in range(3))  # type: ignore[return-value]


def fabric_port(host_name: str, net: str) -> str:
    """Fabric-side veth peer name of a host's interface: net is "m", "g" or "u"."""
    return f"{host_name}{net}"


def netns_names(tag: str, n_hosts: int) -> tuple[str, str, list[str]]:
    """(fabric, client, [host...]) namespace names for a lab."""
    return f"vfl{tag}-fab", f"vfl{tag}-cl", [f"vfl{tag}-h{i}" for i in range(1, n_hosts + 1)]


def root_if_name(tag: str) -> str:
    """The lab's interface in the root namespace."""
    return f"vfl{tag}m"


def _host_addr(cidr: str, host: int) -> str:
    net = ipaddress.IPv4Network(cidr)
    return str(net.network_address + host)


def make_topology(tag: str, index: int, n_hosts: int, link_rate: str | None) -> Topology:
    """The topology ``build`` would create (pure; no system access)."""
    if not _TAG_RE.fullmatch(tag):
        raise LabNetError(f"lab tag must be 4 lowercase hex chars, got {tag!r}")
    if not 1 <= n_hosts <= MAX_HOSTS:
        raise LabNetError(f"n_hosts must be 1..{MAX_HOSTS}, got {n_hosts}")
    if link_rate is not None:
        parse_rate(link_rate)
    mgmt, mig, vm = block_cidrs(index)
    fabric, client, host_ns = netns_names(tag, n_hosts)
    hosts = tuple(
        HostNet(
            name=f"h{i}",
            netns=host_ns[i - 1],
            mgmt_ip=_host_addr(mgmt, HOST_BASE + i),
            migration_ip=_host_addr(mig, HOST_BASE + i),
            uplink=UPLINK_IF,
        )
        for i in range(1, n_hosts + 1)
    )
    return Topology(
        tag=tag,
        index=index,
        mgmt_cidr=mgmt,
        migration_cidr=mig,
        vm_cidr=vm,
        root_if=root_if_name(tag),
        root_ip=_host_addr(mgmt, ROOT_HOST),
        fabric_netns=fabric,
        client_netns=client,
        client_ip=_host_addr(vm, CLIENT_HOST),
        hosts=hosts,
        link_rate=link_rate,
    )


# --------------------------------------------------------------------------- root-namespace checks


def _root_networks(ipr: IPRoute) -> list[tuple[str, ipaddress.IPv4Network]]:
    """IPv4 addresses and non-default routes (all tables) in the root namespace."""
    found: list[tuple[str, ipaddress.IPv4Network]] = []
    for a in ipr.addr("dump", family=socket.AF_INET):
        addr, plen = a.get("address"), a.get("prefixlen")
        if addr is not None:
            net = ipaddress.IPv4Network(f"{addr}/{plen}", strict=False)
            found.append((f"address {addr}/{plen}", net))
    for r in ipr.route("dump", family=socket.AF_INET):
        dst, plen = r.get("dst"), r.get("dst_len") or 0
        if dst is None or plen == 0:
            continue  # the default route is how *other* traffic leaves; it is not a conflict
        found.append(
            (
                f"route {dst}/{plen} (table {r.get('table')})",
                ipaddress.IPv4Network(f"{dst}/{plen}", strict=False),
            )
        )
    return found


def _block_conflicts(index: int, used: list[tuple[str, ipaddress.IPv4Network]]) -> list[str]:
    nets = [ipaddress.IPv4Network(c) for c in block_cidrs(index)]
    return [what for what, u in used if any(u.overlaps(n) for n in nets)]


def choose_index(existing_indices: set[int]) -> int:
    """A subnet block index unused by the root namespace and not in ``existing_indices``."""
    with IPRoute() as ipr:
        used = _root_networks(ipr)
    for k in range(MAX_INDEX + 1):
        if k not in existing_indices and not _block_conflicts(k, used):
            return k
    raise LabNetError("no free lab subnet block in 198.18.0.0/15")


def check_lab_route(topo: Topology, addr: str) -> None:
    """Raise unless ``addr`` routes (from the root namespace) directly via ``topo.root_if``."""
    try:
        ip = ipaddress.IPv4Address(addr)
    except ValueError as e:
        raise LabNetError(f"not an IPv4 address: {addr!r}") from e
    if ip not in LAB_SUPERNET:
        raise LabNetError(f"{addr} is outside the lab range {LAB_SUPERNET}")
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=topo.root_if)
        if not idx:
            raise LabNetError(f"lab interface {topo.root_if} does not exist in the root netns")
        try:
            routes = ipr.route("get", dst=addr)
        except NetlinkError as e:
            raise LabNetError(f"no route to {addr}: {e}") from e
    if not routes:
        raise LabNetError(f"no route to {addr}")
    r = routes[0]
    oif, gw = r.get("oif"), r.get("gateway")
    if oif != idx[0] or gw is not None or r.get("type") != 1:  # 1 = RTN_UNICAST
        raise LabNetError(
            f"{addr} does not route directly via lab interface {topo.root_if} "
            f"(oif={oif}, gateway={gw}); refusing to send lab traffic there"
        )


# --------------------------------------------------------------------------- tc


def parse_rate(rate: str) -> int:
    """A tc-style rate ("1gbit", "500mbit", "1000000") in bits per second."""
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", rate)
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _RATE_UNITS or int(m.group(1)) <= 0:
        raise LabNetError(f"bad link rate {rate!r} (use e.g. '1gbit', '500mbit')")
    return int(m.group(1)) * _RATE_UNITS[unit]


def tbf_params(rate: str) -> dict[str, int]:
    """rate (bytes/s), burst and limit (bytes) for a tbf qdisc at ``rate``.

    burst must cover one timer tick at the rate (rate/HZ; 250 is a safe HZ) and at least one
    GSO-sized packet. limit adds a queue of ``QUEUE_MS`` of traffic on top of the burst: about
    what a 1 Gbit switch port buffers (a few hundred KB). A deeper queue models a bufferbloated
    link, and every byte queued there delays a migration's switchover and each post-copy fault.
    """
    rate_bytes = parse_rate(rate) // 8
    if rate_bytes > _MAX_TBF_BYTES:
        raise LabNetError(f"link rate {rate} is too high for tbf (max ~34gbit)")
    burst = max(64 * 1024, rate_bytes // 250)
    limit = min(_MAX_TBF_BYTES, rate_bytes * QUEUE_MS // 1000 + burst)
    return {"rate": rate_bytes, "burst": burst, "limit": limit}


def _apply_rate(ns: str, ifname: str, rate: str | None) -> None:
    with IPRoute(netns=ns, flags=0) as ipr:
        idx = _ifindex(ipr, ifname, ns)
        try:
            ipr.tc("del", index=idx, root=True, handle=0)  # noqueue/absent: ENOENT/EINVAL
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.EINVAL):
                raise
        if rate is not None:
            ipr.tc("add", "tbf", index=idx, handle=0x10000, **tbf_params(rate))


def set_link_rate(topo: Topology, host: str, rate: str | None) -> None:
    """Limit (or with None, unlimit) ``host``'s migration link in both directions."""
    h = topo.host(host)
    if rate is not None:
        tbf_params(rate)  # validate before touching anything
    _apply_rate(h.netns, h.migration_if, rate)  # host -> switch
    _apply_rate(topo.fabric_netns, fabric_port(h.name, "g"), rate)  # switch -> host


# --------------------------------------------------------------------------- build


def _ifindex(ipr: IPRoute, ifname: str, where: str) -> int:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise LabNetError(f"interface {ifname} not found in {where or 'root netns'}")
    return int(idx[0])


def _disable_ipv6(ns: str) -> None:
    # pyroute2 cannot write per-netns sysctls (netlink exposes them read-only), so this uses
    # `ip netns exec ... sysctl`. Best effort: IPv6 only adds DAD/MLD noise in the lab.
    subprocess.run(
        ["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
         "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        timeout=10, check=False,
    )  # fmt: skip


def _create_netns(records: LabRecords, name: str) -> None:
    if name in netns.listnetns():
        raise LabNetError(f"network namespace {name} already exists; refusing to reuse it")
    records.add("netns", name=name)
    netns.create(name)
    _disable_ipv6(name)
    with IPRoute(netns=name, flags=0) as ipr:
        ipr.link("set", index=_ifindex(ipr, "lo", name), state="up")


@contextlib.contextmanager
def _netns_fd(name: str) -> Iterator[int]:
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


def _add_veth_to_fabric(
    ipr: IPRoute, where: str, ifname: str, peer: str, fab_fd: int, addr: str | None
) -> None:
    """Create veth ``ifname`` in ipr's netns with ``peer`` directly in the fabric netns."""
    ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": peer, "net_ns_fd": fab_fd})
    idx = _ifindex(ipr, ifname, where)
    if addr is not None:
        ipr.addr("add", index=idx, address=addr, prefixlen=PREFIX)
    ipr.link("set", index=idx, state="up")


def _attach_port(fab: IPRoute, where: str, port: str, bridge: str) -> None:
    fab.link(
        "set", index=_ifindex(fab, port, where), master=_ifindex(fab, bridge, where), state="up"
    )


def _check_can_build(topo: Topology) -> None:
    with IPRoute() as ipr:
        conflicts = _block_conflicts(topo.index, _root_networks(ipr))
        if conflicts:
            raise LabNetError(
                f"lab subnet block {topo.index} ({topo.mgmt_cidr}, {topo.migration_cidr}, "
                f"{topo.vm_cidr}) overlaps the root namespace: {', '.join(conflicts)}"
            )
        if ipr.link_lookup(ifname=topo.root_if):
            raise LabNetError(f"interface {topo.root_if} already exists in the root netns")
    existing = set(netns.listnetns())
    names = [topo.fabric_netns, topo.client_netns, *(h.netns for h in topo.hosts)]
    clash = [n for n in names if n in existing]
    if clash:
        raise LabNetError(f"network namespaces already exist: {', '.join(clash)}")


def build(
    lab_dir: Path, records: LabRecords, n_hosts: int, link_rate: str | None, index: int, tag: str
) -> Topology:
    """Create the lab network, recording each namespace and root link before creating it.

    On failure the partial lab is left in place for :func:`teardown` (from ``records``).
    The topology is also written to ``<lab_dir>/topology.json``.
    """
    topo = make_topology(tag, index, n_hosts, link_rate)
    _check_can_build(topo)
    lab_dir.mkdir(parents=True, exist_ok=True)

    fab_ns = topo.fabric_netns
    _create_netns(records, fab_ns)
    with IPRoute(netns=fab_ns, flags=0) as fab, _netns_fd(fab_ns) as fab_fd:
        for br in (BR_MGMT, BR_MIG, BR_VM):
            # STP off (ports forward at once); no multicast snooping so the "switch" floods
            # like a dumb one.
            fab.link("add", ifname=br, kind="bridge", br_stp_state=0, br_mcast_snooping=0)
            fab.link("set", index=_ifindex(fab, br, fab_ns), state="up")

        for h in topo.hosts:
            _create_netns(records, h.netns)
            with IPRoute(netns=h.netns, flags=0) as hip:
                for ifname, net, bridge, addr in (
                    (h.mgmt_if, "m", BR_MGMT, h.mgmt_ip),
                    (h.migration_if, "g", BR_MIG, h.migration_ip),
                    (h.uplink, "u", BR_VM, None),
                ):
                    port = fabric_port(h.name, net)
                    _add_veth_to_fabric(hip, h.netns, ifname, port, fab_fd, addr)
                    _attach_port(fab, fab_ns, port, bridge)

        _create_netns(records, topo.client_netns)
        with IPRoute(netns=topo.client_netns, flags=0) as cip:
            _add_veth_to_fabric(
                cip, topo.client_netns, CLIENT_IF, CLIENT_PEER, fab_fd, topo.client_ip
            )
        _attach_port(fab, fab_ns, CLIENT_PEER, BR_VM)

        # The one lab-owned interface in the root namespace.
        records.add("link", name=topo.root_if, netns="")
        with IPRoute() as ipr:
            ipr.link(
                "add", ifname=topo.root_if, kind="veth",
                peer={"ifname": ROOT_PEER, "net_ns_fd": fab_fd},
            )  # fmt: skip
            idx = _ifindex(ipr, topo.root_if, "")
            with contextlib.suppress(OSError):  # root netns: plain sysctl file write
                Path(f"/proc/sys/net/ipv6/conf/{topo.root_if}/disable_ipv6").write_text("1\n")
            ipr.addr("add", index=idx, address=topo.root_ip, prefixlen=PREFIX)
            ipr.link("set", index=idx, state="up")
        _attach_port(fab, fab_ns, ROOT_PEER, BR_MGMT)

    if link_rate is not None:
        for h in topo.hosts:
            set_link_rate(topo, h.name, link_rate)

    check_lab_route(topo, topo.hosts[0].mgmt_ip)
    _write_json(lab_dir / "topology.json", topo.to_json())
    return topo


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------- teardown


def _delete_link(ns: str, name: str) -> bool:
    """Delete veth ``name`` in ``ns`` ("" = root); False if it (or the netns) is gone."""
    if ns and ns not in netns.listnetns():
        return False
    with IPRoute(netns=ns, flags=0) if ns else IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return False
        link = ipr.link("get", index=found[0])[0]
        kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
        if kind != "veth":
            log.warning("not deleting %s in %s: it is a %s, not the lab's veth", name, ns, kind)
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False
            raise
    return True


def teardown(records: LabRecords) -> list[str]:
    """Delete recorded root links and namespaces, newest first; returns what was removed."""
    removed: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    for entry in reversed(records.entries()):
        kind = entry.get("kind")
        if kind == "link":
            name, ns = str(entry["name"]), str(entry.get("netns", ""))
            if ("link", ns, name) in seen:
                continue
            seen.add(("link", ns, name))
            if _delete_link(ns, name):
                removed.append(f"link {name}" + (f" (netns {ns})" if ns else ""))
        elif kind == "netns":
            name = str(entry["name"])
            if ("netns", "", name) in seen:
                continue
            seen.add(("netns", "", name))
            if name in netns.listnetns():
                netns.remove(name)
                removed.append(f"netns {name}")
    return removed
