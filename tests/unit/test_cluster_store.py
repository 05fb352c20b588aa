"""The cluster store and a node's lease/fencing logic against a real etcd on loopback."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmferry.cluster.etcd import Etcd, EtcdUnavailable
from vmferry.cluster.member import ClusterMember
from vmferry.cluster.store import (
    AliveRecord,
    ClusteredVM,
    ClusterStore,
    Keys,
    LeaderRecord,
    NodeRecord,
    VolumeRecord,
)
from vmferry.errors import ConflictError, NotFoundError, RefusedError
from vmferry.host.events import EventLog
from vmferry.host.settings import HostSettings
from vmferry.host.vms import VMState

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd (etcd-server)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LoopbackEtcd:
    """One etcd member on 127.0.0.1, stopped by its own Popen handle."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.client_port, self.peer_port = _free_port(), _free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start it; when its ports were taken meanwhile (another test run chose the same free
        ports), start again on new ones rather than talk to someone else's etcd."""
        for _ in range(3):
            if self._start_once():
                return
            self.client_port, self.peer_port = _free_port(), _free_port()
            self.url = f"http://127.0.0.1:{self.client_port}"
            shutil.rmtree(self.data, ignore_errors=True)  # bootstrapped with the old ports
        raise RuntimeError("loopback etcd did not start")

    def _start_once(self) -> bool:
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = [
            "etcd", "--name", "t1", "--data-dir", str(self.data),
            "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"t1={peer}", "--log-level", "error", "--logger", "zap",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        client = Etcd([self.url], timeout=0.5)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.proc.poll() is None:
            if all(h["ok"] and h["leader"] not in ("", "0") for h in client.health()):
                time.sleep(0.2)  # a process that could not bind its ports exits at once
                if self.proc.poll() is None:
                    return True
                break
            time.sleep(0.1)
        self.stop()
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackEtcd]:
    srv = LoopbackEtcd(tmp_path_factory.mktemp("etcd") / "data")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def store(etcd_server: LoopbackEtcd) -> Iterator[ClusterStore]:
    etcd = Etcd([etcd_server.url], timeout=2.0)
    yield ClusterStore(etcd)
    etcd._post("/kv/deleterange", {"key": "AA==", "range_end": "AA=="})  # every key
    etcd.close()


def _nodes(*names: str) -> list[NodeRecord]:
    return [NodeRecord(name=n, url=f"https://{n}:7443") for n in names]


def _all_keys(store: ClusterStore) -> dict[str, bytes]:
    return {kv.key: kv.value for kv in store.etcd.get_prefix("/vmferry/")}


def test_create_writes_cluster_nodes_and_index(store: ClusterStore) -> None:
    st = store.create("c1", _nodes("a", "b"))
    assert sorted(st.nodes) == ["a", "b"]
    assert store.cluster_of("a") == "c1" and store.cluster_of("b") == "c1"
    assert store.cluster_of("z") is None
    assert st.leader is None and not st.alive


def test_refused_create_changes_nothing(store: ClusterStore) -> None:
    store.create("c1", _nodes("a"))
    before = _all_keys(store)
    with pytest.raises(ConflictError) as e:
        store.create("c1", _nodes("x"))
    assert e.value.field == "name"
    with pytest.raises(ConflictError) as e:
        store.create("c2", _nodes("x", "a"))  # a is in c1 already
    assert e.value.field == "nodes" and "c1" in e.value.message
    with pytest.raises(RefusedError) as r:
        store.create("Bad Name", _nodes("y"))
    assert r.value.field == "name"
    with pytest.raises(RefusedError):
        store.create("c3", _nodes("y", "y"))
    assert _all_keys(store) == before


def test_join_leave_and_last_node(store: ClusterStore) -> None:
    store.create("c1", _nodes("a"))
    st = store.join("c1", NodeRecord(name="b", url="https://b:7443"))
    assert sorted(st.nodes) == ["a", "b"]
    with pytest.raises(ConflictError):
        store.join("c1", NodeRecord(name="b", url="https://b:7443"))
    with pytest.raises(NotFoundError):
        store.join("nope", NodeRecord(name="c", url="https://c:7443"))
    st = store.leave("c1", "b")
    assert sorted(st.nodes) == ["a"] and store.cluster_of("b") is None
    with pytest.raises(ConflictError) as e:
        store.leave("c1", "a")
    assert "destroy" in (e.value.fix or "")
    with pytest.raises(NotFoundError):
        store.leave("c1", "b")


