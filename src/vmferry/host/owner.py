"""Who owns a VM whose files sit on a shared volume: the owner record beside ``vm.json``.

A VM on a shared volume can be registered by any host that sees the volume (``ferry vm
import``). So that it never runs on two hosts, its folder holds a small record (``owner.json``)
naming the host that owns it. A host writes it when it creates, receives or imports the VM, and
marks it *released* when it hands the VM over without deleting its files (quick migration). A
host importing the VM trusts the record together with two facts it checks itself: what the
owner's agent says (when it answers) and QEMU's image locks (a running QEMU holds a write lock on
every disk it has open).
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from vmferry.errors import ConflictError, HostError
from vmferry.fsio import replace_file

OWNER_FILE = "owner.json"

#: VM states in which its QEMU may hold the disks (the VM counts as running somewhere).
LIVE_STATES = frozenset(
    {
        "starting", "running", "paused", "shutting-down", "stopping", "saving", "restoring",
        "migrating", "incoming", "handover-pending",
    }
)  # fmt: skip


class OwnerRecord(BaseModel):
    """``owner.json``: the host that owns the VM, and whether it let the VM go."""

    host: str
    uuid: str
    #: The owner's agent URL as a client reached it (when known), to ask it about the VM.
    url: str | None = None
    #: The owner handed the VM over and keeps no instance of it; any host may import it.
    released: bool = False
    #: The saved state (if any) was taken from a paused VM: restore it paused.
    saved_paused: bool = False
    updated_at: float = Field(default_factory=time.time)


def read_owner(storage_dir: Path) -> OwnerRecord | None:
    """The owner record of the VM in ``storage_dir`` (None if there is none or it is unreadable)."""
    path = storage_dir / OWNER_FILE
    try:
        return OwnerRecord.model_validate_json(path.read_text())
    except (OSError, ValueError):
        return None


def write_owner(storage_dir: Path, record: OwnerRecord) -> None:
    """Write the owner record atomically."""
    replace_file(storage_dir / OWNER_FILE, record.model_dump_json(indent=2).encode(), 0o644)


@dataclass(frozen=True)
class OwnerView:
    """What the owning host's agent said about the VM.

    ``reachable`` False: it did not answer. ``state`` None: it has no VM of that name (or
    one with another uuid).
    """

    reachable: bool
    state: str | None = None


def check_owner(
    record: OwnerRecord | None, here: str, name: str, view: OwnerView | None
) -> str | None:
    """Refuse (ConflictError) while another host owns the VM and still has it registered.

    A running instance there is the danger this guards against; an owner that still lists the
    VM (even off) would run or delete it later, so it must hand it over first (``ferry move
    --quick``). Returns a note when the decision rests on QEMU's image locks alone (no record,
    or an owner that does not answer), else None.
    """
    if record is None:
        return "no owner record: relying on QEMU's image locks"
    if record.host == here or record.released:
        return None
    if view is None or not view.reachable:
        return f"owner {record.host} did not answer: relying on QEMU's image locks"
    if view.state is None:
        return None  # the owner no longer has it: a stale record
    if view.state in LIVE_STATES:
        raise ConflictError(
            f"VM {name!r} is {view.state} on {record.host}, which owns it",
            field="path",
            fix=f"stop it there first (ferry --host {record.host} vm stop {name}), or move it "
            f"here: ferry --host {record.host} move {name} --to {here} --quick",
        )
    raise ConflictError(
        f"VM {name!r} is registered on {record.host} ({view.state}), which owns it",
        field="path",
        fix=f"hand it over: ferry --host {record.host} move {name} --to {here} --quick",
    )


def image_lock_holder(disk: Path) -> str | None:
    """Why ``disk`` cannot be opened (another process holds its lock), or None when it can.

    ``qemu-img info`` without ``-U`` asks for QEMU's shared image lock; it fails while a QEMU
    anywhere has the image open for writing (on a shared volume, through the file system's locks).
    """
    if not disk.exists():
        raise HostError(f"disk {disk} does not exist", fix="check the VM's files on the volume")
    done = subprocess.run(
        ["qemu-img", "info", "--output=json", str(disk)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if done.returncode == 0:
        return None
    text = done.stderr.strip()
    if "lock" in text.lower():
        return text.splitlines()[0] if text else "locked"
    raise HostError(f"qemu-img cannot read {disk}: {text}", fix="check the disk image")
