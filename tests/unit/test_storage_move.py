"""Storage moves: the plan's validation, and whole moves of stopped VMs through the API.

The plan tests are pure. The API tests use the real host layer on a temporary state directory
with qemu-img (no QEMU process): a stopped VM is copied, verified, switched and its old files
deleted; refusals and cancels change nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient

from vmferry.api import create_app
from vmferry.errors import (
    ConflictError,
    InsufficientResourcesError,
    OutsideStorageRootError,
    RefusedError,
)
from vmferry.host import Host
from vmferry.host.spec import DiskSpec, VMSpec, state_file
from vmferry.migration import storage
from vmferry.migration.model import StorageMoveRequest, StoragePlan
from vmferry.migration.storage import check_space, moved_spec, node_name, plan_move


def _tree(p: Path) -> list[str]:
    return sorted(str(x.relative_to(p)) for x in p.rglob("*"))


@pytest.fixture
def roots(tmp_path: Path) -> list[str]:
    a, b = tmp_path / "fast", tmp_path / "slow"
    a.mkdir()
    b.mkdir()
    return [str(a), str(b)]


def _spec(roots: list[str], state_dir: str | None = None) -> VMSpec:
    sdir = Path(roots[0]) / "vm1"
    sdir.mkdir(exist_ok=True)
    for f in ("disk0.qcow2", "data.qcow2", "vm.json"):
        (sdir / f).write_text("x")
    return VMSpec(name="vm1", memory_mib=64, vcpus=1, cpu_model="qemu64", storage_dir=str(sdir),
                  disks=[DiskSpec(name="disk0", file="disk0.qcow2", size_mib=8),
                         DiskSpec(name="data", file="data.qcow2", size_mib=16)],
                  state_dir=state_dir)  # fmt: skip


def _plan(spec: VMSpec, roots: list[str], live: bool = True, **kw: Any) -> StoragePlan:
    return plan_move(spec, StorageMoveRequest(**kw), roots, live=live, state_exists=False)


def test_to_moves_every_file(roots: list[str]) -> None:
    spec = _spec(roots)
    plan = _plan(spec, roots, to=f"{roots[1]}/vm1")
    dst = Path(roots[1], "vm1")
    assert {(f.kind, f.disk, f.dst) for f in plan.files} == {
        ("disk", "disk0", str(dst / "disk0.qcow2")),
        ("disk", "data", str(dst / "data.qcow2")),
        ("config", None, str(dst / "vm.json")),
    }
    assert plan.new_storage_dir == str(dst) and plan.new_state_dir is None
    new = moved_spec(spec, plan, {"disk0", "data"})
    assert new.storage_dir == str(dst) and [d.file for d in new.disks] == [
        "disk0.qcow2", "data.qcow2",
    ]  # fmt: skip


def test_relative_to_goes_under_first_root(roots: list[str]) -> None:
    plan = _plan(_spec(roots), roots, to="elsewhere")
    assert plan.new_storage_dir == str(Path(roots[0], "elsewhere"))


def test_disk_map_moves_one_disk_config_stays(roots: list[str]) -> None:
    spec = _spec(roots)
    target = Path(roots[1], "big", "data-new.qcow2")
    plan = _plan(spec, roots, disk_map={"data": str(target)})
    assert [(f.disk, f.dst) for f in plan.files] == [("data", str(target))]
    new = moved_spec(spec, plan, {"data"})
    assert new.storage_dir == spec.storage_dir
    # The moved disk is recorded relative to the VM's folder; it resolves to the new file.
    assert Path(os.path.normpath(Path(new.storage_dir) / new.disks[1].file)) == target
    assert new.disks[0].file == "disk0.qcow2"


def test_disk_map_to_a_folder_keeps_the_name(roots: list[str]) -> None:
    plan = _plan(_spec(roots), roots, disk_map={"disk0": f"{roots[1]}/"})
    assert plan.files[0].dst == str(Path(roots[1], "disk0.qcow2"))


def test_config_to_alone_keeps_disks_in_place(roots: list[str]) -> None:
    spec = _spec(roots)
    plan = _plan(spec, roots, config_to=f"{roots[1]}/cfg")
    assert [f.kind for f in plan.files] == ["config"]
    new = moved_spec(spec, plan, set())
    for d_old, d_new in zip(spec.disks, new.disks, strict=True):
        assert os.path.normpath(Path(new.storage_dir) / d_new.file) == os.path.normpath(
            Path(spec.storage_dir) / d_old.file
        )


def test_saved_state_follows_config_or_goes_its_own_way(roots: list[str]) -> None:
    spec = _spec(roots)
    state_file(spec).write_bytes(b"state")
    req = StorageMoveRequest(to=f"{roots[1]}/vm1", state_to=f"{roots[0]}/states")
    plan = plan_move(spec, req, roots, live=False, state_exists=True)
    (st,) = [f for f in plan.files if f.kind == "state"]
    assert st.dst == str(Path(roots[0], "states", "saved.vmstate")) and st.size_bytes == 5
    assert plan.new_state_dir == str(Path(roots[0], "states"))
    plan = plan_move(spec, StorageMoveRequest(config_to=f"{roots[1]}/c"), roots, live=False,
                     state_exists=True)  # fmt: skip
    (st,) = [f for f in plan.files if f.kind == "state"]
    assert st.dst == str(Path(roots[1], "c", "saved.vmstate")) and plan.new_state_dir is None


def test_running_vm_never_copies_a_state_file(roots: list[str]) -> None:
    spec = _spec(roots)
    plan = plan_move(spec, StorageMoveRequest(state_to=f"{roots[1]}/s"), roots, live=True,
                     state_exists=True)  # fmt: skip
    assert plan.files == [] and plan.new_state_dir == str(Path(roots[1], "s"))


@pytest.mark.parametrize(
    ("kw", "exc", "field", "words"),
    [
        ({}, RefusedError, "to", "nothing to move"),
        ({"disk_map": {"nope": "x.qcow2"}}, RefusedError, "disk_map.nope", "no disk named"),
        ({"to": "/etc/vm1"}, OutsideStorageRootError, "to", "outside"),
        ({"to": "../../x"}, OutsideStorageRootError, "to", ".."),
        ({"config_to": "/tmp/x"}, OutsideStorageRootError, "config_to", "outside"),
        ({"disk_map": {"data": "/var/data.qcow2"}}, OutsideStorageRootError, "disk_map.data",
         "outside"),
        ({"state_to": "/root"}, OutsideStorageRootError, "state_to", "outside"),
        ({"disk_map": {"data": "vm1/disk0.qcow2"}}, ConflictError, "disk_map.data",
         "already exists"),
        ({"disk_map": {"disk0": "same.qcow2", "data": "same.qcow2"}}, RefusedError,
         "disk_map.data", "also the target"),
        ({"to": "vm1"}, RefusedError, "to", "already is where asked"),
    ],
)  # fmt: skip
def test_refusals_name_the_field(
    roots: list[str], kw: dict[str, Any], exc: type[Exception], field: str, words: str
) -> None:
    spec = _spec(roots)
    with pytest.raises(exc) as err:
        _plan(spec, roots, **kw)
    assert getattr(err.value, "field", None) == field
    assert words in str(err.value) and getattr(err.value, "fix", None)


def test_target_inside_a_file_is_refused(roots: list[str]) -> None:
    Path(roots[1], "plain").write_text("not a folder")
    with pytest.raises(RefusedError, match="not a directory"):
        _plan(_spec(roots), roots, to=f"{roots[1]}/plain/vm1")


def test_symlinked_target_refused(roots: list[str], tmp_path: Path) -> None:
    Path(roots[1], "link").symlink_to(tmp_path)
    with pytest.raises(OutsideStorageRootError, match="symlink"):
        _plan(_spec(roots), roots, to=f"{roots[1]}/link/vm1")


def test_no_space_is_refused(roots: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(roots)
    plan = _plan(spec, roots, to=f"{roots[1]}/vm1")
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda _: SimpleNamespace(free=0))
    with pytest.raises(InsufficientResourcesError) as err:
        check_space(plan)
    assert err.value.field == "to"


def test_node_names_fit_qemu_limit() -> None:
    assert node_name("disk0", "abcdef123456", 0) == "drv-disk0-abcdef"
    long = node_name("d" * 32, "abcdef123456", 3)
    assert len(long) + 2 <= 31 and long.startswith("drv-")


# -- whole moves of stopped VMs through the API (qemu-img, no QEMU) ---------------------------
@pytest.fixture
def host(tmp_path: Path) -> Host:
    roots = []
    for r in ("a", "b"):
        (tmp_path / r).mkdir()
        roots.append(str(tmp_path / r))
    h = Host(tmp_path / "state", image=lambda: (Path("/nonexistent"), Path("/nonexistent")))
    h.settings = h.settings.model_copy(update={"storage_roots": roots, "name": "h1"})
    return h


@pytest.fixture
def api(host: Host) -> Iterator[TestClient]:
    with TestClient(create_app(host, require_client_cert=False)) as c:
        yield c


def _make_vm(api: TestClient, name: str = "vm1", size: int = 16, fill: int = 4) -> dict[str, Any]:
    r = api.post("/v1/vms", json={"name": name, "memory_mib": 64, "disks": [{"size_mib": size}]})
    assert r.status_code == 201, r.text
    vm: dict[str, Any] = r.json()
    disk = Path(vm["storage_dir"], vm["disks"][0]["file"])
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 1M {fill}M", str(disk)],
                   check=True, capture_output=True)  # fmt: skip
    return vm


def _wait(api: TestClient, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = api.get(f"/v1/migrations/{job_id}").json()
        if job["state"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"storage move {job_id} did not end")


def _read(path: Path) -> bytes:
    out = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 1M 4M", str(path)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, out.stdout
    return out.stdout.encode()


def test_stopped_vm_moves_with_verify(api: TestClient, host: Host, tmp_path: Path) -> None:
    vm = _make_vm(api)
    old_dir = Path(vm["storage_dir"])
    new_dir = tmp_path / "b" / "moved"
    r = api.post("/v1/vms/vm1/move-storage", json={"to": str(new_dir)})
    assert r.status_code == 202, r.text
    job = _wait(api, r.json()["id"])
    assert job["state"] == "completed", job["error"]
    assert job["kind"] == "storage" and job["mode"] == "offline"
    assert [p["phase"] for p in job["phases"]] == [
        "queued", "checks", "setup", "mirror", "switchover", "cleanup",
    ]  # fmt: skip
    assert not old_dir.exists(), "old folder left behind"
    shown = api.get("/v1/vms/vm1").json()
    assert shown["storage_dir"] == str(new_dir) and shown["state"] == "off"
    _read(new_dir / shown["disks"][0]["file"])
    assert json.loads((new_dir / "vm.json").read_text())["storage_dir"] == str(new_dir)
    assert json.loads((tmp_path / "state" / "vms.json").read_text())["vm1"] == str(
        new_dir / "vm.json"
    )
    listed = api.get("/v1/migrations").json()
    assert [(j["kind"], j["vm"], j["state"]) for j in listed] == [("storage", "vm1", "completed")]


def test_saved_vm_state_file_moves_to_its_own_folder(api: TestClient, host: Host, tmp_path: Path
                                                     ) -> None:  # fmt: skip
    vm = _make_vm(api)
    spec = host.vms.spec("vm1")
    state_file(spec).write_bytes(os.urandom(3 << 20))
    want = state_file(spec).read_bytes()
    run = host.vms._run_dir(spec) / "runtime.json"
    rt = json.loads(run.read_text())
    run.write_text(json.dumps({**rt, "expected": "saved"}))
    assert api.get("/v1/vms/vm1").json()["state"] == "saved"
    states = tmp_path / "b" / "states"
    r = api.post("/v1/vms/vm1/move-storage",
                 json={"disk_map": {"disk0": str(tmp_path / "b" / "d0.qcow2")},
                       "state_to": str(states)})  # fmt: skip
    job = _wait(api, r.json()["id"])
    assert job["state"] == "completed", job["error"]
    new = host.vms.spec("vm1")
    assert new.storage_dir == vm["storage_dir"] and new.state_dir == str(states)
    assert state_file(new) == states / "saved.vmstate" and state_file(new).read_bytes() == want
    assert not (Path(vm["storage_dir"]) / "saved.vmstate").exists()
    assert api.get("/v1/vms/vm1").json()["state"] == "saved"
    _read(tmp_path / "b" / "d0.qcow2")
    assert not (Path(vm["storage_dir"]) / "disk0.qcow2").exists()


def test_refused_move_changes_nothing(api: TestClient, tmp_path: Path) -> None:
    _make_vm(api)
    before = _tree(tmp_path)
    for body, field in (
        ({"to": "/etc/vm1"}, "to"),
        ({"disk_map": {"ghost": "x.qcow2"}}, "disk_map.ghost"),
        ({"disk_map": {"disk0": "/tmp/x.qcow2"}}, "disk_map.disk0"),
        ({}, "to"),
    ):
        r = api.post("/v1/vms/vm1/move-storage", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["field"] == field and r.json()["error"]["fix"]
    assert api.post("/v1/vms/ghost/move-storage", json={"to": "x"}).status_code == 404
    assert _tree(tmp_path) == before
    assert api.get("/v1/migrations").json() == []


def test_cancel_mid_copy_keeps_old_files(api: TestClient, host: Host, tmp_path: Path) -> None:
    vm = _make_vm(api, size=64, fill=48)
    before = _tree(tmp_path / "a")
    r = api.post("/v1/vms/vm1/move-storage",
                 json={"to": str(tmp_path / "b" / "vm1"), "bandwidth_mbps": 80})  # fmt: skip
    job_id = r.json()["id"]
    deadline = time.monotonic() + 20
    while api.get(f"/v1/migrations/{job_id}").json()["progress"]["disk_transferred"] == 0:
        assert time.monotonic() < deadline, "the copy never started"
        time.sleep(0.05)
    c = api.post(f"/v1/migrations/{job_id}/cancel")
    assert c.status_code == 200, c.text
    job = _wait(api, job_id)
    assert job["state"] == "cancelled" and job["error"]["phase"] == "mirror", job
    assert "rollback" in [p["phase"] for p in job["phases"]]
    assert _tree(tmp_path / "b") == [], "partial copies left behind"
    assert _tree(tmp_path / "a") == before
    assert host.vms.spec("vm1").storage_dir == vm["storage_dir"]
    _read(Path(vm["storage_dir"], "disk0.qcow2"))


def test_storage_setting_default_and_update(api: TestClient) -> None:
    assert api.get("/v1/host/settings").json()["storage"] == {"max_concurrent": 2}
    r = api.patch("/v1/host/settings", json={"storage": {"max_concurrent": 0}})
    assert r.status_code == 400
    r = api.patch("/v1/host/settings", json={"storage": {"max_concurrent": 1}})
    assert r.status_code == 200 and r.json()["storage"]["max_concurrent"] == 1


def test_queue_beyond_max_concurrent(api: TestClient, host: Host, tmp_path: Path) -> None:
    api.patch("/v1/host/settings", json={"storage": {"max_concurrent": 1}})
    _make_vm(api, "vm1", size=64, fill=32)
    _make_vm(api, "vm2")
    first = api.post(
        "/v1/vms/vm1/move-storage", json={"to": str(tmp_path / "b" / "vm1"), "bandwidth_mbps": 80}
    ).json()
    second = api.post("/v1/vms/vm2/move-storage", json={"to": str(tmp_path / "b" / "vm2")}).json()
    time.sleep(0.5)
    waiting = api.get(f"/v1/migrations/{second['id']}").json()
    assert waiting["state"] == "queued" and waiting["queue_position"] == 1, waiting
    assert _wait(api, first["id"])["state"] == "completed"
    assert _wait(api, second["id"])["state"] == "completed"
    # A second move of a VM that is already moving is refused.
    third = api.post("/v1/vms/vm1/move-storage", json={"to": str(tmp_path / "a" / "back")})
    assert third.status_code == 202
    again = api.post("/v1/vms/vm1/move-storage", json={"to": str(tmp_path / "a" / "other")})
    assert again.status_code == 409 and again.json()["error"]["field"] == "name"
    _wait(api, third.json()["id"])


# -- agent restart mid-move and the cancel rule --------------------------------------------
def _interrupted(host: Host, tmp_path: Path, phase: str) -> tuple[Any, Any, Any]:
    """A stopped VM's storage move as an earlier agent left it, in ``phase``."""
    import asyncio

    from vmferry.host.spec import VMCreate
    from vmferry.migration.engine import Moves
    from vmferry.migration.model import Job, JobState, MoveOptions, Phase
    from vmferry.migration.slots import Slots
    from vmferry.migration.storage import StorageMoves

    asyncio.run(host.vms.create(VMCreate(name="vm1", memory_mib=64, disks=[{"size_mib": 8}])))
    spec = host.vms.spec("vm1")
    plan = plan_move(spec, StorageMoveRequest(to=str(tmp_path / "b" / "vm1")),
                     host.settings.storage_roots, live=False, state_exists=False)  # fmt: skip
    moves = Moves(host.vms, lambda: host.settings, Slots(lambda: 2), host.state_dir,
                  lambda d: None)  # type: ignore[arg-type,return-value]  # fmt: skip
    job = Job(kind="storage", vm="vm1", source="h1", destination="h1", destination_url="",
              options=MoveOptions(), state=JobState.RUNNING, phase=Phase(phase),
              storage=plan)  # fmt: skip
    moves.jobs[job.id] = job
    return moves, StorageMoves(moves, Slots(lambda: 2)), job


