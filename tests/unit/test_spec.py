"""VM spec validation: malformed input is refused with the field named."""

import pytest
from pydantic import ValidationError

from vmferry.host.spec import NicCreate, ProbeSpec, VMCreate


@pytest.mark.parametrize("name", ["", "-lead", "a b", "a/b", "x" * 64, "a..b", "ünï"])
def test_malformed_names(name: str) -> None:
    with pytest.raises(ValidationError) as exc:
        VMCreate(name=name)
    assert exc.value.errors()[0]["loc"] == ("name",)


@pytest.mark.parametrize("name", ["vm1", "web-01", "A.b_c"])
def test_good_names(name: str) -> None:
    assert VMCreate(name=name).name == name


def test_mac_rules() -> None:
    assert NicCreate(switch="x", mac="52:54:00:AA:bb:01").mac == "52:54:00:aa:bb:01"
    with pytest.raises(ValidationError, match="unicast"):
        NicCreate(switch="x", mac="01:00:5e:00:00:01")
    with pytest.raises(ValidationError):
        NicCreate(switch="x", mac="zz")


def test_probe_roles_and_ip() -> None:
    with pytest.raises(ValidationError, match="unknown probe role"):
        ProbeSpec(roles=["heartbeat", "mine-bitcoin"])
    with pytest.raises(ValidationError, match="prefix"):
        ProbeSpec(ip="198.18.2.11")
    assert ProbeSpec(ip="198.18.2.11/24", dirty="128M@0").dirty == "128M@0"
    assert ProbeSpec(dirty="128M@0:full").dirty == "128M@0:full"
    with pytest.raises(ValidationError, match="SIZE@RATE"):
        ProbeSpec(dirty="128M@0:half")
