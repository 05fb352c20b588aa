"""Hardened input: body size limit, bounds that name the field, paths confined to the roots.

Uses the real host layer on a temporary state directory; no QEMU is started.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from vmferry.api import create_app
from vmferry.api.limits import MAX_BODY_BYTES
from vmferry.cluster.volumes import MARKER
from vmferry.host import Host


def _tree(p: Path) -> list[str]:
    return sorted(str(x.relative_to(p)) for x in p.rglob("*") if "audit" not in x.parts)


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


def _vm(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"name": "vm1", "memory_mib": 64}
    body.update(kw)
    return body


def test_body_over_limit_refused_with_413(api: TestClient, tmp_path: Path) -> None:
    before = _tree(tmp_path)
    big = _vm(storage_dir="x" * (MAX_BODY_BYTES + 10))
    r = api.post("/v1/vms", json=big)
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["field"] == "body" and str(MAX_BODY_BYTES) in err["message"]
    assert _tree(tmp_path) == before


def test_chunked_body_over_limit_refused(api: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"name": "vm1", "storage_dir": "'
        for _ in range(20):
            yield b"y" * 65536
        yield b'"}'

    r = api.post("/v1/vms", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert api.get("/v1/vms").json() == []


def test_body_under_limit_passes(api: TestClient) -> None:
    r = api.post("/v1/vms", json=_vm())
    assert r.status_code == 201, r.text


def test_not_json_gets_an_error_body(api: TestClient) -> None:
    r = api.post("/v1/vms", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code in (400, 422)
    err = r.json()["error"]
    assert err["message"] and err["code"] == "refused"
    r = api.get("/v1/no-such-route")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not-found"


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"memory_mib": 16 * 1024 * 1024 + 1}, "memory_mib"),
        ({"memory_mib": 15}, "memory_mib"),
        ({"disks": [{"size_mib": 1}] * 17}, "disks"),
        ({"nics": [{"switch": "ext"}] * 9}, "nics"),
        ({"name": "a" * 64}, "name"),
        ({"cpu_model": "q" * 129}, "cpu_model"),
        ({"storage_dir": "vm1\nx"}, "storage_dir"),
        ({"probe": {"gateway": "1.2.3.4 init=/bin/sh"}}, "probe.gateway"),
        ({"probe": {"ip": "not-an-ip"}}, "probe.ip"),
        ({"boot": {"kind": "kernel", "kernel": "k", "cmdline": "c" * 2049}}, "boot.cmdline"),
    ],
)
def test_bounds_name_the_field(
    api: TestClient, tmp_path: Path, kw: dict[str, Any], field: str
) -> None:
    before = _tree(tmp_path)
    r = api.post("/v1/vms", json=_vm(**kw))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["field"] == field
    assert err["message"].startswith(field)
    assert _tree(tmp_path) == before


def test_kernel_outside_storage_roots_refused(api: TestClient, host: Host, tmp_path: Path) -> None:
    outside = tmp_path / "vmlinuz"
    outside.write_bytes(b"kernel")
    r = api.post("/v1/vms", json=_vm(boot={"kind": "kernel", "kernel": str(outside)}))
    assert r.status_code == 400 and r.json()["error"]["field"] == "boot.kernel"
    inside = Path(host.settings.storage_roots[0]) / "vmlinuz"
    inside.write_bytes(b"kernel")
    r = api.post("/v1/vms", json=_vm(boot={"kind": "kernel", "kernel": str(inside)}))
    assert r.status_code == 201, r.text


def test_failed_create_removes_every_folder_it_made(
    api: TestClient, host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmferry.host import vms as host_vms

    async def failing_run(*_: Any, **__: Any) -> None:
        raise OSError("simulated qemu-img failure")

    monkeypatch.setattr(host_vms, "_run", failing_run)
    before = _tree(tmp_path)
    with pytest.raises(OSError):
        api.post("/v1/vms", json=_vm(storage_dir="a/b/vm1", disks=[{"size_mib": 1}]))
    assert _tree(tmp_path) == before


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/vms/vm1/move", {"destination": {"name": "h2", "url": "ftp://x"}}, "destination.url"),
        ("/v1/vms/import", {"path": "vm1", "peers": {"h2": "not a url"}}, "peers"),
        ("/v1/cluster", {"name": "c1", "nodes": [{"name": "h1", "url": "\x1e"}]}, "nodes.0.url"),
        ("/v1/cluster/reach", {"addresses": ["1.2.3.4"] * 65}, "addresses"),
    ],
)
def test_peer_urls_and_lists_checked_before_contact(
    api: TestClient, path: str, body: dict[str, Any], field: str
) -> None:
    r = api.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field


def test_unreachable_peer_is_a_failed_dependency(api: TestClient) -> None:
    assert api.post("/v1/vms", json=_vm()).status_code == 201
    dest = {"name": "h2", "url": "https://127.0.0.1:1"}  # loopback, nothing listens on port 1
    r = api.post("/v1/vms/vm1/move", json={"destination": dest, "what_if": True})
    assert r.status_code == 424, r.text
    err = r.json()["error"]
    assert err["code"] == "unreachable" and "h2" in err["message"]


def test_volume_check_writes_nothing_outside_the_roots(api: TestClient, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / f"{MARKER}ab12").write_text("ab12\n")  # the marker a `volume add` writes
    # The probe file the check would create: with it present, a write attempt shows as
    # "cannot write"; the storage-root refusal must come first.
    (outside / f"{MARKER}ab12-h1").write_text("")
    before = _tree(tmp_path)
    r = api.post("/v1/cluster/volume-check", json={"path": str(outside), "token": "ab12"})
    assert r.status_code == 200, r.text
    assert not r.json()["ok"] and "storage root" in r.json()["message"], r.text
    assert _tree(tmp_path) == before
    r = api.post("/v1/cluster/volume-check", json={"path": str(outside), "token": "../../x"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "token"
