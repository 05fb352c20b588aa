"""What a move is: the request, the messages between agents, and the job record."""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from vmferry.host.spec import VMSpec
from vmferry.security.tickets import SignedTicket
from vmferry.validation import AGENT_URL_RE, MAX_ITEMS, PathText, ShortText, check_agent_url

Transport = Literal["tcp", "compression", "multichannel"]
Policy = Literal["auto", "precopy", "postcopy"]


class Phase(StrEnum):
    """The phases of a live move, in order."""

    QUEUED = "queued"
    CHECKS = "checks"
    SETUP = "setup"
    MIRROR = "mirror"
    PRECOPY = "precopy"
    POSTCOPY = "postcopy"
    SWITCHOVER = "switchover"
    RESUME = "resume"
    ANNOUNCE = "announce"
    CLEANUP = "cleanup"
    ROLLBACK = "rollback"


class JobState(StrEnum):
    """Where a job stands."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True once the job will not change again."""
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


class Destination(BaseModel):
    """Where to: the destination agent's name and URL (from the caller's client config)."""

    name: str = Field(min_length=1, max_length=63)
    url: str = Field(min_length=1, max_length=300, json_schema_extra={"pattern": AGENT_URL_RE})

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        return check_agent_url(v)


class MoveOptions(BaseModel):
    """How to move (``ferry move`` options); unset fields take the host's defaults."""

    storage_path: PathText | None = None
    #: disk name (or the source file's path) -> destination file.
    disk_map: dict[PathText, PathText] = Field(default_factory=dict, max_length=MAX_ITEMS)
    vm_only: bool = False
    switch_map: dict[ShortText, ShortText] = Field(default_factory=dict, max_length=MAX_ITEMS)
    transport: Transport | None = None
    streams: int | None = Field(default=None, ge=1, le=64)
    bandwidth_mbps: int | None = Field(default=None, ge=1)
    policy: Policy = "auto"
    downtime_target_ms: int = Field(default=50, ge=1, le=60_000)
    timeout_s: float | None = Field(default=None, gt=0)
    on_timeout: Literal["abort", "force"] = "abort"
    #: Benchmark baseline only: drive QEMU with its own defaults (plain ``migrate``: the
    #: 128 MiB/s cap, 300 ms downtime limit, one stream, no post-copy, no throttling, QEMU's
    #: own socket options).
    qemu_defaults: bool = False
    #: No progress for this long while copying means the migration link is gone.
    stall_timeout_s: float = Field(default=20.0, ge=1, le=3600)
    #: How long to keep retrying post-copy recovery after the link broke.
    recover_timeout_s: float = Field(default=600.0, ge=1, le=86400)
    #: How long to keep handing a finished move to a destination agent that does not answer.
    commit_retry_s: float = Field(default=60.0, ge=1, le=3600)
    #: Quick migration (``--quick``): save the VM's state to the shared volume, hand the VM
    #: over, restore it on the destination (see ``migration/quick.py``).
    quick: bool = False
    #: Moves of one group run at most ``group_limit`` at once on the source, in the order they
    #: were asked (a drain: ``drain:<node>``; see ``migration/slots.py``).
    queue_group: str | None = Field(default=None, max_length=100)
    group_limit: int = Field(default=0, ge=0, le=64)
    #: TLS on the migration stream and the NBD disk copy, with the hosts' certificates.
    #: Turning it off (``--no-encryption``) is allowed only over a migration network both
    #: hosts mark trusted (``ferry host migration-network add CIDR --trusted``).
    encryption: bool = True


class MoveRequest(BaseModel):
    """``POST /v1/vms/{name}/move``."""

    destination: Destination
    options: MoveOptions = Field(default_factory=MoveOptions)
    what_if: bool = False
    #: A move ticket the user signed (``migration.authentication = delegated``; see
    #: ``security/tickets.py``). The source checks it and hands it to the destination.
    ticket: SignedTicket | None = None


class CheckResult(BaseModel):
    """One pre-move check."""

    name: str
    ok: bool
    message: str
    fix: str | None = None


class IncomingRequest(BaseModel):
    """Source → destination: prepare to receive this VM."""

    job_id: str
    source: str
    source_version: str
    spec: VMSpec
    options: MoveOptions
    transport: Transport
    streams: int
    postcopy: bool
    cpu_vendor: str
    cpu_flags: list[str]
    dry_run: bool = False
    #: The user's move ticket, forwarded by the source (None: a cluster move or local start).
    ticket: SignedTicket | None = None


class IncomingPlan(BaseModel):
    """Destination → source: what it prepared (or would prepare, for a dry run)."""

    job_id: str
    mode: Literal["shared", "shared-nothing", "mixed"]
    storage_dir: str
    disks: dict[str, str]  # disk name -> destination file
    mirrored: list[str]  # disks whose bytes must be copied
    candidates: list[str]  # destination addresses, in the order of its migration networks
    port: int = 0
    nbd_port: int = 0
    #: The destination QEMU expects TLS on the stream and the NBD export.
    encrypted: bool = True
    checks: list[CheckResult] = Field(default_factory=list)


