"""A node's life in its cluster: lease, leader election and self-fencing (runs in ferryd).

Timing (``cluster.lease_ttl_s`` = TTL, 4 s by default):

* every ``TICK`` (1 s) the agent renews its lease; each etcd request may take ``REQUEST_S``
  (1 s) per endpoint and a renewal tries the endpoints within ``RENEW_BUDGET_S`` (1.5 s);
* etcd expires the lease TTL seconds after the last renewal *it received*; the agent notes
  when it *sent* each renewal that succeeded, which is earlier, so its own deadline is safe;
* when no renewal sent in the last ``fence_after`` seconds succeeded — TTL - ``FENCE_MARGIN_S``
  (1 s), at least TTL/2: 3 s for the default TTL — the watchdog stops (SIGKILL) every clustered
  VM this node holds: at the latest ``fence_after`` + one watchdog period (0.2 s) + the kill
  after the last good renewal (the fence guard: + 0.5 s), before the lease can expire (TTL);
* the leader key is attached to the leader's lease: a dead leader's key goes with its lease
  and another node takes it on its next tick (leader moves within TTL + TICK).

The list of clustered VMs a node owns is kept up to date from etcd (every tick asks what changed
since its last look and applies that; it reads every record only when it must) and kept on disk
(``<state>/cluster-member.json``), because fencing happens exactly when etcd cannot be read.
A node that fenced itself does not start those VMs again when it reconnects. While it owns
running clustered VMs, the fence guard (:mod:`vmferry.cluster.guard`) enforces the same
deadline from outside the agent, so a killed or hung agent fences too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vmferry import __version__
from vmferry.cluster import guard
from vmferry.cluster.etcd import Etcd, EtcdUnavailable
from vmferry.cluster.store import (
    AliveRecord,
    ClusteredVM,
    ClusterStore,
    FenceRecord,
    Keys,
    holds,
)
from vmferry.errors import RefusedError
from vmferry.host.settings import HostSettings
from vmferry.host.vms import VMManager, VMState

log = logging.getLogger("vmferry.cluster")

TICK = 1.0
REQUEST_S = 1.0
RENEW_BUDGET_S = 1.5
WATCHDOG_S = 0.2
#: The fence happens this long before the lease can expire: the agent's watchdog kills within
#: WATCHDOG_S after the deadline, the fence guard within its PERIOD + GRACE (0.5 s).
FENCE_MARGIN_S = 1.0
STATE_FILE = "cluster-member.json"
#: A node re-reads its clustered VMs at least every REFRESH_TICKS..2*REFRESH_TICKS ticks even
#: when etcd reports no change (a safety net; changes are seen on the next tick).
REFRESH_TICKS = 60


def etcd_for(settings: HostSettings, timeout: float = REQUEST_S) -> Etcd:
    """An etcd client from the host's ``cluster.etcd`` setting (RefusedError if unset)."""
    cfg = settings.cluster.etcd
    if not cfg.endpoints:
        raise RefusedError(
            "this host is not connected to an etcd cluster",
            field="cluster.etcd.endpoints",
            fix="set cluster.etcd (endpoints, ca, cert, key) in the host's settings.json",
        )
    return Etcd(cfg.endpoints, cfg.ca, cfg.cert, cfg.key, timeout=timeout)


class EtcdCache:
    """One etcd client for the host's current ``cluster.etcd`` setting (a new one when the
    setting changes), for the agent's long-running loops."""

    def __init__(self, settings: Callable[[], HostSettings], timeout: float = 2.0) -> None:
        self._settings = settings
        self._timeout = timeout
        self._etcd: Etcd | None = None
        self._key: str | None = None

    def get(self) -> Etcd:
        """The client (RefusedError when the host has no etcd configured)."""
        key = self._settings().cluster.etcd.model_dump_json()
        if self._etcd is None or key != self._key:
            self.close()
            self._etcd = etcd_for(self._settings(), timeout=self._timeout)
            self._key = key
        return self._etcd

    def close(self) -> None:
        """Close the client, if any."""
        if self._etcd is not None:
            self._etcd.close()
            self._etcd = None


