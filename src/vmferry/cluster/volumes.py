"""Shared volumes: a path every node sees and can write to (checked through each node's agent).

The agent that receives ``volume add`` writes a marker file with a random token into the
path; then every member's agent (itself included) is asked to read that marker (it sees the
*same* volume, not a local folder of the same name), to write, fsync and delete a file of its
own (it can write), and to confirm the path is inside its storage roots (VMs may live there).
The marker is removed whatever the outcome; the volume is recorded only if every node passed.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, Field

from vmferry.cluster.store import ClusterState, ClusterStore, VolumeRecord, check_volume_path
from vmferry.errors import FerryError, RefusedError
from vmferry.validation import PathText

MARKER = ".vmferry-volume-check-"


class VolumeCheck(BaseModel):
    """``POST /v1/cluster/volume-check``: what one node is asked to verify."""

    path: PathText
    #: Hex (secrets.token_hex): it becomes part of a file name, so no "/" nor "..".
    token: str = Field(pattern=r"^[0-9a-f]{1,64}$")


class VolumeCheckResult(BaseModel):
    """One node's answer."""

    node: str
    ok: bool
    message: str
    fix: str | None = None


class NodeApi(Protocol):
    """How the cluster layer asks another node's agent (implemented in ``api/``)."""

    async def volume_check(self, url: str, check: VolumeCheck) -> VolumeCheckResult: ...


def check_here(node: str, check: VolumeCheck, storage_roots: list[str]) -> VolumeCheckResult:
    """This node's part of a volume check (blocking: file I/O)."""
    path = Path(check_volume_path(check.path))

    def fail(msg: str, fix: str) -> VolumeCheckResult:
        return VolumeCheckResult(node=node, ok=False, message=msg, fix=fix)

    if not path.is_dir():
        return fail(f"{path} does not exist on {node}", f"mount the shared volume at {path}")
    marker = path / f"{MARKER}{check.token}"
    try:
        seen = marker.read_text().strip()
    except OSError:
        seen = None
    if seen != check.token:
        return fail(
            f"{path} on {node} is not the same volume (the check's marker file is not there)",
            f"mount the same shared file system at {path} on {node}",
        )
    if not any(path.is_relative_to(r) for r in storage_roots):  # before writing anything
        return fail(
            f"{path} is not inside a storage root of {node}",
            f"add it on {node}: ferry --host {node} host set --add-storage-root {path}",
        )
    probe = path / f"{MARKER}{check.token}-{node}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, node.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        return fail(
            f"{node} cannot write to {path}: {exc.strerror}",
            f"make {path} writable by root on {node}",
        )
    return VolumeCheckResult(node=node, ok=True, message="sees the volume and can write to it")


async def add_volume(
    store: ClusterStore, cluster: str, path: str, api: NodeApi
) -> tuple[ClusterState, list[VolumeCheckResult]]:
    """Check ``path`` on every member (each must be up) and record it; RefusedError if not."""
    path = check_volume_path(path)
    state = await asyncio.to_thread(store.load, cluster)
    if path in state.volumes:
        raise RefusedError(f"{path} is already a shared volume of {cluster!r}", field="path")
    down = sorted(n for n in state.nodes if n not in state.alive)
    if down:
        raise RefusedError(
            f"node(s) {', '.join(down)} hold no lease, so their agents cannot check {path}",
            field="path",
            fix="start ferryd on them (or let them leave the cluster), then try again",
        )
    token = secrets.token_hex(8)
    marker = Path(path) / f"{MARKER}{token}"
    try:
        await asyncio.to_thread(marker.write_text, token + "\n")
    except OSError as exc:
        raise RefusedError(
            f"cannot write to {path} here: {exc.strerror}",
            field="path",
            fix="mount the shared volume there and make it writable",
        ) from exc
    try:
        results = await asyncio.gather(
            *(_ask(api, name, rec.url, VolumeCheck(path=path, token=token))
              for name, rec in sorted(state.nodes.items()))
        )  # fmt: skip
    finally:
        marker.unlink(missing_ok=True)
    failed = [r for r in results if not r.ok]
    if failed:
        raise RefusedError(
            "; ".join(r.message for r in failed),
            field="path",
            fix="; ".join(r.fix for r in failed if r.fix) or None,
        )
    rec = VolumeRecord(path=path, checked={r.node: r.message for r in results})
    return await asyncio.to_thread(store.add_volume, cluster, rec), list(results)


async def _ask(api: NodeApi, node: str, url: str, check: VolumeCheck) -> VolumeCheckResult:
    try:
        return await api.volume_check(url, check)
    except FerryError as exc:
        return VolumeCheckResult(
            node=node, ok=False, message=f"{node}'s agent did not answer: {exc.message}",
            fix=exc.fix,
        )  # fmt: skip


def volume_summary(state: ClusterState) -> list[dict[str, Any]]:
    """The volumes for ``status`` and ``volume list``."""
    return [
        {"path": v.path, "added_at": v.added_at, "checked": sorted(v.checked)}
        for v in sorted(state.volumes.values(), key=lambda v: v.path)
    ]
