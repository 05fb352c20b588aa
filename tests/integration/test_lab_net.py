"""Lab network in real namespaces (needs root). Traffic only to lab addresses."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute, netns

from vmferry.lab import net
from vmferry.lab.net import LabNetError, Topology
from vmferry.lab.procs import run_in_netns, spawn_in_netns, stop_pid
from vmferry.lab.records import LabRecords, pid_matches

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2"),
]

PING = ["ping"] if shutil.which("ping") else ["busybox", "ping"]


def _tag() -> str:
    while True:
        tag = secrets.token_hex(2)
        if not any(n.startswith(f"vfl{tag}-") for n in netns.listnetns()):
            return tag


def _ping_argv(addr: str) -> list[str]:
    return [*PING, "-c", "1", "-W", "2", addr]


def _ping_ok(netns_name: str | None, addr: str, tries: int = 3) -> bool:
    for _ in range(tries):
        if netns_name is None:
            res = subprocess.run(_ping_argv(addr), capture_output=True, text=True, timeout=10)
        else:
            res = run_in_netns(netns_name, _ping_argv(addr), timeout=10)
        if res.returncode == 0:
            return True
        time.sleep(0.3)
    return False


def _assert_all_gone(entries: list[dict[str, Any]]) -> None:
    present = set(netns.listnetns())
    with IPRoute() as ipr:
        for e in entries:
            if e["kind"] == "netns":
                assert e["name"] not in present, e
            elif e["kind"] == "link" and e["netns"] == "":
                assert not ipr.link_lookup(ifname=e["name"]), e


def _qdiscs(netns_name: str) -> str:
    return run_in_netns(netns_name, ["tc", "qdisc", "show"], timeout=10).stdout


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Topology, LabRecords]]:
    lab_dir = tmp_path_factory.mktemp("lab")
    records = LabRecords(lab_dir)
    try:
        topo = net.build(lab_dir, records, 2, "1gbit", net.choose_index(set()), _tag())
        yield topo, records
    finally:
        entries = records.entries()
        net.teardown(records)
        _assert_all_gone(entries)


def test_build_records_everything(lab: tuple[Topology, LabRecords], tmp_path: Path) -> None:
    topo, records = lab
    names = {e["name"] for e in records.entries() if e["kind"] == "netns"}
    assert names == {topo.fabric_netns, topo.client_netns, *(h.netns for h in topo.hosts)}
    links = [e for e in records.entries() if e["kind"] == "link"]
    assert links == [{"kind": "link", "name": topo.root_if, "netns": ""}]
    saved = (records.lab_dir / "topology.json").read_text()
    assert Topology.from_json(json.loads(saved)) == topo


def test_hosts_reach_each_other(lab: tuple[Topology, LabRecords]) -> None:
    topo, _ = lab
    h1, h2 = topo.hosts
    assert _ping_ok(h1.netns, h2.mgmt_ip)
    assert _ping_ok(h1.netns, h2.migration_ip)
    assert _ping_ok(h2.netns, h1.migration_ip)


def test_root_reaches_mgmt_only_via_lab_if(lab: tuple[Topology, LabRecords]) -> None:
    topo, _ = lab
    for h in topo.hosts:
        net.check_lab_route(topo, h.mgmt_ip)
    net.check_lab_route(topo, topo.hosts[0].mgmt_ip)
    assert _ping_ok(None, topo.hosts[0].mgmt_ip)
    # These would leave through the default route (or are local): refused, no traffic sent.
    for addr in ("198.19.255.1", topo.hosts[0].migration_ip, topo.client_ip, topo.root_ip):
        with pytest.raises(LabNetError):
            net.check_lab_route(topo, addr)


def test_client_reaches_host_uplink(lab: tuple[Topology, LabRecords]) -> None:
    topo, _ = lab
    h1 = topo.hosts[0]
    addr = topo.guest_ip(1)
    with IPRoute(netns=h1.netns, flags=0) as ipr:
        ipr.link("add", ifname="tbr0", kind="bridge")
        br = ipr.link_lookup(ifname="tbr0")[0]
        ipr.link("set", index=ipr.link_lookup(ifname=h1.uplink)[0], master=br)
        ipr.addr("add", index=br, address=addr, prefixlen=24)
        ipr.link("set", index=br, state="up")
    try:
        assert _ping_ok(topo.client_netns, addr)
        # The VM network is separate from the host networks.
        assert not _ping_ok(topo.client_netns, h1.mgmt_ip, tries=1)
    finally:
        with IPRoute(netns=h1.netns, flags=0) as ipr:
            ipr.link("del", index=ipr.link_lookup(ifname="tbr0")[0])


def test_rate_limit(lab: tuple[Topology, LabRecords]) -> None:
    topo, _ = lab
    h1 = topo.hosts[0]
    port = net.fabric_port(h1.name, "g")
    for ns, dev in ((h1.netns, h1.migration_if), (topo.fabric_netns, port)):
        assert any(
            f"dev {dev}" in line and "tbf" in line and "1Gbit" in line
            for line in _qdiscs(ns).splitlines()
        ), _qdiscs(ns)
    try:
        net.set_link_rate(topo, "h1", None)
        assert (
            "tbf" not in run_in_netns(h1.netns, ["tc", "qdisc", "show", "dev", "mig0"], 10).stdout
        )
        port_lines = [ln for ln in _qdiscs(topo.fabric_netns).splitlines() if f"dev {port} " in ln]
        assert port_lines and not any("tbf" in ln for ln in port_lines)
        net.set_link_rate(topo, "h1", "10gbit")
        out = run_in_netns(h1.netns, ["tc", "qdisc", "show", "dev", "mig0"], 10).stdout
        assert "tbf" in out and "10Gbit" in out
        assert _ping_ok(h1.netns, topo.hosts[1].migration_ip)
    finally:
        net.set_link_rate(topo, "h1", "1gbit")


def test_spawn_in_netns(lab: tuple[Topology, LabRecords], tmp_path: Path) -> None:
    topo, records = lab
    h1 = topo.hosts[0]
    pid = spawn_in_netns(records, h1.netns, ["sleep", "60"], tmp_path / "s.log", "sleeper")
    entry = records.entries()[-1]
    try:
        assert entry["kind"] == "pid" and entry["pid"] == pid
        # The recorded pid is the command itself, running in the host's namespace.
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        ns_stat = os.stat(f"/var/run/netns/{h1.netns}")
        proc_stat = os.stat(f"/proc/{pid}/ns/net")
        assert (ns_stat.st_dev, ns_stat.st_ino) == (proc_stat.st_dev, proc_stat.st_ino)
    finally:
        assert stop_pid(pid, entry["start_time"], timeout=5)
    assert not pid_matches(pid, entry["start_time"])


def test_refuses_overlapping_block(lab: tuple[Topology, LabRecords], tmp_path: Path) -> None:
    topo, _ = lab
    assert net.choose_index(set()) != topo.index
    records = LabRecords(tmp_path)
    try:
        with pytest.raises(LabNetError, match="overlaps"):
            net.build(tmp_path, records, 1, None, topo.index, _tag())
        assert records.entries() == []
    finally:
        net.teardown(records)


def test_teardown_removes_everything(tmp_path: Path) -> None:
    records = LabRecords(tmp_path)
    try:
        topo = net.build(tmp_path, records, 2, None, net.choose_index(set()), _tag())
        assert topo.fabric_netns in netns.listnetns()
    finally:
        removed = net.teardown(records)
    assert f"link {topo.root_if}" in removed
    assert f"netns {topo.fabric_netns}" in removed and len(removed) == 5
    _assert_all_gone(records.entries())
    assert net.teardown(records) == []  # idempotent


class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash_at", ["h2-veth", "root-peer"])
def test_crash_recovery_from_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crash_at: str
) -> None:
    real_add_veth, real_attach = net._add_veth_to_fabric, net._attach_port

    def add_veth(ipr: IPRoute, where: str, *args: Any) -> None:
        if crash_at == "h2-veth" and where.endswith("-h2"):
            raise _Crash(where)
        real_add_veth(ipr, where, *args)

    def attach(fab: IPRoute, where: str, port: str, bridge: str) -> None:
        if crash_at == "root-peer" and port == net.ROOT_PEER:
            raise _Crash(port)
        real_attach(fab, where, port, bridge)

    monkeypatch.setattr(net, "_add_veth_to_fabric", add_veth)
    monkeypatch.setattr(net, "_attach_port", attach)
    tag = _tag()
    records = LabRecords(tmp_path)
    try:
        with pytest.raises(_Crash):
            net.build(tmp_path, records, 3, "1gbit", net.choose_index(set()), tag)
        # An intent recorded just before a crash, for a resource never created:
        records.add("netns", name=f"vfl{tag}-h3")
    finally:
        fresh = LabRecords(tmp_path)  # as a new process after the crash would
        removed = net.teardown(fresh)
    entries = fresh.entries()
    assert removed and all(r.split()[1].startswith(f"vfl{tag}") for r in removed)
    if crash_at == "root-peer":
        assert f"link vfl{tag}m" in removed
    _assert_all_gone(entries)
    assert not [n for n in netns.listnetns() if n.startswith(f"vfl{tag}")]
