"""Host settings: accelerator, storage roots, virtual switches, memory reserve."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from vmferry.errors import RefusedError
from vmferry.host.spec import MAX_MEMORY_MIB
from vmferry.validation import MAX_ITEMS, PathText

IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
SWITCH_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")


def kvm_usable() -> bool:
    """True when /dev/kvm exists and can be opened read-write."""
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


class SwitchSpec(BaseModel):
    """A virtual switch: a Linux bridge, optionally uplinked to a physical interface."""

    bridge: str
    uplink: str | None = None

    @field_validator("bridge", "uplink")
    @classmethod
    def _ifname(cls, v: str | None) -> str | None:
        if v is not None and not IFNAME_RE.match(v):
            raise ValueError("must be a Linux interface name: 1-15 of A-Z a-z 0-9 _ . -")
        return v


class MigrationSettings(BaseModel):
    """Live migration on this host (``ferry host set --migration-...``)."""

    enabled: bool = True
    #: Ordered CIDRs the host migrates over; "any" allows every address.
    networks: list[str] = Field(default_factory=lambda: ["any"], max_length=MAX_ITEMS)
    #: Migration networks (CIDRs among ``networks``) the admin marks trusted: only over
    #: these may a move run unencrypted (``--no-encryption``).
    trusted_networks: list[str] = Field(default_factory=list)
    max_concurrent: int = Field(default=2, ge=1, le=64)
    transport: Literal["tcp", "compression", "multichannel"] = "tcp"
    streams: int = Field(default=4, ge=1, le=64)
    bandwidth_mbps: int | None = Field(default=None, ge=1)
    #: Unsent data each migration socket may queue, in milliseconds at the stream's rate
    #: (``TCP_NOTSENT_LOWAT`` on QEMU's sockets, see docs/migration.md): what is queued when
    #: QEMU stops the guest is sent during the pause. 0 leaves the kernel's default (up to
    #: ``net.ipv4.tcp_wmem``'s maximum, 4 MiB: 34 ms at 1 Gbit/s).
    send_queue_ms: float = Field(default=8.0, ge=0, le=1000)
    #: The share of a move's downtime target QEMU aims at in its first passes (docs/migration.md,
    #: "Aiming below the downtime target"); 1 gives QEMU the whole target from the start.
    downtime_aim: float = Field(default=0.25, ge=0.05, le=1.0)
    port_min: int = Field(default=49152, ge=1024, le=65535)
    port_max: int = Field(default=49215, ge=1024, le=65535)
    #: Who may start a move from this host and what this host accepts (docs/security.md):
    #: ``local`` — only a client on this host may start one (CredSSP's rule);
    #: ``delegated`` — a remote client's request carries a ticket the user signed, and moves
    #: this host receives need one too (verified here; cluster moves use node identities).
    authentication: Literal["local", "delegated"] = "delegated"

    @field_validator("networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        out = []
        for n in v:
            if n == "any":
                out.append(n)
                continue
            try:
                out.append(str(ipaddress.ip_network(n, strict=False)))
            except ValueError as exc:
                raise ValueError(f"migration network {n!r} is not a CIDR (or 'any')") from exc
        return out

    @field_validator("trusted_networks")
    @classmethod
    def _trusted(cls, v: list[str]) -> list[str]:
        out = []
        for n in v:
            try:
                net = str(ipaddress.ip_network(n, strict=False))
            except ValueError as exc:
                raise ValueError(
                    f"trusted migration network {n!r} must be a CIDR ('any' cannot be trusted)"
                ) from exc
            if net not in out:
                out.append(net)
        return out

    @model_validator(mode="after")
    def _trusted_are_networks(self) -> MigrationSettings:
        stray = [n for n in self.trusted_networks if n not in self.networks]
        if stray:
            raise ValueError(
                f"trusted network {stray[0]} is not one of the migration networks "
                f"({', '.join(self.networks)}); add it with "
                f"ferry host migration-network add {stray[0]} --trusted"
            )
        return self

    def trusted(self, address: str) -> bool:
        """True when ``address`` lies inside a migration network marked trusted."""
        ip = ipaddress.ip_address(address)
        return any(ip in ipaddress.ip_network(n) for n in self.trusted_networks)


class StorageSettings(BaseModel):
    """Storage moves on this host (``ferry host set --storage-max-concurrent``)."""

    #: Storage moves copying at once; extra ones wait in a FIFO queue.
    max_concurrent: int = Field(default=2, ge=1, le=64)


class EtcdSettings(BaseModel):
    """Where the cluster's etcd is: endpoints and the TLS files to reach it."""

    endpoints: list[str] = Field(default_factory=list, max_length=MAX_ITEMS)
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @field_validator("endpoints")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for ep in v:
            if not re.match(r"^https?://[^/\s]+:\d+/?$", ep):
                raise ValueError(f"etcd endpoint {ep!r}: use https://HOST:PORT")
        return [ep.rstrip("/") for ep in v]


