"""VM specifications: what an admin declares, and what the host stores beside the disks."""

from __future__ import annotations

import ipaddress
import re
import time
import uuid as uuidlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
DISK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
CPU_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.,=+-]{0,127}$")
PROBE_ROLES = ("heartbeat", "udpecho", "tcpecho", "dirty", "disk", "power")
CONFIG_FILE = "vm.json"
STATE_FILE = "saved.vmstate"

#: Bounds every request is checked against (and the OpenAPI spec shows).
MIN_MEMORY_MIB = 16
MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB
MAX_DISK_MIB = 16 * 1024 * 1024  # 16 TiB per disk
MAX_DISKS = 16
MAX_NICS = 8
MAX_PATH_LEN = 1024
#: x86 Linux's COMMAND_LINE_SIZE.
MAX_CMDLINE_LEN = 2048


def check_vm_name(name: str) -> str:
    """Validate a VM name; raise ValueError with the rule when it is malformed."""
    if not NAME_RE.match(name) or ".." in name:
        raise ValueError(
            "must be 1-63 characters of A-Z a-z 0-9 _ . - starting with a letter or digit"
        )
    return name


def check_path_text(value: str | None, field: str) -> str | None:
    """Refuse a path with control characters (NUL, newline, ...); the storage checks do the rest."""
    if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{field} must not contain control characters")
    return value


class DiskCreate(BaseModel):
    """A new qcow2 disk to create with the VM."""

    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=32,
        json_schema_extra={"pattern": DISK_NAME_RE.pattern},
    )
    size_mib: int = Field(ge=1, le=MAX_DISK_MIB)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not DISK_NAME_RE.match(v):
            raise ValueError("disk name: 1-32 of A-Z a-z 0-9 _ -")
        return v


class NicCreate(BaseModel):
    """A NIC on a named virtual switch; the MAC is generated when left out."""

    switch: str = Field(min_length=1, max_length=32)
    mac: str | None = Field(default=None, max_length=17)

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.lower()
        if not MAC_RE.match(v):
            raise ValueError("MAC must look like 52:54:00:12:34:56")
        if int(v[:2], 16) & 1:
            raise ValueError("MAC must be unicast (first octet even)")
        return v


class ProbeSpec(BaseModel):
    """The lab guest: its address and the probe roles it runs (kernel command line)."""

    ip: str | None = Field(default=None, max_length=18)
    gateway: str | None = Field(default=None, max_length=15)
    roles: list[str] = Field(
        default_factory=lambda: ["heartbeat", "udpecho", "tcpecho", "power"],
        max_length=len(PROBE_ROLES),
    )
    dirty: str | None = Field(default=None, max_length=32)

    @field_validator("ip")
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                iface = ipaddress.ip_interface(v)
            except ValueError:
                iface = None
            if iface is None or iface.version != 4 or "/" not in v:
                raise ValueError("ip must be IPv4 with a prefix length, e.g. 198.18.2.11/24")
        return v

    @field_validator("gateway")
    @classmethod
    def _gateway(cls, v: str | None) -> str | None:
        # It goes on the guest's kernel command line: only a plain address may.
        if v is not None:
            try:
                ipaddress.IPv4Address(v)
            except ValueError as exc:
                raise ValueError("gateway must be an IPv4 address, e.g. 198.18.2.1") from exc
        return v

    @field_validator("roles")
    @classmethod
    def _roles(cls, v: list[str]) -> list[str]:
        bad = [r for r in v if r not in PROBE_ROLES]
        if bad:
            raise ValueError(f"unknown probe role {bad[0]!r}; roles: {', '.join(PROBE_ROLES)}")
        return v

    @field_validator("dirty")
    @classmethod
    def _dirty(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^\d+[KMG]?@\d+[KMG]?(:full)?$", v):
            raise ValueError(
                "dirty must be SIZE@RATE[:full], e.g. 128M@0 (0 = as fast as possible; :full "
                "rewrites whole pages with new data instead of one byte per page)"
            )
        return v


class BootSpec(BaseModel):
    """How the VM boots: the built-in probe guest, a kernel + initrd, or its first disk."""

    kind: Literal["probe", "kernel", "disk"] = "probe"
    #: Files under the host's storage roots (checked when the VM is created).
    kernel: str | None = Field(default=None, min_length=1, max_length=MAX_PATH_LEN)
    initrd: str | None = Field(default=None, min_length=1, max_length=MAX_PATH_LEN)
    cmdline: str | None = Field(default=None, max_length=MAX_CMDLINE_LEN)

    @field_validator("kernel", "initrd", "cmdline")
    @classmethod
    def _text(cls, v: str | None, info: ValidationInfo) -> str | None:
        return check_path_text(v, f"boot.{info.field_name}")

    @model_validator(mode="after")
    def _kernel_needed(self) -> BootSpec:
        if self.kind == "kernel" and not self.kernel:
            raise ValueError("boot kind 'kernel' needs boot.kernel (a path to a kernel image)")
        return self


class VMCreate(BaseModel):
    """A request to create a VM (``POST /v1/vms``)."""

    name: str = Field(min_length=1, max_length=63, json_schema_extra={"pattern": NAME_RE.pattern})
    memory_mib: int = Field(default=256, ge=MIN_MEMORY_MIB, le=MAX_MEMORY_MIB)
    vcpus: int = Field(default=1, ge=1, le=64)
    cpu_model: str = Field(default="qemu64", min_length=1, max_length=128)
    disks: list[DiskCreate] = Field(default_factory=list, max_length=MAX_DISKS)
    nics: list[NicCreate] = Field(default_factory=list, max_length=MAX_NICS)
    boot: BootSpec = Field(default_factory=BootSpec)
    probe: ProbeSpec | None = None
    storage_dir: str | None = Field(default=None, min_length=1, max_length=MAX_PATH_LEN)
    allow_postcopy: bool = True

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_vm_name(v)

    @field_validator("storage_dir")
    @classmethod
    def _storage_dir(cls, v: str | None) -> str | None:
        return check_path_text(v, "storage_dir")

    @field_validator("cpu_model")
    @classmethod
    def _cpu(cls, v: str) -> str:
        if not CPU_MODEL_RE.match(v):
            raise ValueError("cpu_model must be a QEMU CPU model name such as qemu64 or host")
        return v


class DiskSpec(BaseModel):
    """A disk as stored in the VM's configuration."""

    name: str
    file: str
    size_mib: int
    fmt: str = "qcow2"


class NicSpec(BaseModel):
    """A NIC as stored in the VM's configuration."""

    switch: str
    mac: str


class VMSpec(BaseModel):
    """The VM's configuration file (``vm.json`` in the VM's storage folder)."""

    format: int = 1
    name: str
    uuid: str = Field(default_factory=lambda: str(uuidlib.uuid4()))
    memory_mib: int
    vcpus: int
    cpu_model: str
    storage_dir: str
    disks: list[DiskSpec] = Field(default_factory=list)
    nics: list[NicSpec] = Field(default_factory=list)
    boot: BootSpec = Field(default_factory=BootSpec)
    probe: ProbeSpec | None = None
    #: Post-copy finishes any move but loses the VM if the link breaks unrecovered;
    #: admins may forbid it per VM.
    allow_postcopy: bool = True
    created_at: float = Field(default_factory=time.time)
    #: Where a saved state goes (``ferry move-storage --state-to``); None = the storage folder.
    state_dir: str | None = None


def state_file(spec: VMSpec) -> Path:
    """Where the VM's saved memory and device state lives."""
    return Path(spec.state_dir or spec.storage_dir) / STATE_FILE
