"""The API refuses bad requests with a clear 4xx naming the field, and changes nothing.

Uses the real host layer on a temporary state directory; no QEMU is started (VMs are only
created, which writes configuration and qcow2 files).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from vmferry.api import create_app
from vmferry.host import Host


def _tree(p: Path) -> list[str]:
    """Every file under ``p`` except the audit log (which records the refusal itself)."""
    return sorted(
        str(x.relative_to(p))
        for x in p.rglob("*")
        if "audit" not in x.parts and not x.name.startswith("events.db")
    )


@pytest.fixture
def host(tmp_path: Path) -> Host:
    root = tmp_path / "storage"
    root.mkdir()
    h = Host(tmp_path / "state", image=lambda: (Path("/nonexistent"), Path("/nonexistent")))
    h.settings = h.settings.model_copy(update={"storage_roots": [str(root)], "name": "h1"})
    return h


@pytest.fixture
def api(host: Host) -> Iterator[TestClient]:
    with TestClient(create_app(host, require_client_cert=False)) as c:
        yield c


def _create(api: TestClient, **kw: Any) -> httpx.Response:
    body: dict[str, Any] = {"name": "vm1", "memory_mib": 64}
    body.update(kw)
    return api.post("/v1/vms", json=body)


def test_create_and_list(api: TestClient) -> None:
    r = _create(api, disks=[{"size_mib": 8}])
    assert r.status_code == 201, r.text
    vm = r.json()
    assert vm["state"] == "off" and vm["host"] == "h1"
    assert Path(vm["storage_dir"], "vm.json").exists()
    assert Path(vm["storage_dir"], "disk0.qcow2").exists()
    assert [v["name"] for v in api.get("/v1/vms").json()] == ["vm1"]


@pytest.mark.parametrize(
    ("kw", "status", "field"),
    [
        ({"memory_mib": 0}, 400, "memory_mib"),
        ({"memory_mib": 10_000_000}, 409, "memory_mib"),
        ({"nics": [{"switch": "nope"}]}, 400, "nics[0].switch"),
        ({"storage_dir": "../../etc"}, 400, "storage_dir"),
        ({"storage_dir": "/etc/vm1"}, 400, "storage_dir"),
        ({"name": "bad name"}, 400, "name"),
        ({"name": "../x"}, 400, "name"),
        ({"vcpus": 0}, 400, "vcpus"),
        ({"probe": {"roles": ["nope"]}}, 400, "probe.roles"),
    ],
)
def test_refusals_change_nothing(
    api: TestClient, host: Host, tmp_path: Path, kw: dict[str, Any], status: int, field: str
) -> None:
    before = _tree(tmp_path)
    r = _create(api, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field
    assert err["message"]
    assert _tree(tmp_path) == before
    assert api.get("/v1/vms").json() == []


def test_symlinked_storage_dir_refused(api: TestClient, host: Host, tmp_path: Path) -> None:
    (Path(host.settings.storage_roots[0]) / "evil").symlink_to(tmp_path / "elsewhere")
    r = _create(api, storage_dir="evil/vm1")
    assert r.status_code == 400 and "symlink" in r.json()["error"]["message"]
    assert not (tmp_path / "elsewhere").exists()


def test_duplicate_name_refused(api: TestClient, tmp_path: Path) -> None:
    assert _create(api).status_code == 201
    before = _tree(tmp_path)
    r = _create(api, memory_mib=128)
    assert r.status_code == 409 and r.json()["error"]["field"] == "name"
    assert _tree(tmp_path) == before
    assert api.get("/v1/vms/vm1").json()["memory_mib"] == 64


def test_unknown_vm_and_wrong_state(api: TestClient) -> None:
    assert api.get("/v1/vms/ghost").status_code == 404
    assert _create(api).status_code == 201
    r = api.post("/v1/vms/vm1/actions", json={"action": "pause"})
    assert r.status_code == 409 and "off" in r.json()["error"]["message"]
    r = api.post("/v1/vms/vm1/actions", json={"action": "explode"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "action"


def test_storage_root_must_exist(api: TestClient) -> None:
    r = api.patch("/v1/host/settings", json={"storage_roots": ["/nonexistent/root"]})
    assert r.status_code == 400 and r.json()["error"]["field"] == "storage_roots"


def test_client_certificate_required(host: Host) -> None:
    with TestClient(create_app(host)) as c:
        r = c.get("/v1/vms")
    assert r.status_code == 401
    assert "client certificate" in r.json()["error"]["message"]
