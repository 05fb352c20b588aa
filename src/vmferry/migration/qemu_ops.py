"""QMP recipes for moves: capabilities, parameters, mirrors. Both ends use them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from vmferry.qemu.qmp import QmpError, QmpSession
from vmferry.qemu.stream import UNLIMITED_BPS
from vmferry.qemu.tls import Endpoint, authz_object, creds_object


async def set_capabilities(
    q: QmpSession,
    transport: str,
    streams: int,
    postcopy: bool,
    *,
    incoming: bool,
    pause_before_switchover: bool = False,
    auto_converge: bool = False,
    xbzrle_cache: int | None = None,
) -> None:
    """Set the migration capabilities and stream parameters; both ends must agree.

    Every capability turned on here is listed in ``qemu/stream.MOVE_CAPABILITIES`` (a save
    turns them off again).

    ``xbzrle_cache`` (source only): delta-encode re-sent pages against a cache of this many
    bytes (the destination decodes them without being told)."""
    multifd = transport in ("compression", "multichannel")
    caps: dict[str, bool] = {
        "events": True,
        "multifd": multifd,
        # Post-copy and multifd do not combine in QEMU 7.2.
        "postcopy-ram": postcopy and not multifd,
        # A second channel for the pages the guest faults on, so they do not queue behind the
        # bulk stream: shortens the guest's stalls after the switch to post-copy.
        "postcopy-preempt": postcopy and not multifd,
    }
    if not incoming:
        caps["pause-before-switchover"] = pause_before_switchover
        caps["auto-converge"] = auto_converge
        caps["xbzrle"] = xbzrle_cache is not None and not multifd
    await q.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": k, "state": v} for k, v in caps.items()]},
    )
    if caps.get("xbzrle"):
        await q.execute("migrate-set-parameters", {"xbzrle-cache-size": xbzrle_cache})
    if multifd:
        params: dict[str, Any] = {
            "multifd-channels": streams if transport == "multichannel" else max(2, streams),
            "multifd-compression": "zstd" if transport == "compression" else "none",
        }
        if transport == "compression":
            params["multifd-zstd-level"] = 1
        await q.execute("migrate-set-parameters", params)


async def set_stream_limits(q: QmpSession, bandwidth_mbps: int | None, downtime_ms: int) -> None:
    """Bandwidth cap (none unless asked: QEMU's default is never left in place) and downtime."""
    bps = UNLIMITED_BPS if bandwidth_mbps is None else bandwidth_mbps * 1_000_000 // 8
    await q.execute(
        "migrate-set-parameters",
        {
            "max-bandwidth": bps,
            "downtime-limit": downtime_ms,
            "announce-initial": 20,
            # QEMU's own estimate (from the bytes on the wire) until the engine knows better
            # (migration/converge.py: XBZRLE).
            "avail-switchover-bandwidth": 0,
        },
    )


#: The id of the ``tls-creds-x509`` object a move adds to a QEMU (one per QEMU at a time).
TLS_CREDS_ID = "vmferry-move-tls"
#: The id of the ``authz-simple`` object naming the one client a destination QEMU accepts.
TLS_AUTHZ_ID = "vmferry-move-authz"


async def enable_tls(
    q: QmpSession,
    creds_dir: Path,
    endpoint: Endpoint,
    hostname: str | None = None,
    peer_identity: str | None = None,
) -> None:
    """Load the host's TLS credentials into QEMU and encrypt the migration stream with them.

    The object is (re)created for every move, so renewed certificates take effect without a
    VM restart. ``hostname`` (source side) is the name the destination's certificate must
    carry; the server side requires a client certificate from the same CA and, with
    ``peer_identity`` (the source host's distinguished name), that exact certificate subject:
    QEMU then refuses every other certificate of the CA (``tls-authz``).
    """
    for obj in (TLS_CREDS_ID, TLS_AUTHZ_ID):
        with contextlib.suppress(QmpError):
            await q.execute("object-del", {"id": obj})
    await q.execute("object-add", creds_object(TLS_CREDS_ID, creds_dir, endpoint))
    params: dict[str, Any] = {"tls-creds": TLS_CREDS_ID, "tls-hostname": hostname or ""}
    if peer_identity is not None:
        await q.execute("object-add", authz_object(TLS_AUTHZ_ID, peer_identity))
        params["tls-authz"] = TLS_AUTHZ_ID
    await q.execute("migrate-set-parameters", params)


async def disable_tls(q: QmpSession) -> None:
    """A clear-text migration stream (``--no-encryption``); drops a move's credentials and
    its ``authz`` object."""
    await q.execute(
        "migrate-set-parameters", {"tls-creds": "", "tls-hostname": "", "tls-authz": ""}
    )
    for obj in (TLS_CREDS_ID, TLS_AUTHZ_ID):
        with contextlib.suppress(QmpError):
            await q.execute("object-del", {"id": obj})


def nbd_server_args(host: str, port: int, tls: bool, authz: bool = False) -> dict[str, Any]:
    """``nbd-server-start`` arguments (destination); with ``tls`` clients must use TLS, with
    ``authz`` too their certificate must be the one :func:`enable_tls` admitted."""
    args: dict[str, Any] = {"addr": {"type": "inet", "data": {"host": host, "port": str(port)}}}
    if tls:
        args["tls-creds"] = TLS_CREDS_ID
        if authz:
            args["tls-authz"] = TLS_AUTHZ_ID
    return args


def nbd_client_args(
    node: str, export: str, host: str, port: int, tls: bool, hostname: str | None = None
) -> dict[str, Any]:
    """``blockdev-add`` arguments of an NBD client node (source), over TLS when asked."""
    args: dict[str, Any] = {
        "driver": "nbd", "node-name": node, "export": export,
        "server": {"type": "inet", "host": host, "port": str(port)},
    }  # fmt: skip
    if tls:
        args["tls-creds"] = TLS_CREDS_ID
        if hostname:
            args["tls-hostname"] = hostname
    return args


async def wait_block_jobs_ready(
    q: QmpSession, jobs: list[str], timeout: float, on_progress: Any = None
) -> None:
    """Wait until every mirror job is in sync (``ready``)."""
    deadline = time.monotonic() + timeout
    while True:
        info = {j["device"]: j for j in await q.execute("query-block-jobs")}
        missing = [j for j in jobs if j not in info]
        if missing:
            raise QmpError(f"mirror job(s) {', '.join(missing)} vanished")
        if on_progress is not None:
            on_progress(sum(int(j["offset"]) for j in info.values()),
                        sum(int(j["len"]) for j in info.values()))  # fmt: skip
        if all(info[j].get("ready") for j in jobs):
            return
        ended = [j for j in jobs if info[j].get("status") == "concluded"]
        if ended:
            detail = info[ended[0]].get("error") or "it ended before reaching sync"
            raise QmpError(f"mirror job {ended[0]} failed: {detail}")
        if time.monotonic() > deadline:
            raise QmpError(f"mirrors did not reach sync within {timeout:.0f} s")
        await asyncio.sleep(0.1)


def disk_device(disk: str) -> str:
    """The qdev id of a VM disk's virtio-blk device (stable across pivots)."""
    return f"vd-drv-{disk}"


async def disk_node(q: QmpSession, disk: str) -> str:
    """The block node a VM disk's device uses now.

    It starts as ``drv-<disk>`` (the command line) and changes with every storage-move pivot,
    so mirrors look it up through the device instead of assuming the name.
    """
    dev = f"/{disk_device(disk)}/"
    for entry in await q.execute("query-block"):
        node = (entry.get("inserted") or {}).get("node-name")
        if node and dev in f"{entry.get('qdev', '')}/":
            return str(node)
    return f"drv-{disk}"


async def start_mirror(
    q: QmpSession,
    job_id: str,
    device: str,
    target: str,
    *,
    speed_bps: int | None = None,
    auto_dismiss: bool = True,
) -> None:
    """Mirror node ``device`` into node ``target`` (full copy; guest writes go to both)."""
    args: dict[str, Any] = {
        "job-id": job_id, "device": device, "target": target, "sync": "full",
        # Once in sync, every guest write is acknowledged only after it reached the target,
        # so the copy converges under any write rate.
        "copy-mode": "write-blocking", "auto-dismiss": auto_dismiss,
    }  # fmt: skip
    if speed_bps:
        args["speed"] = speed_bps
    await q.execute("blockdev-mirror", args)


async def mirror_until_ready(
    q: QmpSession,
    mirrors: list[tuple[str, str, str]],
    *,
    timeout: float,
    on_progress: Any = None,
    speed_bps: int | None = None,
    auto_dismiss: bool = True,
) -> None:
    """Start one mirror per ``(job_id, device node, target node)`` and wait until all are in
    sync. Used by live migration (NBD targets) and storage moves (local file targets)."""
    for job_id, device, target in mirrors:
        await start_mirror(q, job_id, device, target, speed_bps=speed_bps,
                           auto_dismiss=auto_dismiss)  # fmt: skip
    await wait_block_jobs_ready(q, [m[0] for m in mirrors], timeout, on_progress)