def test_leave_refused_while_node_owns_clustered_vms(store: ClusterStore) -> None:
    store.create("c1", _nodes("a", "b"))
    store.set_clustered_vm("c1", ClusteredVM(name="vm1", node="b"))
    with pytest.raises(ConflictError) as e:
        store.leave("c1", "b")
    assert "vm1" in e.value.message
    with pytest.raises(RefusedError):
        store.set_clustered_vm("c1", ClusteredVM(name="vm2", node="zz"))  # not a member
    assert [v.name for v in store.clustered_vms("c1", "b")] == ["vm1"]
    assert store.clustered_vms("c1", "a") == []


def test_destroy(store: ClusterStore) -> None:
    store.create("c1", _nodes("a", "b"))
    store.set_clustered_vm("c1", ClusteredVM(name="vm1", node="a"))
    with pytest.raises(ConflictError):
        store.destroy("c1")
    assert store.remove_clustered_vm("c1", "vm1")
    assert store.destroy("c1") == ["a", "b"]
    assert _all_keys(store) == {}
    with pytest.raises(NotFoundError):
        store.load("c1")


def test_one_leader_bound_to_its_lease(store: ClusterStore) -> None:
    store.create("c1", _nodes("a", "b"))
    la, lb = store.etcd.grant(3), store.etcd.grant(30)
    assert _leader(store.campaign("c1", "a", la)) == ("a", False)
    assert _leader(store.campaign("c1", "b", lb)) == ("a", False)
    store.etcd.revoke(la)  # a's lease ends: its leader key goes with it
    assert store.announce("c1", AliveRecord(node="b", lease=lb, ttl_s=30, since=0))
    assert _leader(store.campaign("c1", "b", lb)) == ("b", True)
    # a node that is not a member can neither lead nor announce itself
    lz = store.etcd.grant(30)
    assert _leader(store.campaign("c1", "zz", lz)) == ("b", False)
    assert not store.announce("c1", AliveRecord(node="zz", lease=lz, ttl_s=30, since=0))


def _leader(result: tuple[LeaderRecord | None, bool]) -> tuple[str | None, bool]:
    leader, alive = result
    return (leader.node if leader else None, alive)


def test_volumes(store: ClusterStore) -> None:
    store.create("c1", _nodes("a"))
    st = store.add_volume("c1", VolumeRecord(path="/mnt/shared/"))
    assert list(st.volumes) == ["/mnt/shared"]
    with pytest.raises(ConflictError):
        store.add_volume("c1", VolumeRecord(path="/mnt/shared"))
    with pytest.raises(RefusedError) as e:
        store.add_volume("c1", VolumeRecord(path="relative/path"))
    assert e.value.field == "path"
    assert store.remove_volume("c1", "/mnt/shared").volumes == {}
    with pytest.raises(NotFoundError):
        store.remove_volume("c1", "/mnt/shared")


def test_unchanged_since_guards_destroy(store: ClusterStore) -> None:
    store.create("c1", _nodes("a"))
    st = store.load("c1")
    store.etcd.put(Keys("c1").vm("late"), ClusteredVM(name="late", node="a").model_dump_json())
    from vmferry.cluster.etcd import Txn

    txn = Txn().unchanged_since(Keys("c1").prefix, st.revision)
    ok, _ = store.etcd.txn(txn)
    assert not ok


def test_lease_grant_keepalive_revoke(store: ClusterStore) -> None:
    lease = store.etcd.grant(30)
    assert 0 < store.etcd.lease_ttl(lease) <= 30
    assert store.etcd.keepalive(lease) == 30
    store.etcd.revoke(lease)
    assert store.etcd.lease_ttl(lease) == -1
    assert store.etcd.keepalive(lease) == 0  # expired: the node must fence and start afresh


def test_unreachable_etcd_is_etcd_unavailable() -> None:
    etcd = Etcd([f"http://127.0.0.1:{_free_port()}"], timeout=0.3)
    with pytest.raises(EtcdUnavailable):
        etcd.get("/x")