class ClusterSettings(BaseModel):
    """Failover clustering on this host (``cluster.etcd`` + lease timing)."""

    etcd: EtcdSettings = Field(default_factory=EtcdSettings)
    #: TTL of this node's etcd lease: failover detection time. The node fences itself after
    #: TTL - 1 s (at least TTL / 2) without a good renewal (cluster/member.py).
    lease_ttl_s: int = Field(default=4, ge=3, le=60)
    #: How many failed-over VMs the leader's controller restarts at once (cluster/controller.py).
    failover_concurrency: int = Field(default=4, ge=1, le=64)
    #: How many live moves a drain (or failback) runs at once (cluster/planned.py); each host's
    #: ``migration.max_concurrent`` still applies.
    drain_concurrency: int = Field(default=2, ge=1, le=64)


class HostSettings(BaseModel):
    """Everything an admin sets on one host (``ferry host set``)."""

    name: str = Field(default_factory=socket.gethostname)
    accelerator: Literal["kvm", "tcg"] = Field(
        default_factory=lambda: "kvm" if kvm_usable() else "tcg"
    )
    storage_roots: list[str] = Field(default_factory=list)
    switches: dict[str, SwitchSpec] = Field(default_factory=dict)
    memory_reserve_mib: int = Field(default=512, ge=0)
    migration: MigrationSettings = Field(default_factory=MigrationSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)

    @field_validator("storage_roots")
    @classmethod
    def _absolute(cls, v: list[str]) -> list[str]:
        for root in v:
            if not os.path.isabs(root):
                raise ValueError(f"storage root {root!r} must be an absolute path")
        return [os.path.normpath(r) for r in v]

    @field_validator("switches")
    @classmethod
    def _switch_names(cls, v: dict[str, SwitchSpec]) -> dict[str, SwitchSpec]:
        for name in v:
            if not SWITCH_NAME_RE.match(name):
                raise ValueError(f"switch name {name!r}: use 1-32 of A-Z a-z 0-9 _ - ")
        return v


class HostSettingsUpdate(BaseModel):
    """A partial update; fields left out keep their value."""

    accelerator: Literal["kvm", "tcg"] | None = None
    storage_roots: list[PathText] | None = Field(default=None, max_length=MAX_ITEMS)
    switches: dict[str, SwitchSpec] | None = Field(default=None, max_length=MAX_ITEMS)
    memory_reserve_mib: int | None = Field(default=None, ge=0, le=MAX_MEMORY_MIB)
    migration: MigrationSettings | None = None
    storage: StorageSettings | None = None
    cluster: ClusterSettings | None = None


class SettingsStore:
    """Loads and saves ``settings.json`` in the host's state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "settings.json"

    def load(self) -> HostSettings:
        """The saved settings, or defaults when none were saved yet."""
        if self.path.exists():
            return HostSettings.model_validate(json.loads(self.path.read_text()))
        return HostSettings()

    def save(self, settings: HostSettings) -> None:
        """Write the settings atomically."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(settings.model_dump_json(indent=2))
        os.replace(tmp, self.path)


def merged(current: HostSettings, update: HostSettingsUpdate) -> HostSettings:
    """Apply ``update`` to ``current`` and validate the result (raises RefusedError)."""
    data = current.model_dump()
    data.update(update.model_dump(exclude_none=True))
    try:
        result = HostSettings.model_validate(data)
    except ValueError as exc:
        raise RefusedError(str(exc), field="settings") from exc
    for root in result.storage_roots:
        if not Path(root).is_dir():
            raise RefusedError(
                f"storage root {root} does not exist",
                field="storage_roots",
                fix=f"create it first (mkdir -p {root})",
            )
    return result
