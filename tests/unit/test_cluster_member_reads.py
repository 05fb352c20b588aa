"""A node keeps its clustered-VM list from what changed in etcd, not by reading every record."""

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

from vmferry.cluster.etcd import Etcd
from vmferry.cluster.member import ClusterMember
from vmferry.cluster.store import (
    ClusteredVM,
    ClusterEvent,
    ClusterStore,
    ClusterVMStore,
    Keys,
    NodeRecord,
)
from vmferry.host.settings import HostSettings
from vmferry.host.vms import VMState

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd (etcd-server)")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = tmp_path_factory.mktemp("etcd") / "data"
    url, peer = f"http://127.0.0.1:{_port()}", f"http://127.0.0.1:{_port()}"
    proc = subprocess.Popen(
        ["etcd", "--name", "r1", "--data-dir", str(data), "--listen-client-urls", url,
         "--advertise-client-urls", url, "--listen-peer-urls", peer,
         "--initial-advertise-peer-urls", peer, "--initial-cluster", f"r1={peer}",
         "--log-level", "error", "--logger", "zap"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = Etcd([url], timeout=0.5)
        deadline = time.monotonic() + 20
        while not all(h["ok"] and h["leader"] not in ("", "0") for h in client.health()):
            assert time.monotonic() < deadline, "loopback etcd did not start"
            time.sleep(0.1)
        client.close()
        yield url
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def store(etcd_url: str) -> Iterator[ClusterStore]:
    etcd = Etcd([etcd_url], timeout=2.0)
    st = ClusterStore(etcd)
    st.create("c1", [NodeRecord(name=n, url=f"https://{n}:7443") for n in ("a", "b")])
    yield st
    etcd._post("/kv/deleterange", {"key": "AA==", "range_end": "AA=="})  # every key
    etcd.close()


def test_vm_records_since_returns_what_changed(store: ClusterStore) -> None:
    store.set_clustered_vm("c1", ClusteredVM(name="vm1", node="a"))
    store.set_clustered_vm("c1", ClusteredVM(name="vm2", node="b"))
    got, rev = store.vm_records_since("c1", 0, [])
    assert got is None and rev > 0  # never read: read everything
    assert store.vm_records_since("c1", rev, ["vm1"]) == ([], rev)  # nothing written since
    store.etcd.put(Keys("c1").fenced("b"), "{}")  # a write elsewhere: no VM record changed
    got, rev2 = store.vm_records_since("c1", rev, ["vm1"])
    assert got == [] and rev2 > rev
    store.set_clustered_vm("c1", ClusteredVM(name="vm2", node="a"))  # rewritten
    store.set_clustered_vm("c1", ClusteredVM(name="vm3", node="b"))  # added
    got, rev3 = store.vm_records_since("c1", rev2, ["vm1"])
    assert got is not None and rev3 > rev2
    assert sorted(kv.key.rsplit("/", 1)[1] for kv in got) == ["vm2", "vm3"]
    assert ClusteredVM.model_validate_json(got[0].value).node == "a"
    assert store.remove_clustered_vm("c1", "vm3")  # not held: nothing to re-read
    assert store.vm_records_since("c1", rev3, ["vm1", "vm2"])[0] == []
    assert store.remove_clustered_vm("c1", "vm1")  # held and deleted: etcd cannot say
    assert store.vm_records_since("c1", rev3, ["vm1", "vm2"])[0] is None


class NoVMs:
    """What ClusterMember uses of VMManager, for a node that runs none of its VMs."""

    def __init__(self) -> None:
        self.forgotten: list[str] = []

    def state(self, name: str) -> VMState:
        return VMState.OFF

    def process(self, name: str) -> None:
        return None

    def forget_taken_over(self, name: str) -> None:
        self.forgotten.append(name)


def test_member_reads_its_vms_only_when_a_record_changed(
    tmp_path: Path, store: ClusterStore, etcd_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.set_clustered_vm("c1", ClusteredVM(name="vm1", node="a"))
    reads: list[str] = []
    real = ClusterStore.clustered_vms

    def counted(self: ClusterStore, cluster: str, node: str | None = None) -> Any:
        reads.append(str(node))
        return real(self, cluster, node)

    monkeypatch.setattr(ClusterStore, "clustered_vms", counted)
    settings = HostSettings.model_validate(
        {"name": "a", "cluster": {"etcd": {"endpoints": [etcd_url]}, "lease_ttl_s": 6}}
    )
    vms = NoVMs()
    member = ClusterMember(vms, lambda: settings, tmp_path)  # type: ignore[arg-type]

    async def until(cond: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "condition not met in time"
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        member.start()
        try:
            await until(lambda: member.clustered == ["vm1"], 10)
            first = len(reads)
            await asyncio.sleep(3.2)  # three more ticks, nothing changed: no full read
            assert len(reads) == first
            store.set_clustered_vm("c1", ClusteredVM(name="vm9", node="b"))  # not a's
            await asyncio.sleep(2.2)
            assert len(reads) == first and member.clustered == ["vm1"]
            store.set_clustered_vm("c1", ClusteredVM(name="vm2", node="a"))  # given to a
            await until(lambda: member.clustered == ["vm1", "vm2"], 3)
            store.set_clustered_vm("c1", ClusteredVM(name="vm1", node="b"))  # taken over
            await until(lambda: member.clustered == ["vm2"], 3)
            assert vms.forgotten == ["vm1"]
            assert len(reads) == first  # both applied from the changed records alone
            assert store.remove_clustered_vm("c1", "vm2")  # a held VM deleted: read them all
            await until(lambda: member.clustered == [], 3)
            assert len(reads) == first + 1
        finally:
            await member.stop()
            if member._etcd is not None:
                member._etcd.close()

    asyncio.run(scenario())


def test_events_returns_the_last_ones_oldest_first(store: ClusterStore) -> None:
    vstore = ClusterVMStore(store.etcd)
    for i in range(5):
        vstore.add_event("c1", ClusterEvent(at=1000.0 + i, kind="added", vm=f"vm{i}"))
    assert [e.vm for e in vstore.events("c1", 3)] == ["vm2", "vm3", "vm4"]
    assert [e.vm for e in vstore.events("c1")] == [f"vm{i}" for i in range(5)]
    assert vstore.events("c1", 0) == []
