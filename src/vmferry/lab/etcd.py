"""The lab's etcd cluster: N members, each in its own network namespace on the management net.

Member i lives in namespace ``vfl<tag>-e<i>`` with ``mgmt0`` (mgmt ``.200+i``) plugged into the
fabric's management bridge (fabric port ``e<i>m``), so a host cut off from the management
network is cut off from etcd too, and one member can be stopped or cut off on its own. TLS
everywhere (client and peer) with certificates from the lab CA; clients must present a
certificate signed by it (``--client-cert-auth``). Data directories live under
``<lab>/etcd/``. Namespaces, processes and directories are journalled in the lab's records
before they are made, so ``ferry lab down`` removes them.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from vmferry.lab import net
from vmferry.lab.procs import spawn_in_netns
from vmferry.lab.records import LabRecords
from vmferry.security import CertificateAuthority

MAX_MEMBERS = 9
MEMBER_BASE = 200  # member i gets mgmt .200+i
CLIENT_PORT = 2379
PEER_PORT = 2380


@dataclass(frozen=True)
class EtcdMember:
    """One lab etcd member."""

    name: str
    netns: str
    ip: str
    fabric_port: str
    data_dir: str

    @property
    def client_url(self) -> str:
        return f"https://{self.ip}:{CLIENT_PORT}"

    @property
    def peer_url(self) -> str:
        return f"https://{self.ip}:{PEER_PORT}"


def plan(topo: net.Topology, lab_dir: Path, n: int) -> list[EtcdMember]:
    """The members ``start`` would create (pure)."""
    if not 0 <= n <= MAX_MEMBERS:
        raise net.LabNetError(f"etcd members must be 0..{MAX_MEMBERS}, got {n}")
    return [
        EtcdMember(
            name=f"e{i}",
            netns=f"vfl{topo.tag}-e{i}",
            ip=net._host_addr(topo.mgmt_cidr, MEMBER_BASE + i),
            fabric_port=f"e{i}m",
            data_dir=str(lab_dir / "etcd" / f"e{i}"),
        )
        for i in range(1, n + 1)
    ]


def build_network(records: LabRecords, topo: net.Topology, members: list[EtcdMember]) -> None:
    """A namespace per member with a veth to the management bridge."""
    with (
        IPRoute(netns=topo.fabric_netns, flags=0) as fab,
        net._netns_fd(topo.fabric_netns) as fab_fd,
    ):
        for m in members:
            net._create_netns(records, m.netns)
            with IPRoute(netns=m.netns, flags=0) as ipr:
                net._add_veth_to_fabric(ipr, m.netns, "mgmt0", m.fabric_port, fab_fd, m.ip)
            net._attach_port(fab, topo.fabric_netns, m.fabric_port, net.BR_MGMT)


def start(
    records: LabRecords,
    lab_dir: Path,
    ca: CertificateAuthority,
    members: list[EtcdMember],
    tag: str,
) -> None:
    """Issue certificates and start every member (``etcd`` from Debian's etcd-server)."""
    etcd = shutil.which("etcd")
    if etcd is None:
        raise RuntimeError("etcd is not installed (Debian: apt-get install etcd-server)")
    tls = lab_dir / "etcd" / "tls"
    records.add("dir", path=str(lab_dir / "etcd"))
    initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
    for m in members:
        certs = ca.issue(tls, m.name, server_names=[m.ip])
        Path(m.data_dir).mkdir(parents=True, exist_ok=True)
        argv = [
            etcd, "--name", m.name, "--data-dir", m.data_dir,
            "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--initial-cluster-token", f"vmferry-lab-{tag}",
            "--cert-file", str(certs.cert), "--key-file", str(certs.key),
            "--trusted-ca-file", str(ca.cert_path), "--client-cert-auth",
            "--peer-cert-file", str(certs.cert), "--peer-key-file", str(certs.key),
            "--peer-trusted-ca-file", str(ca.cert_path), "--peer-client-cert-auth",
            "--logger", "zap", "--log-level", "warn",
        ]  # fmt: skip
        start_member(records, lab_dir, m, argv)


def start_member(records: LabRecords, lab_dir: Path, m: EtcdMember, argv: list[str]) -> int:
    """Spawn one member in its namespace (argv kept in ``<data>/../<name>.argv``)."""
    (Path(m.data_dir).parent / f"{m.name}.argv").write_text("\n".join(argv))
    log = lab_dir / "etcd" / f"{m.name}.log"
    return spawn_in_netns(records, m.netns, argv, log, f"etcd {m.name}")


def restart_member(records: LabRecords, lab_dir: Path, m: EtcdMember) -> int:
    """Start a member again with the command line it was first started with."""
    argv = (Path(m.data_dir).parent / f"{m.name}.argv").read_text().splitlines()
    return start_member(records, lab_dir, m, argv)


def wait_healthy(endpoints: list[str], ca: str, cert: str, key: str, timeout: float) -> None:
    """Wait until every member answers and the cluster has a leader."""
    from vmferry.cluster.etcd import Etcd

    client = Etcd(endpoints, ca, cert, key, timeout=1.0)
    deadline = time.monotonic() + timeout
    last: Any = None
    try:
        while time.monotonic() < deadline:
            health = client.health()
            last = health
            if all(h.get("ok") and h.get("leader") not in ("", "0") for h in health):
                return
            time.sleep(0.2)
    finally:
        client.close()
    raise RuntimeError(f"lab etcd not healthy within {timeout:.0f} s: {last}")


def to_json(members: list[EtcdMember]) -> list[dict[str, Any]]:
    """JSON form (round-trips through :func:`from_json`)."""
    return [asdict(m) for m in members]


def from_json(data: list[dict[str, Any]]) -> list[EtcdMember]:
    """Inverse of :func:`to_json`."""
    return [EtcdMember(**d) for d in data]