class ClusterMember:
    """Keeps this node's lease alive, campaigns for leader, fences when the lease is at risk."""

    def __init__(
        self, vms: VMManager, settings: Callable[[], HostSettings], state_dir: Path
    ) -> None:
        self.vms = vms
        self._settings = settings
        self.state_dir = state_dir
        self.path = state_dir / STATE_FILE
        self.cluster: str | None = None
        self.lease = 0
        self.leader: str | None = None
        self.clustered: list[str] = []
        self.last_ok = time.monotonic()  # send time of the last renewal that succeeded
        self.last_ok_wall: float | None = None
        self.fenced_at: float | None = None
        self.fenced_vms: list[str] = []
        self.fence_pending: FenceRecord | None = None
        self.last_error: str | None = None
        #: Since the agent started (read by the metrics): lease renewals and self-fences.
        self.renewals_ok = 0
        self.renewals_failed = 0
        self.fences = 0
        self._etcd: Etcd | None = None
        self._etcd_key: Any = None
        self._vms_rev = 0  # store revision the clustered list is current at (0: read it)
        self._ticks_since_read = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._load()

    # -- local record -------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        self.cluster = data.get("cluster")
        self.clustered = list(data.get("clustered", []))
        # The lease of the agent that ran before: renewed if still alive; if it expired, the
        # first renewal finds that out and fences (others may already have taken over).
        self.lease = int(data.get("lease", 0))

    def _persist(self) -> None:
        data = {"cluster": self.cluster, "clustered": self.clustered, "lease": self.lease}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    # -- settings -------------------------------------------------------------------------------
    @property
    def node(self) -> str:
        return self._settings().name

    @property
    def ttl(self) -> int:
        return self._settings().cluster.lease_ttl_s

    @property
    def fence_after(self) -> float:
        """Seconds without a good renewal after which the node fences itself: TTL less
        ``FENCE_MARGIN_S`` (time for the watchdog or the guard to kill), at least TTL / 2."""
        return max(self.ttl / 2, self.ttl - FENCE_MARGIN_S)

    def _client(self) -> Etcd | None:
        cfg = self._settings().cluster.etcd
        key = cfg.model_dump_json()
        if key != self._etcd_key:
            if self._etcd is not None:
                self._etcd.close()
            self._etcd = etcd_for(self._settings()) if cfg.endpoints else None
            self._etcd_key = key
        return self._etcd

    # -- tasks ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the lease loop and the fencing watchdog."""
        self.last_ok = time.monotonic()  # the node had no lease state before it started
        self._tasks = [
            asyncio.create_task(self._loop(), name="cluster-lease"),
            asyncio.create_task(self._watchdog(), name="cluster-watchdog"),
        ]

    async def stop(self) -> None:
        """Stop both tasks (the lease then expires on its own; VMs keep running)."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    async def _loop(self) -> None:
        while True:
            t0 = time.monotonic()
            try:
                await self._tick(t0)
                self.last_error = None
            except EtcdUnavailable as exc:
                if self.last_error is None:
                    log.warning("cluster: etcd unreachable: %s", exc)
                self.last_error = str(exc)
            except Exception as exc:  # the loop must never die
                log.exception("cluster: lease loop error")
                self.last_error = f"{exc.__class__.__name__}: {exc}"
            await asyncio.sleep(max(0.05, TICK - (time.monotonic() - t0)))

    async def _tick(self, t_send: float) -> None:
        etcd = self._client()
        if etcd is None:
            self.cluster, self.lease, self.leader = None, 0, None
            return
        store = ClusterStore(etcd)
        if self.lease:  # renew first: it is what keeps the VMs allowed to run
            lease = self.lease
            try:
                ttl = await asyncio.to_thread(etcd.keepalive, lease, RENEW_BUDGET_S)
            except EtcdUnavailable:
                self.renewals_failed += 1
                raise
            if lease != self.lease:
                pass  # the watchdog fenced and gave this lease up while the renewal waited
            elif ttl > 0:
                self.renewals_ok += 1
                self.last_ok, self.last_ok_wall = t_send, time.time()
            else:
                self.renewals_failed += 1
                log.error("cluster: lease %x had expired", self.lease)
                await self.fence("the lease had expired")
                self.lease = 0
        cluster = await asyncio.to_thread(store.cluster_of, self.node)
        if cluster != self.cluster:
            log.info("cluster: node %s is now in cluster %s", self.node, cluster)
            if self.lease:  # a lease belongs to one membership: start afresh
                with contextlib.suppress(EtcdUnavailable):
                    await asyncio.to_thread(etcd.revoke, self.lease)
                self.lease = 0
            self.cluster = cluster
            self._vms_rev = 0
            self.fenced_at, self.fenced_vms, self.fence_pending = None, [], None
            self._persist()
        if cluster is None:
            if self.lease:
                with contextlib.suppress(EtcdUnavailable):
                    await asyncio.to_thread(etcd.revoke, self.lease)
            self.lease, self.leader, self.clustered = 0, None, []
            self._persist()
            await asyncio.to_thread(self._feed_guard)  # nothing clustered: disarms a guard
            return
        if not self.lease:
            t_grant = time.monotonic()
            self.lease = await asyncio.to_thread(etcd.grant, self.ttl, RENEW_BUDGET_S)
            self.last_ok, self.last_ok_wall = t_grant, time.time()
            self._persist()
            await self._announce(store, cluster)
            log.info("cluster: node %s holds lease %x (ttl %d s)", self.node, self.lease, self.ttl)
        leader, has_alive = await asyncio.to_thread(store.campaign, cluster, self.node, self.lease)
        if not has_alive:  # e.g. deleted by a leave/join race: put it back under our lease
            await self._announce(store, cluster)
        new_leader = leader.node if leader else None
        if new_leader != self.leader:
            log.info("cluster %s: leader is %s", cluster, new_leader)
        self.leader = new_leader
        names = await self._read_clustered(store, cluster)
        if names is not None and names != self.clustered:
            # failed over while this node had no lease: the new owner has it (cluster/controller.py)
            for gone in sorted(set(self.clustered) - set(names)):
                await asyncio.to_thread(self.vms.forget_taken_over, gone)
            self.clustered = names
            self._persist()
        if self.fence_pending is not None:
            await asyncio.to_thread(store.record_fence, cluster, self.fence_pending)
            self.fence_pending = None
        await asyncio.to_thread(self._feed_guard)

    async def _read_clustered(self, store: ClusterStore, cluster: str) -> list[str] | None:
        """The clustered VMs this node holds (what ``store.clustered_vms`` returns for it), or
        None when no VM record changed since the last look.

        Each tick asks etcd only what changed (:meth:`ClusterStore.vm_records_since`: usually
        nothing, one count-only request) and applies the changed records to the list it has
        (:func:`holds`, the rule ``clustered_vms`` uses). It reads every record again when etcd
        cannot tell (first tick, a held VM deleted) and at least every ``REFRESH_TICKS``..2x
        ticks (spread per node) as a safety net.
        """
        changed, rev = await asyncio.to_thread(
            store.vm_records_since, cluster, self._vms_rev, self.clustered
        )
        self._ticks_since_read += 1
        due = REFRESH_TICKS + zlib.crc32(self.node.encode()) % REFRESH_TICKS
        if changed is not None and self._ticks_since_read < due:
            self._vms_rev = rev
            if not changed:
                return None
            prefix = Keys(cluster).vm("")
            recs = {kv.key[len(prefix) :]: ClusteredVM.model_validate_json(kv.value)
                    for kv in changed}  # fmt: skip
            mine = {n for n, v in recs.items() if holds(v, self.node)}
            return sorted((set(self.clustered) - recs.keys()) | mine)
        vms = await asyncio.to_thread(store.clustered_vms, cluster, self.node)
        # ``rev`` was taken before this read: a change in between shows up on the next tick
        self._vms_rev, self._ticks_since_read = rev, 0
        return sorted(v.name for v in vms)

    def _feed_guard(self) -> None:
        """Give the fence guard (cluster/guard.py) the new deadline and the QEMUs to stop."""
        vms = []
        for name in self.clustered:
            try:
                proc = self.vms.process(name)
            except Exception:  # not (or no longer) on this host
                continue
            if proc is not None and proc.alive():
                vms.append({"name": name, "pid": proc.pid, "start_time": proc.start_time})
        if vms:
            guard.write_orders(self.state_dir, self.last_ok + self.fence_after, vms)
            guard.ensure_guard(self.state_dir)
        elif guard.running_guard(self.state_dir) is not None:
            guard.write_orders(self.state_dir, 0.0, [])  # disarm: it exits

    async def _announce(self, store: ClusterStore, cluster: str) -> None:
        rec = AliveRecord(
            node=self.node, lease=self.lease, ttl_s=self.ttl, since=time.time(),
            version=__version__,
        )  # fmt: skip
        await asyncio.to_thread(store.announce, cluster, rec)

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_S)
            if self.cluster is None or (self.fenced_at is not None and not self.lease):
                continue
            if time.monotonic() - self.last_ok > self.fence_after:
                await self.fence(
                    f"no lease renewal for {time.monotonic() - self.last_ok:.1f} s "
                    f"(fence after {self.fence_after:.1f} s, lease ttl {self.ttl} s)"
                )
                self.lease = 0  # a new lease (and a new start) once etcd answers again

    # -- fencing --------------------------------------------------------------------------------
    async def fence(self, reason: str) -> list[str]:
        """Stop every clustered VM this node owns, at once; the VMs that were running."""
        stopped = []
        for name in self.clustered:
            try:
                if self.vms.state(name) in (VMState.OFF, VMState.SAVED):
                    continue
                await self.vms.fence(name)  # its QEMU may already be gone (the guard's kill)
                stopped.append(name)
            except Exception as exc:  # fence the others whatever happens to one
                log.error("cluster: fencing VM %s failed: %s", name, exc)
        earlier = self.fence_pending  # a fence etcd has not heard of yet (still cut off)
        if earlier is not None:  # one record of both: what the first stopped stays in it
            stopped = sorted(set(earlier.vms) | set(stopped))
            reason = f"{earlier.reason}; then {reason}"
        self.fenced_at = earlier.at if earlier is not None else time.time()
        self.fenced_vms = stopped
        self.fences += 1
        if guard.running_guard(self.state_dir) is not None:
            guard.write_orders(self.state_dir, 0.0, [])  # nothing left for it to stop
        log.error("cluster: node %s fenced itself (%s); stopped %s", self.node, reason, stopped)
        self.vms.events.record(
            "fenced", f"node {self.node} fenced itself ({reason}); stopped {stopped or 'no VM'}",
            level="error", data={"vms": stopped, "cluster": self.cluster},
        )  # fmt: skip
        if self.cluster is not None:
            self.fence_pending = FenceRecord(
                node=self.node, at=self.fenced_at, vms=stopped, reason=reason
            )
        return stopped

    # -- report ---------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """This node's view: cluster, lease, leader, last renewal, fencing."""
        since = time.monotonic() - self.last_ok
        return {
            "node": self.node,
            "cluster": self.cluster,
            "lease": f"{self.lease:x}" if self.lease else None,
            "lease_ttl_s": self.ttl,
            "fence_after_s": self.fence_after,
            "last_renewal_age_s": round(since, 2),
            "last_renewal_at": self.last_ok_wall,
            "leader": self.leader,
            "clustered_vms": self.clustered,
            "fenced_at": self.fenced_at,
            "fenced_vms": self.fenced_vms,
            "etcd_error": self.last_error,
        }
