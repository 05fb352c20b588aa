"""Lab network: pure parts (topology, naming, subnet math, tc parameters)."""

from __future__ import annotations

import ipaddress
import json

import pytest

from vmferry.lab import net
from vmferry.lab.net import HostNet, LabNetError, Topology


def test_make_topology_addresses_and_names() -> None:
    topo = net.make_topology("ab12", 2, 3, "1gbit")
    assert (topo.mgmt_cidr, topo.migration_cidr, topo.vm_cidr) == (
        "198.18.6.0/24",
        "198.18.7.0/24",
        "198.18.8.0/24",
    )
    assert topo.root_if == "vflab12m" and topo.root_ip == "198.18.6.1"
    assert topo.fabric_netns == "vflab12-fab" and topo.client_netns == "vflab12-cl"
    assert topo.client_ip == "198.18.8.250"
    assert [h.name for h in topo.hosts] == ["h1", "h2", "h3"]
    assert [h.netns for h in topo.hosts] == ["vflab12-h1", "vflab12-h2", "vflab12-h3"]
    assert [h.mgmt_ip for h in topo.hosts] == ["198.18.6.11", "198.18.6.12", "198.18.6.13"]
    assert topo.hosts[1].migration_ip == "198.18.7.12"
    assert topo.hosts[0].uplink == "uplink0"
    assert topo.host("h3") is topo.hosts[2]
    with pytest.raises(LabNetError):
        topo.host("h9")


def test_interface_names_fit_and_are_unique() -> None:
    topo = net.make_topology("ffff", 0, net.MAX_HOSTS, None)
    ports = [net.fabric_port(h.name, k) for h in topo.hosts for k in "mgu"]
    ports += [net.ROOT_PEER, net.CLIENT_PEER, net.BR_MGMT, net.BR_MIG, net.BR_VM]
    assert len(ports) == len(set(ports))
    assert all(len(p) <= 15 for p in [*ports, topo.root_if])


def test_topology_json_round_trip() -> None:
    topo = net.make_topology("0a0b", 84, 2, None)
    data = json.loads(json.dumps(topo.to_json()))
    back = Topology.from_json(data)
    assert back == topo
    assert isinstance(back.hosts, tuple) and isinstance(back.hosts[0], HostNet)
    assert data["hosts"][0]["mgmt_if"] == "mgmt0"


def test_guest_ip() -> None:
    topo = net.make_topology("abcd", 1, 2, None)
    assert topo.guest_ip(1) == "198.18.5.11"
    assert topo.guest_ip(2) == "198.18.5.12"
    assert topo.guest_ip(190) == "198.18.5.200"
    for bad in (0, -1, 191):
        with pytest.raises(ValueError):
            topo.guest_ip(bad)


def test_block_cidrs_all_in_lab_range_and_disjoint() -> None:
    seen: list[ipaddress.IPv4Network] = []
    for k in range(net.MAX_INDEX + 1):
        cidrs = [ipaddress.IPv4Network(c) for c in net.block_cidrs(k)]
        assert all(c.subnet_of(net.LAB_SUPERNET) for c in cidrs)
        assert all(not c.overlaps(s) for c in cidrs for s in seen)
        seen.extend(cidrs)
    assert net.block_cidrs(84)[2] == "198.18.254.0/24"
    for bad in (-1, 85):
        with pytest.raises(LabNetError):
            net.block_cidrs(bad)


def test_block_conflicts() -> None:
    def used(*cidrs: str) -> list[tuple[str, ipaddress.IPv4Network]]:
        return [(c, ipaddress.IPv4Network(c, strict=False)) for c in cidrs]

    assert net._block_conflicts(1, used("192.0.2.0/24", "127.0.0.0/8")) == []
    assert net._block_conflicts(1, used("198.18.4.7/32")) == ["198.18.4.7/32"]
    assert net._block_conflicts(0, used("198.18.4.7/32")) == []
    assert net._block_conflicts(5, used("198.18.0.0/15")) == ["198.18.0.0/15"]


def test_choose_index_skips_existing() -> None:
    k = net.choose_index(set())
    assert 0 <= k <= net.MAX_INDEX
    assert net.choose_index({k}) != k
    with pytest.raises(LabNetError):
        net.choose_index(set(range(net.MAX_INDEX + 1)))


def test_bad_parameters() -> None:
    with pytest.raises(LabNetError):
        net.make_topology("ABCD", 0, 2, None)
    with pytest.raises(LabNetError):
        net.make_topology("abcd", 0, 0, None)
    with pytest.raises(LabNetError):
        net.make_topology("abcd", 0, 2, "fast")


def test_rates() -> None:
    assert net.parse_rate("1gbit") == 10**9
    assert net.parse_rate("10Gbit") == 10**10
    assert net.parse_rate("500mbit") == 5 * 10**8
    assert net.parse_rate("8000") == 8000
    for bad in ("", "1gb", "-1gbit", "0mbit"):
        with pytest.raises(LabNetError):
            net.parse_rate(bad)
    for rate in ("1gbit", "10gbit", "100mbit"):
        p = net.tbf_params(rate)
        assert p["rate"] == net.parse_rate(rate) // 8
        assert p["burst"] >= 32 * 1024 and p["burst"] >= p["rate"] // 250
        assert p["burst"] < p["limit"] < 2**32
    with pytest.raises(LabNetError):
        net.tbf_params("100gbit")  # beyond tbf's 32-bit rate


def test_check_lab_route_refuses_non_lab_addresses() -> None:
    topo = net.make_topology("abcd", 0, 1, None)
    for addr in ("192.0.2.1", "8.8.8.8", "not-an-ip", "::1"):
        with pytest.raises(LabNetError):
            net.check_lab_route(topo, addr)
