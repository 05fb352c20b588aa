"""SIMULATED hypervisor driver for the cluster scale benchmark: no QEMU, no guests, bench only.

What is real and what is simulated:

* real: one etcd server on 127.0.0.1 (Debian's ``etcd``, plain http, random free ports, a
  temporary data directory; stopped by its own pid), the cluster's keys written through
  :class:`ClusterStore` / :class:`ClusterVMStore`, 64 real :class:`ClusterMember` lease loops
  (renew, campaign, read their clustered VMs, fencing watchdog) and the real failover
  :class:`Controller` on every node (it acts on the leader only), all in this one process;
* simulated: the hypervisor. :class:`SimulatedVMs` stands in for each node's ``VMManager``
  (what ``ClusterMember`` calls on it), :class:`SimulatedAgents` answers the controller's
  ``AgentCalls`` (``host_info``, ``vm``, ``import_vm``, ``start_vm``) and the service's
  ``AgentApi`` from memory, instantly. No VM ever runs.

Requests to etcd are counted at the client: :func:`count_requests` wraps ``Etcd._post``,
through which every request of the cluster layer goes (one HTTP request to etcd's gateway).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.cluster_place import NODE_MIB, build
from vmferry.cluster.controller import Controller
from vmferry.cluster.etcd import Etcd
from vmferry.cluster.member import ClusterMember
from vmferry.cluster.store import ClusteredVM, ClusterStore, ClusterVMStore, NodeRecord
from vmferry.cluster.validate import NodeFacts
from vmferry.cluster.volumes import VolumeCheck, VolumeCheckResult
from vmferry.errors import NotFoundError
from vmferry.host.events import EventLog
from vmferry.host.settings import HostSettings
from vmferry.host.vms import VMState

log = logging.getLogger("bench.simcluster")

LABEL = "SIMULATED hypervisor driver: no QEMU guests"
CLUSTER = "scale"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the real etcd ----------------------------------------------------------------------------
class LoopbackEtcd:
    """One real etcd member on 127.0.0.1 (plain http), stopped by its recorded pid only."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "etcd-data"
        self.client_port, self.peer_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The etcd process id (None when not started)."""
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 30.0) -> None:
        """Start etcd and wait until it has a leader."""
        etcd = shutil.which("etcd")
        if etcd is None:
            raise RuntimeError("etcd is not installed (Debian: apt-get install etcd-server)")
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            etcd, "--name", "scale", "--data-dir", str(self.data),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"scale={peer}", "--log-level", "error", "--logger", "zap",
        ]  # fmt: skip
        with open(self.base / "etcd.log", "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        client = Etcd([self.url], timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if all(h["ok"] and h["leader"] not in ("", "0") for h in client.health()):
                    return
                time.sleep(0.1)
        finally:
            client.close()
        raise RuntimeError(f"etcd did not start within {timeout:.0f} s (see {self.base}/etcd.log)")

    def cpu_s(self) -> float:
        """CPU seconds (user + system) etcd has used so far."""
        if self.proc is None:
            return 0.0
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def metrics(self) -> dict[str, float]:
        """etcd's own counters we report: gRPC calls started per method, proposals applied."""
        import requests

        text = requests.get(f"{self.url}/metrics", timeout=5).text
        out: dict[str, float] = collections.defaultdict(float)
        for line in text.splitlines():
            if line.startswith("grpc_server_started_total{"):
                method = line.split('grpc_method="', 1)[1].split('"', 1)[0]
                out[f"grpc_started:{method}"] += float(line.rsplit(" ", 1)[1])
            elif line.startswith("etcd_server_proposals_applied_total "):
                out["proposals_applied"] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("etcd_disk_wal_fsync_duration_seconds_sum "):
                out["wal_fsync_s"] = float(line.rsplit(" ", 1)[1])
            elif line.startswith("etcd_disk_wal_fsync_duration_seconds_count "):
                out["wal_fsyncs"] = float(line.rsplit(" ", 1)[1])
        return dict(out)

    def stop(self) -> None:
        """Kill etcd (by its own pid) and remove its data."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        shutil.rmtree(self.data, ignore_errors=True)


# -- counting requests ---------------------------------------------------------------------------
class RequestCounter:
    """Requests to etcd made by this process, per gateway path (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_path: collections.Counter[str] = collections.Counter()

    def add(self, path: str) -> None:
        with self._lock:
            self.by_path[path] += 1

    def snapshot(self) -> collections.Counter[str]:
        """A copy of the counts so far."""
        with self._lock:
            return collections.Counter(self.by_path)


@contextmanager
def count_requests() -> Iterator[RequestCounter]:
    """Count every request the cluster layer sends to etcd while the block runs."""
    counter = RequestCounter()
    real = Etcd._post

    def counted(self: Etcd, path: str, body: dict[str, Any], budget: float | None = None) -> Any:
        kind = " count-only" if body.get("count_only") else " prefix" if "range_end" in body else ""
        counter.add(path + kind if path == "/kv/range" else path)
        return real(self, path, body, budget)

    Etcd._post = counted  # type: ignore[method-assign]
    try:
        yield counter
    finally:
        Etcd._post = real  # type: ignore[method-assign]


class FenceCounter(logging.Handler):
    """Counts the nodes' self-fencing log records (a tick that starved past TTL/2)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "fenced itself" in record.getMessage():
            self.count += 1


# -- the simulated hypervisor -------------------------------------------------------------------
class SimulatedAgents:
    """SIMULATED agents of every node: the VMs each runs, answered from memory, instantly.

    Implements the controller's ``AgentCalls`` and what ``ClusterService.status`` could ask
    (``AgentApi``); node URLs are ``https://<node>:8443`` as :func:`bench.cluster_place.build`
    writes them. Nothing is contacted.
    """

    def __init__(self, records: dict[str, ClusteredVM]) -> None:
        self.records = records  # the clustered VMs as first written (memory, uuid, folder)
        self.by_folder = {v.storage_dir: v for v in records.values() if v.storage_dir}
        self.running: dict[str, dict[str, str]] = collections.defaultdict(dict)  # node→vm→state
        for vm in records.values():
            self.running[vm.node][vm.name] = "running"
        self.calls: collections.Counter[str] = collections.Counter()

    @staticmethod
    def node_of(url: str) -> str:
        """The node name in a simulated agent URL."""
        return url.split("://", 1)[1].split(":", 1)[0]

    def power_off_node(self, node: str) -> int:
        """The node died (its QEMUs are gone, as after self-fencing); how many VMs it ran."""
        return len(self.running.pop(node, {}))

    def free_mib(self, node: str) -> int:
        """Free memory for VMs on ``node``: its size less every VM it has."""
        return NODE_MIB - sum(self.records[n].memory_mib for n in self.running.get(node, {}))

    async def host_info(self, url: str) -> dict[str, Any]:
        self.calls["host_info"] += 1
        return {"memory_free_for_vms_mib": self.free_mib(self.node_of(url))}

    async def vm(self, url: str, name: str) -> dict[str, Any] | None:
        self.calls["vm"] += 1
        state = self.running.get(self.node_of(url), {}).get(name)
        if state is None:
            return None
        return {"name": name, "uuid": self.records[name].uuid, "state": state}

    async def import_vm(self, url: str, path: str) -> dict[str, Any]:
        self.calls["import_vm"] += 1
        rec = self.by_folder.get(path)
        if rec is None:
            raise NotFoundError(f"simulated agent: no VM folder {path}")
        self.running[self.node_of(url)][rec.name] = "off"
        return {"name": rec.name, "uuid": rec.uuid, "state": "off"}

    async def start_vm(self, url: str, name: str) -> dict[str, Any]:
        self.calls["start_vm"] += 1
        node = self.node_of(url)
        if name not in self.running.get(node, {}):
            raise NotFoundError(f"simulated agent {node}: no VM {name}")
        self.running[node][name] = "running"
        return {"name": name, "state": "running"}

    async def start_planned_move(
        self,
        url: str,
        vm: str,
        to: str,
        quick: bool,
        reason: str,
        group: str | None = None,
        group_limit: int = 0,
    ) -> dict[str, Any]:
        raise NotImplementedError("simulated agents make no planned moves")

    async def migration(self, url: str, job_id: str) -> dict[str, Any]:
        raise NotImplementedError("simulated agents run no migrations")

    async def cancel_migration(self, url: str, job_id: str) -> dict[str, Any]:
        raise NotImplementedError("simulated agents run no migrations")

    # AgentApi (ClusterService): status() asks no agent; the others are not used by the bench
    async def member(self, url: str) -> dict[str, Any]:
        return {"node": self.node_of(url), "etcd_endpoints": []}

    async def volume_check(self, url: str, check: VolumeCheck) -> VolumeCheckResult:
        raise NotImplementedError("simulated agents check no volumes")

    async def facts(self, url: str) -> NodeFacts:
        raise NotImplementedError("simulated agents report no facts")

    async def reach(self, url: str, addresses: list[str]) -> dict[str, bool]:
        raise NotImplementedError("simulated agents reach nothing")


class SimulatedVMs:
    """SIMULATED ``VMManager`` of one node: just what :class:`ClusterMember` calls on it."""

    def __init__(self, agents: SimulatedAgents, node: str) -> None:
        self.agents, self.node = agents, node
        self.fenced: list[str] = []
        self.events = EventLog(Path(":memory:"), node)  # the SIMULATED node's event log

    def state(self, name: str) -> VMState:
        got = self.agents.running.get(self.node, {}).get(name)
        return VMState.RUNNING if got == "running" else VMState.OFF

    async def fence(self, name: str) -> bool:
        self.fenced.append(name)
        return self.agents.running.get(self.node, {}).pop(name, None) is not None

    def process(self, name: str) -> None:
        return None  # no QEMU: the fence guard is never armed

    def forget_taken_over(self, name: str) -> str | None:
        self.agents.running.get(self.node, {}).pop(name, None)
        return None


class SimulatedMember(ClusterMember):
    """A real ClusterMember on a SIMULATED node, with its tick durations recorded.

    ``full_reads`` switches back to the read path before the scale work (every tick reads
    every clustered-VM record), to measure what it cost.
    """

    full_reads = False

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.ticks: list[tuple[float, float]] = []  # (start monotonic, seconds)

    async def _tick(self, t_send: float) -> None:
        try:
            await super()._tick(t_send)
        finally:
            self.ticks.append((t_send, time.monotonic() - t_send))

    async def _read_clustered(self, store: ClusterStore, cluster: str) -> list[str] | None:
        if not self.full_reads:
            return await super()._read_clustered(store, cluster)
        mine = await asyncio.to_thread(store.clustered_vms, cluster, self.node)
        return sorted(v.name for v in mine)


def _constant(settings: HostSettings) -> Callable[[], HostSettings]:
    return lambda: settings


# -- the simulated cluster ------------------------------------------------------------------------
class SimCluster:
    """64 SIMULATED nodes with 4,000 clustered VMs on one real etcd (see the module docstring)."""

    def __init__(self, base: Path | None = None, ttl: int = 6) -> None:
        self.base = base or Path(tempfile.mkdtemp(prefix="vmferry-simcluster-"))
        self.ttl = ttl
        self.etcd = LoopbackEtcd(self.base)
        state, _free = build()
        self.nodes = sorted(state.nodes)
        self.records = dict(state.vms)
        self.urls = {n: r.url for n, r in state.nodes.items()}
        self.agents = SimulatedAgents(self.records)
        self.members: dict[str, SimulatedMember] = {}
        self.controllers: dict[str, Controller] = {}
        self.settings: dict[str, HostSettings] = {}
        self.dead: list[str] = []

    def client(self, timeout: float = 5.0) -> Etcd:
        """A new etcd client for the bench's own reads."""
        return Etcd([self.etcd.url], timeout=timeout)

    def populate(self, workers: int = 8) -> dict[str, float]:
        """Create the cluster (one node), join the 63 others, add the 4,000 clustered VMs,
        through the real store API; seconds each step took."""
        t0 = time.monotonic()
        etcd = self.client()
        try:
            store = ClusterVMStore(etcd)
            store.create(CLUSTER, [NodeRecord(name=self.nodes[0], url=self.urls[self.nodes[0]])])
            for n in self.nodes[1:]:
                store.join(CLUSTER, NodeRecord(name=n, url=self.urls[n]))
        finally:
            etcd.close()
        t1 = time.monotonic()
        vms = sorted(self.records.values(), key=lambda v: v.name)
        chunks = [vms[i::workers] for i in range(workers)]

        def add(chunk: list[ClusteredVM]) -> None:
            c = self.client()
            try:
                s = ClusterVMStore(c)
                for vm in chunk:
                    s.add_vm(CLUSTER, vm)
            finally:
                c.close()

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(add, chunks))
        return {"create_join_s": t1 - t0, "add_vms_s": time.monotonic() - t1}

    def _settings(self, node: str) -> HostSettings:
        return HostSettings.model_validate({
            "name": node, "accelerator": "tcg",
            "cluster": {"etcd": {"endpoints": [self.etcd.url]}, "lease_ttl_s": self.ttl},
        })  # fmt: skip

    async def start_nodes(self, per_second: float = 4.0) -> None:
        """Start every node's real ClusterMember and Controller, ``per_second`` at a time (their
        first read of every VM record all at once would starve this one process)."""
        for i, n in enumerate(self.nodes):
            if i and per_second > 0:
                await asyncio.sleep(1.0 / per_second)
            st = self._settings(n)
            self.settings[n] = st
            state_dir = self.base / "nodes" / n
            state_dir.mkdir(parents=True, exist_ok=True)
            getter = _constant(st)
            m = SimulatedMember(SimulatedVMs(self.agents, n), getter, state_dir)
            self.members[n], self.controllers[n] = m, Controller(m, getter, self.agents)
            m.start()
        log.info("simulated driver: %d nodes started", len(self.nodes))

    def start_controllers(self) -> None:
        """Start every node's Controller (only the leader's acts). Started once every node is
        up, so that the leader does not fail over the VMs of nodes still starting."""
        for n in self.nodes:
            self.controllers[n].start()

    def leader(self) -> str | None:
        """The leader as the members see it (when they agree)."""
        seen = {m.leader for n, m in self.members.items() if n not in self.dead}
        return seen.pop() if len(seen) == 1 else None

    async def wait_ready(self, timeout: float = 60.0) -> float:
        """Until every node holds a lease, all agree on a leader and have read their VMs."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.leader() is not None and all(
                m.lease and m._vms_rev > 0 for m in self.members.values()
            ):
                return time.monotonic() - t0
            await asyncio.sleep(0.2)
        raise RuntimeError(f"simulated cluster not ready within {timeout:.0f} s")

    async def kill(self, node: str) -> None:
        """The node dies: its lease loop and controller stop (nothing is revoked), its
        simulated VMs are gone (as its self-fencing would have done)."""
        self.dead.append(node)
        await self.members[node].stop()
        await self.controllers[node].stop()
        self.agents.power_off_node(node)

    async def stop(self) -> None:
        """Stop every node, close their clients, kill etcd, remove the temporary files."""
        for n in self.nodes:
            if n in self.members:
                await self.members[n].stop()
                await self.controllers[n].stop()
                etcd = self.members[n]._etcd
                if etcd is not None:
                    etcd.close()
        self.etcd.stop()
        shutil.rmtree(self.base, ignore_errors=True)
