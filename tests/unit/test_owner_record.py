"""The owner record and ``vm import``: a VM on a shared volume is registered by one host at a time.

Two hosts (real host layer, temporary state directories) see one shared folder; no QEMU is
started. Image locks are exercised with ``qemu-io`` holding a disk open, as a running QEMU would.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from vmferry.api import create_app
from vmferry.errors import ConflictError
from vmferry.host import Host
from vmferry.host.owner import (
    OWNER_FILE,
    OwnerRecord,
    OwnerView,
    check_owner,
    image_lock_holder,
    read_owner,
    write_owner,
)
from vmferry.migration.model import CheckResult, Destination
from vmferry.migration.quick import QuickMoves, QuickRequest

NO_IMAGE = (Path("/nonexistent"), Path("/nonexistent"))


# -- the decision ----------------------------------------------------------------------------
def _rec(**kw: Any) -> OwnerRecord:
    return OwnerRecord(host=str(kw.pop("host", "h1")), uuid="u1", **kw)


def test_no_record_relies_on_locks() -> None:
    assert "image locks" in (check_owner(None, "h2", "vm1", None) or "")


def test_own_or_released_record_is_fine() -> None:
    assert check_owner(_rec(host="h2"), "h2", "vm1", None) is None
    assert check_owner(_rec(released=True), "h2", "vm1", None) is None


def test_unreachable_owner_relies_on_locks() -> None:
    note = check_owner(_rec(), "h2", "vm1", OwnerView(reachable=False))
    assert note is not None and "h1 did not answer" in note


def test_owner_without_the_vm_is_a_stale_record() -> None:
    assert check_owner(_rec(), "h2", "vm1", OwnerView(reachable=True, state=None)) is None


@pytest.mark.parametrize("state", ["running", "paused", "saving", "migrating"])
def test_owner_running_it_refuses(state: str) -> None:
    with pytest.raises(ConflictError) as ei:
        check_owner(_rec(), "h2", "vm1", OwnerView(reachable=True, state=state))
    assert f"is {state} on h1" in ei.value.message and ei.value.field == "path"
    assert "--quick" in (ei.value.fix or "")


@pytest.mark.parametrize("state", ["off", "saved"])
def test_owner_still_listing_it_refuses(state: str) -> None:
    with pytest.raises(ConflictError) as ei:
        check_owner(_rec(), "h2", "vm1", OwnerView(reachable=True, state=state))
    assert f"registered on h1 ({state})" in ei.value.message
    assert "ferry --host h1 move vm1 --to h2 --quick" in (ei.value.fix or "")


def test_record_round_trip_and_garbage(tmp_path: Path) -> None:
    assert read_owner(tmp_path) is None
    write_owner(tmp_path, _rec(saved_paused=True))
    got = read_owner(tmp_path)
    assert got is not None and got.host == "h1" and got.saved_paused
    (tmp_path / OWNER_FILE).write_text("{not json")
    assert read_owner(tmp_path) is None


# -- image locks -----------------------------------------------------------------------------
needs_qemu_io = pytest.mark.skipif(
    shutil.which("qemu-io") is None or shutil.which("qemu-img") is None, reason="needs qemu-utils"
)


@needs_qemu_io
def test_image_lock_detected(tmp_path: Path) -> None:
    disk = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True)
    assert image_lock_holder(disk) is None
    holder = _hold(disk)
    try:
        why = image_lock_holder(disk)
        assert why is not None and "lock" in why, why
    finally:
        _release(holder)
    assert image_lock_holder(disk) is None, "the lock outlived qemu-io"


def _hold(disk: Path) -> subprocess.Popen[bytes]:
    """qemu-io with the image open read-write (it waits on stdin), as a running QEMU holds it.

    It is asked to read a sector and its answer awaited, so the image is surely open; probing
    the lock before that would itself hold the lock qemu-io needs to open the image.
    """
    p = subprocess.Popen(["qemu-io", "-f", "qcow2", str(disk)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write(b"read 0 512\n")
    p.stdin.flush()
    deadline = time.monotonic() + 30
    out = b""
    while b"512/512 bytes" not in out:
        assert p.poll() is None, f"qemu-io exited with {p.returncode}: {out!r}"
        assert time.monotonic() < deadline, f"qemu-io did not open the image: {out!r}"
        ready, _, _ = select.select([p.stdout], [], [], 0.5)
        if ready:
            out += os.read(p.stdout.fileno(), 4096)
    return p


def _release(p: subprocess.Popen[bytes]) -> None:
    assert p.stdin is not None
    p.stdin.close()
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


# -- two hosts, one shared folder ------------------------------------------------------------
def _host(tmp_path: Path, name: str, shared: Path) -> Host:
    local = tmp_path / name / "storage"
    local.mkdir(parents=True)
    h = Host(tmp_path / name / "state", image=lambda: NO_IMAGE)
    # No virtual switches: the app would create their bridges in this network namespace.
    h.settings = h.settings.model_copy(
        update={"name": name, "storage_roots": [str(local), str(shared)]}
    )
    return h


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    p = tmp_path / "shared"
    p.mkdir()
    return p


@pytest.fixture
def hosts(tmp_path: Path, shared: Path) -> Iterator[tuple[TestClient, TestClient, Host, Host]]:
    h1, h2 = _host(tmp_path, "h1", shared), _host(tmp_path, "h2", shared)
    with (
        TestClient(create_app(h1, require_client_cert=False)) as a,
        TestClient(create_app(h2, require_client_cert=False)) as b,
    ):
        yield a, b, h1, h2


def _tree(p: Path) -> dict[str, bytes]:
    """Every file under ``p`` but the audit log (which records refusals too)."""
    return {
        str(x.relative_to(p)): x.read_bytes()
        for x in sorted(p.rglob("*"))
        if x.is_file()
        and "audit" not in x.relative_to(p).parts
        and not x.name.startswith("events.db")
    }


def _create(api: TestClient, shared: Path, name: str = "vm1") -> dict[str, Any]:
    r = api.post("/v1/vms", json={"name": name, "memory_mib": 64, "disks": [{"size_mib": 8}],
                                  "storage_dir": str(shared / name)})  # fmt: skip
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_create_records_the_owner(hosts: Any, shared: Path) -> None:
    a, _, _, _ = hosts
    vm = _create(a, shared)
    rec = read_owner(Path(vm["storage_dir"]))
    assert rec is not None and rec.host == "h1" and rec.uuid == vm["uuid"] and not rec.released
    assert a.delete("/v1/vms/vm1").status_code == 204
    assert not (shared / "vm1").exists(), "delete left the owner record (and the folder) behind"


def test_import_refusals_change_nothing(hosts: Any, shared: Path, tmp_path: Path) -> None:
    a, b, _, h2 = hosts
    _create(a, shared)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    before = _tree(shared), _tree(h2.state_dir)
    cases = [
        (str(outside), 400, "path", "outside this host's storage roots"),
        (str(shared / "vm1" / ".." / "vm1"), 400, "path", "'..'"),
        (str(shared / "nothing-here"), 400, "path", "no VM configuration"),
    ]
    for path, status, field, words in cases:
        r = b.post("/v1/vms/import", json={"path": path})
        assert r.status_code == status, (path, r.text)
        err = r.json()["error"]
        assert err["field"] == field and words in err["message"] and err["fix"], err
    assert (_tree(shared), _tree(h2.state_dir)) == before
    assert b.get("/v1/vms").json() == []


def test_import_after_hand_over(hosts: Any, shared: Path) -> None:
    a, b, h1, _ = hosts
    vm = _create(a, shared)
    asyncio.run(h1.vms.hand_over("vm1"))
    assert a.get("/v1/vms").json() == []
    rec = read_owner(shared / "vm1")
    assert rec is not None and rec.released and rec.host == "h1"
    r = b.post("/v1/vms/import", json={"path": str(shared / "vm1")})
    assert r.status_code == 201, r.text
    got = r.json()
    assert got["state"] == "off" and got["host"] == "h2" and got["uuid"] == vm["uuid"]
    assert [v["name"] for v in b.get("/v1/vms").json()] == ["vm1"]
    rec = read_owner(shared / "vm1")
    assert rec is not None and rec.host == "h2" and not rec.released
    assert rec.url == "http://testserver"
    # Registered once: a second import (by folder or by vm.json) is refused.
    r = b.post("/v1/vms/import", json={"path": str(shared / "vm1" / "vm.json")})
    assert r.status_code == 409 and "already registered" in r.json()["error"]["message"]


def test_import_of_a_saved_vm_is_restorable_paused(hosts: Any, shared: Path) -> None:
    a, b, h1, _ = hosts
    _create(a, shared)
    asyncio.run(h1.vms.hand_over("vm1"))
    (shared / "vm1" / "saved.vmstate").write_bytes(b"state")
    rec = read_owner(shared / "vm1")
    assert rec is not None
    write_owner(shared / "vm1", rec.model_copy(update={"saved_paused": True}))
    r = b.post("/v1/vms/import", json={"path": str(shared / "vm1")})
    assert r.status_code == 201 and r.json()["state"] == "saved", r.text
    h2 = b.app.state.quick.vms
    run = next((h2.state_dir / "run").iterdir()) / "runtime.json"
    assert json.loads(run.read_text())["saved_paused"] is True


class FakeOwner:
    """An owner agent that reports the VM in a given state."""

    def __init__(self, vm: dict[str, Any] | None) -> None:
        self._vm = vm
        self.asked: list[str] = []

    async def vm(self, name: str) -> dict[str, Any] | None:
        self.asked.append(name)
        return self._vm

    async def quick_checks(self, req: QuickRequest) -> list[CheckResult]:
        raise NotImplementedError

    async def quick_receive(self, req: QuickRequest) -> dict[str, Any]:
        raise NotImplementedError

    async def close(self) -> None:
        return None


def test_import_refused_while_the_owner_runs_it(hosts: Any, shared: Path) -> None:
    a, b, _, h2 = hosts
    vm = _create(a, shared)
    owner = FakeOwner({"name": "vm1", "uuid": vm["uuid"], "state": "running"})
    quick: QuickMoves = b.app.state.quick
    urls: list[Destination] = []

    def factory(d: Destination) -> FakeOwner:
        urls.append(d)
        return owner

    quick._peers = factory
    before = _tree(shared), _tree(h2.state_dir)
    with pytest.raises(ConflictError) as ei:
        asyncio.run(quick.import_vm(str(shared / "vm1"), {"h1": "https://h1.example:7443"}))
    assert "is running on h1" in ei.value.message
    assert owner.asked == ["vm1"] and urls[0].url == "https://h1.example:7443"
    assert (_tree(shared), _tree(h2.state_dir)) == before
    # The owner no longer has it (a stale record): the import goes ahead.
    quick._peers = lambda d: FakeOwner(None)
    info = asyncio.run(quick.import_vm(str(shared / "vm1"), {"h1": "https://h1.example:7443"}))
    assert info.state.value == "off"


@needs_qemu_io
def test_import_refused_while_a_qemu_holds_the_disk(hosts: Any, shared: Path) -> None:
    a, b, _, h2 = hosts
    vm = _create(a, shared)
    before = _tree(shared), _tree(h2.state_dir)
    holder = _hold(Path(vm["storage_dir"]) / "disk0.qcow2")
    try:
        # No peers: the owner cannot be asked, so QEMU's image lock decides.
        r = b.post("/v1/vms/import", json={"path": str(shared / "vm1")})
    finally:
        _release(holder)
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert "image locked" in err["message"] and "disk0" in err["message"] and err["fix"]
    assert (_tree(shared), _tree(h2.state_dir)) == before


def test_quick_checks_name_the_disk_not_shared(hosts: Any, shared: Path, tmp_path: Path) -> None:
    a, b, h1, _ = hosts
    r = a.post("/v1/vms", json={"name": "local1", "memory_mib": 64, "disks": [{"size_mib": 8}]})
    assert r.status_code == 201, r.text
    spec = h1.vms.spec("local1")
    req = QuickRequest(job_id="j1", source="h1", source_version="0.1.0", spec=spec,
                       state="running", cpu_vendor="x", cpu_flags=[])  # fmt: skip
    quick: QuickMoves = b.app.state.quick
    failed = {c.name: c for c in quick.checks(req) if not c.ok}
    assert "shared-disk:disk0" in failed, failed
    assert "disk disk0" in failed["shared-disk:disk0"].message
    assert "a volume both hosts see" in (failed["shared-disk:disk0"].fix or "")
    assert "shared-config" in failed and "shared-state" in failed
    # On the shared volume every file check passes.
    _create(a, shared, "vm2")
    req2 = req.model_copy(update={"spec": h1.vms.spec("vm2")})
    names = {c.name for c in quick.checks(req2) if not c.ok}
    assert not names & {"shared-config", "shared-disk:disk0", "shared-state"}, names