class PhaseRecord(BaseModel):
    """Timing of one phase."""

    phase: Phase
    started_at: float
    ended_at: float | None = None

    @property
    def seconds(self) -> float | None:
        """How long the phase took."""
        return None if self.ended_at is None else self.ended_at - self.started_at


class Progress(BaseModel):
    """Live figures of the memory and storage copy."""

    ram_total: int = 0
    ram_transferred: int = 0
    ram_remaining: int = 0
    disk_total: int = 0
    disk_transferred: int = 0
    passes: int = 0
    mbps: float = 0.0
    dirty_rate_bps: float = 0.0
    #: Auto-converge's current CPU throttle (QEMU's ``cpu-throttle-percentage``), if any.
    throttle_pct: int | None = None
    expected_downtime_ms: int | None = None
    eta_s: float | None = None


class JobError(BaseModel):
    """Why a job failed: the phase, the cause and what to do."""

    phase: Phase
    message: str
    fix: str | None = None


class StorageMoveRequest(BaseModel):
    """``POST /v1/vms/{name}/move-storage``: where the VM's files go (all on this host).

    ``to`` places every file (configuration, disks, saved state) in one directory; the per-item
    fields override it for one kind of file. Paths are absolute or relative to the first
    storage root, and must stay under the host's storage roots.
    """

    to: PathText | None = None
    #: disk name -> new file (or an existing directory: the file keeps its name).
    disk_map: dict[ShortText, PathText] = Field(default_factory=dict, max_length=MAX_ITEMS)
    config_to: PathText | None = None
    state_to: PathText | None = None
    #: Cap on the copy rate (Mbit/s); none by default.
    bandwidth_mbps: int | None = Field(default=None, ge=1)


class FileMove(BaseModel):
    """One file of a storage move: from, to, and (for disks) its name and format."""

    kind: Literal["disk", "config", "state"]
    src: str
    dst: str
    disk: str | None = None
    fmt: str | None = None
    size_bytes: int = 0


class StoragePlan(BaseModel):
    """What a storage move changes: the files that move and the VM's new directories."""

    live: bool
    storage_dir: str
    new_storage_dir: str
    new_state_dir: str | None
    files: list[FileMove] = Field(default_factory=list)

    @property
    def disks(self) -> list[FileMove]:
        """The disk files that move."""
        return [f for f in self.files if f.kind == "disk"]


class Job(BaseModel):
    """A move job, as stored on the source host and shown by ``ferry migration show``."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    kind: Literal["live", "storage", "quick"] = "live"
    vm: str
    source: str
    destination: str
    destination_url: str
    options: MoveOptions
    #: The user's move ticket, passed to the destination; never stored or shown.
    ticket: SignedTicket | None = Field(default=None, exclude=True)
    state: JobState = JobState.QUEUED
    phase: Phase = Phase.QUEUED
    queue_position: int | None = None
    mode: str | None = None
    transport: str | None = None
    address: str | None = None
    postcopy_used: bool = False
    #: Whether the migration stream and disk copy were TLS-encrypted (None: not started).
    encrypted: bool | None = None
    #: The guest was paused when the move began (the destination keeps it paused).
    was_paused: bool = False
    #: QEMU finished but the destination agent has not taken the VM over yet: the source
    #: QEMU stays paused until ``ferry migration complete ID`` succeeds.
    handover_pending: bool = False
    escalations: list[str] = Field(default_factory=list)
    phases: list[PhaseRecord] = Field(default_factory=list)
    progress: Progress = Field(default_factory=Progress)
    checks: list[CheckResult] = Field(default_factory=list)
    qemu_downtime_ms: int | None = None
    qemu_stats: dict[str, Any] = Field(default_factory=dict)
    first_pass_bytes: int | None = None
    total_s: float | None = None
    bytes_sent: int = 0
    error: JobError | None = None
    created_at: float = Field(default_factory=time.time)
    finished_at: float | None = None
    #: Storage moves only: the files that move and where the VM's directories end up.
    storage: StoragePlan | None = None
    #: Quick moves: the guest's outage, from pausing it on the source to it running again on
    #: the destination (None when the VM was not running).
    downtime_ms: int | None = None
    #: Quick moves: the VM's state when the move began (what a rollback restores) and its
    #: folder on the shared volume (where a rollback imports it from).
    vm_state: str | None = None
    storage_dir: str | None = None

    @field_validator("phases")
    @classmethod
    def _ordered(cls, v: list[PhaseRecord]) -> list[PhaseRecord]:
        return sorted(v, key=lambda p: p.started_at)

    def summary(self) -> dict[str, Any]:
        """The one-line view used by listings."""
        return {
            "id": self.id,
            "kind": self.kind,
            "vm": self.vm,
            "source": self.source,
            "destination": self.destination,
            "state": self.state.value,
            "phase": self.phase.value,
            "mode": self.mode,
            "encrypted": self.encrypted,
            "total_s": self.total_s,
            "qemu_downtime_ms": self.qemu_downtime_ms,
            "downtime_ms": self.downtime_ms,
            "created_at": self.created_at,
        }
