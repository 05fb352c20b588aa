"""Virtual switches (Linux bridges) and the tap devices of VM NICs, via pyroute2."""

from __future__ import annotations

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vmferry.errors import HostError, RefusedError


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def link_exists(name: str) -> bool:
    """True if a network interface of that name exists in this namespace."""
    with IPRoute() as ipr:
        return _index(ipr, name) is not None


def ensure_switch(bridge: str, uplink: str | None) -> None:
    """Create the bridge if missing, bring it up, and enslave the uplink to it."""
    with IPRoute() as ipr:
        idx = _index(ipr, bridge)
        if idx is None:
            try:
                ipr.link("add", ifname=bridge, kind="bridge")
            except NetlinkError as exc:
                raise HostError(f"cannot create bridge {bridge}: {exc}") from exc
            idx = _index(ipr, bridge)
        assert idx is not None
        ipr.link("set", index=idx, state="up")
        if uplink:
            up = _index(ipr, uplink)
            if up is None:
                raise RefusedError(
                    f"uplink interface {uplink} does not exist on this host",
                    field="uplink",
                    fix="name an existing interface (ip link show)",
                )
            ipr.link("set", index=up, master=idx, state="up")


def attach_tap(tap: str, bridge: str) -> None:
    """Put a tap (created by QEMU) on a bridge and bring it up."""
    with IPRoute() as ipr:
        tidx = _index(ipr, tap)
        bidx = _index(ipr, bridge)
        if tidx is None:
            raise HostError(f"tap {tap} was not created by QEMU")
        if bidx is None:
            raise HostError(f"bridge {bridge} does not exist")
        ipr.link("set", index=tidx, master=bidx, state="up")