def test_restart_mid_copy_removes_the_partial_copy(host: Host, tmp_path: Path) -> None:
    import asyncio

    moves, sm, job = _interrupted(host, tmp_path, "mirror")
    (disk,) = job.storage.disks
    Path(disk.dst).parent.mkdir(parents=True)
    Path(disk.dst).write_bytes(b"partial")
    asyncio.run(sm.recover())
    assert job.state.value == "failed" and "restarted" in job.error.message
    assert not Path(disk.dst).exists() and Path(disk.src).exists()
    assert host.vms.spec("vm1").storage_dir == job.storage.storage_dir
    assert json.loads((moves.dir / f"{job.id}.json").read_text())["state"] == "failed"


def test_restart_after_switch_finishes_the_cleanup(host: Host, tmp_path: Path) -> None:
    import asyncio
    import shutil

    _, sm, job = _interrupted(host, tmp_path, "cleanup")
    plan = job.storage
    (disk,) = plan.disks
    Path(disk.dst).parent.mkdir(parents=True)
    shutil.copy(disk.src, disk.dst)
    host.vms.relocate("vm1", moved_spec(host.vms.spec("vm1"), plan, {"disk0"}))
    asyncio.run(sm.recover())
    assert Path(disk.dst).exists() and not Path(disk.src).exists()
    assert host.vms.spec("vm1").storage_dir == plan.new_storage_dir


def test_cancel_refused_after_the_pivot(host: Host, tmp_path: Path) -> None:
    moves, _, job = _interrupted(host, tmp_path, "switchover")
    with pytest.raises(ConflictError, match="past the pivot") as err:
        moves.cancel(job.id)
    assert err.value.fix
    job.phase = type(job.phase)("mirror")
    assert moves.cancel(job.id) is job