# -- the node's lease loop and fencing --------------------------------------------------------
class FakeVMs:
    """Just what ClusterMember uses of VMManager: state and fence."""

    def __init__(self, running: set[str]) -> None:
        self.running = set(running)
        self.fenced: list[tuple[str, float]] = []
        self.events = EventLog(Path(":memory:"), "a")

    def state(self, name: str) -> VMState:
        return VMState.RUNNING if name in self.running else VMState.OFF

    async def fence(self, name: str) -> bool:
        self.fenced.append((name, time.monotonic()))
        was = name in self.running
        self.running.discard(name)
        return was


def _member(tmp_path: Path, url: str, vms: FakeVMs, ttl: int = 4) -> ClusterMember:
    settings = HostSettings.model_validate(
        {"name": "a", "cluster": {"etcd": {"endpoints": [url]}, "lease_ttl_s": ttl}}
    )
    return ClusterMember(vms, lambda: settings, tmp_path)  # type: ignore[arg-type]


async def _until(cond: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def test_a_second_fence_before_etcd_heard_of_the_first_keeps_what_the_first_stopped(
    tmp_path: Path,
) -> None:
    """The watchdog fences a cut-off node; a renewal that was waiting then finds the lease
    expired and fences again (nothing is left running): the record etcd gets once the node is
    back still names the VM the first fence stopped."""
    vms = FakeVMs({"vm1"})
    member = _member(tmp_path, "https://127.0.0.1:1", vms)
    member.cluster, member.clustered = "c1", ["vm1"]

    async def twice() -> None:
        assert await member.fence("no lease renewal for 3.1 s") == ["vm1"]
        first_at = member.fenced_at
        assert await member.fence("the lease had expired") == ["vm1"]
        assert member.fenced_at == first_at

    asyncio.run(twice())
    assert member.fenced_vms == ["vm1"]
    rec = member.fence_pending
    assert rec is not None and rec.vms == ["vm1"]
    assert rec.reason == "no lease renewal for 3.1 s; then the lease had expired"


def test_member_holds_lease_leads_and_fences_when_etcd_goes(
    tmp_path: Path, etcd_server: LoopbackEtcd
) -> None:
    etcd = Etcd([etcd_server.url], timeout=2.0)
    store = ClusterStore(etcd)
    store.create("c1", _nodes("a"))
    store.set_clustered_vm("c1", ClusteredVM(name="vm1", node="a"))
    vms = FakeVMs({"vm1", "other"})
    member = _member(tmp_path, etcd_server.url, vms)

    async def scenario() -> tuple[float, float]:
        member.start()
        try:
            await _until(lambda: member.lease and member.clustered == ["vm1"], 10)
            assert member.leader == "a"
            st = store.load("c1")
            assert "a" in st.alive and st.leader and st.leader.node == "a"
            await asyncio.sleep(2.5)  # renewals keep it alive past the TTL/2 fence point
            assert vms.fenced == []
            t_cut = time.monotonic()
            etcd_server.stop()
            await _until(lambda: vms.fenced, 10)
            return t_cut, vms.fenced[0][1]
        finally:
            await member.stop()

    try:
        t_cut, t_fenced = asyncio.run(scenario())
        # the last good renewal was at most one tick before the cut: fenced TTL - 1 s after it,
        # which is before the lease (TTL = 4 s) could expire
        assert t_fenced - t_cut < member.ttl - 0.5
        assert [n for n, _ in vms.fenced] == ["vm1"]  # only the clustered VM
        assert "other" in vms.running
        assert member.fenced_vms == ["vm1"]
        [ev] = vms.events.query(kind="fenced")  # and the agent's event log says so
        assert ev.level == "error" and ev.data["vms"] == ["vm1"]
        # the list survives on disk for an agent that restarts while etcd is gone
        again = _member(tmp_path, etcd_server.url, FakeVMs(set()))
        assert again.clustered == ["vm1"] and again.cluster == "c1"
    finally:
        etcd_server.start()
        etcd._post("/kv/deleterange", {"key": "AA==", "range_end": "AA=="})
        etcd.close()
