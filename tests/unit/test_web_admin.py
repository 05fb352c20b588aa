"""The Admin Center (web/) against simulated agents: log-in, roles, rendering, SSE, audit."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from vmferry.client import HostEndpoint, NotFoundError
from vmferry.security import CertificateAuthority
from vmferry.web import Agents, WebSettings, charts, create_app
from vmferry.web.auth import COOKIE

NOW = time.time()


def _job(job_id: str, vm: str, state: str, **kw: Any) -> dict[str, Any]:
    job = {
        "id": job_id, "kind": "live", "vm": vm, "source": "h1", "destination": "h2",
        "state": state, "phase": "precopy" if state == "running" else "cleanup",
        "created_at": NOW - 10, "finished_at": None, "mode": "shared-nothing",
        "transport": "tcp", "encrypted": True, "address": "198.18.1.2", "total_s": None,
        "qemu_downtime_ms": None, "downtime_ms": None, "escalations": [], "error": None,
        "queue_position": None, "first_pass_bytes": None, "qemu_stats": {}, "bytes_sent": 0,
        "progress": {"ram_total": 200 * 2**20, "ram_transferred": 50 * 2**20,
                     "disk_total": 0, "disk_transferred": 0, "passes": 1, "mbps": 800.0},
        "phases": [
            {"phase": "queued", "started_at": NOW - 10, "ended_at": NOW - 9.9},
            {"phase": "checks", "started_at": NOW - 9.9, "ended_at": NOW - 9.0},
            {"phase": "precopy", "started_at": NOW - 9.0, "ended_at": None},
        ],
    }  # fmt: skip
    job.update(kw)
    return job


class SimulatedAgent:
    """A simulated ferryd: canned answers, and a record of every call the Admin Center made."""

    def __init__(self, name: str, vms: list[dict[str, Any]], free_mib: int = 4000) -> None:
        self.name = name
        self._vms = vms
        self.free_mib = free_mib
        self.jobs: dict[str, dict[str, Any]] = {}
        self.events_list: list[dict[str, Any]] = []
        self.cluster: dict[str, Any] | None = None
        self.calls: list[tuple[str, Any]] = []
        self.trace_answer: dict[str, Any] | None = None
        self.revoked: list[str] = []

    def request(
        self, method: str, path: str, *, json: Any = None, timeout: float | None = None
    ) -> Any:
        self.calls.append(("request", (method, path)))
        if path == "/v1/security/crl":
            return {"crl": {"number": 1, "revoked": self.revoked}}
        if path.endswith("/trace"):
            if self.trace_answer is None:
                raise NotFoundError("no such route")
            return self.trace_answer
        raise NotFoundError(path)

    def host(self) -> dict[str, Any]:
        return {
            "name": self.name, "memory_total_mib": 24000, "memory_free_for_vms_mib":
            self.free_mib, "vms_total": len(self._vms), "cpu_count": 2, "cpu_vendor":
            "GenuineIntel", "accelerator": "tcg",
            "vms_running": sum(1 for v in self._vms if v["state"] == "running"),
        }  # fmt: skip

    def vms(self) -> list[dict[str, Any]]:
        return self._vms

    def migrations(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in j.items() if k not in ("progress", "phases")}
                for j in self.jobs.values()]  # fmt: skip

    def migration(self, job_id: str) -> dict[str, Any]:
        if job_id not in self.jobs:
            raise NotFoundError(f"no migration {job_id}")
        return dict(self.jobs[job_id])

    def cancel_migration(self, job_id: str) -> dict[str, Any]:
        self.calls.append(("cancel", job_id))
        return self.jobs[job_id]

    def move(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("move", (name, request)))
        if request.get("what_if"):
            return {
                "vm": name, "source": self.name, "destination": request["destination"]["name"],
                "ok": True, "checks": [{"name": "memory", "ok": True, "message": "fits",
                                        "fix": None}],
                "mode": "shared-nothing", "encrypted": True, "storage_dir": "/x",
                "disks": {}, "bytes_to_move": 256 * 2**20, "link_mbps_assumed": 1000,
                "predicted_s": 2.1, "note": "simulated plan",
            }  # fmt: skip
        job = _job("j-new", name, "queued")
        self.jobs[job["id"]] = job
        return job

    def move_storage(self, name: str, request: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("move_storage", (name, request)))
        job = _job("s-new", name, "queued", kind="storage")
        self.jobs[job["id"]] = job
        return job

    def action(self, name: str, action: str, timeout: float = 60.0) -> dict[str, Any]:
        self.calls.append(("action", (name, action)))
        return {}

    def events(self, **filters: Any) -> list[dict[str, Any]]:
        self.calls.append(("events", filters))
        wanted = {k: v for k, v in filters.items() if k in ("vm", "job", "level") and v}
        return [e for e in self.events_list if all(e.get(k) == v for k, v in wanted.items())]

    def cluster_member(self) -> dict[str, Any]:
        return {"cluster": self.cluster["name"] if self.cluster else None}

    def cluster_status(self, name: str | None = None) -> dict[str, Any]:
        assert self.cluster is not None
        return self.cluster

    def cluster_vm_move(
        self, name: str, to: str | None, best: bool, quick: bool, cluster: str | None = None
    ) -> dict[str, Any]:
        self.calls.append(("cluster_vm_move", (name, to, best, quick)))
        return {"from": self.name, "to": to or "h2", "job": _job("c-new", name, "queued")}

    def cluster_drain(self, cluster: str, node: str) -> dict[str, Any]:
        self.calls.append(("drain", (cluster, node)))
        return {}

    def cluster_resume(self, cluster: str, node: str, failback: bool) -> dict[str, Any]:
        self.calls.append(("resume", (cluster, node, failback)))
        return {}

    def close(self) -> None:
        pass


def _cert(cn: str, role: str, serial: int = 0x1234) -> dict[str, Any]:
    """A verified peer certificate as ``ssl.getpeercert()`` returns it."""
    return {
        "subject": ((("commonName", cn),),),
        "serialNumber": f"{serial:X}",
        "subjectAltName": (("URI", f"urn:vmferry:role:{role}"),),
    }


class CertApp:
    """The app behind a TLS layer that verified ``cert`` (what web/server.py does)."""

    def __init__(self, app: Any, cert: dict[str, Any] | None) -> None:
        self.app = app
        self.cert = cert

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope.setdefault("extensions", {})["tls"] = {"peer_cert": self.cert}
        await self.app(scope, receive, send)


class World:
    """Two simulated agents, the Admin Center in front of them, and clients per identity."""

    def __init__(self, tmp: Path, crl: Path | None = None, ca: Path | None = None) -> None:
        self.h1 = SimulatedAgent("h1", [
            {"name": "web1", "state": "running", "host": "h1", "memory_mib": 256,
             "uptime_s": 3725.0, "ip": "198.18.2.11", "storage_dir": "/s/web1",
             "disks": [{"name": "disk0", "size_mib": 64}]},
        ], free_mib=1000)  # fmt: skip
        self.h2 = SimulatedAgent("h2", [], free_mib=3000)
        by_url = {"https://h1": self.h1, "https://h2": self.h2}
        eps = {n: HostEndpoint(url=f"https://{n}", ca="/ca.crt") for n in ("h1", "h2")}
        self.agents = Agents(eps, factory=lambda ep: by_url[ep.url])
        self.settings = WebSettings(
            state_dir=tmp / "admin", crl_file=crl, ca=ca, stream_interval_s=0.01, stream_ticks=5
        )
        self.app = create_app(self.agents, self.settings)

    def browser(self, cert: dict[str, Any] | None = None) -> TestClient:
        return TestClient(CertApp(self.app, cert), base_url="https://testserver")

    def audit(self) -> list[dict[str, Any]]:
        path = self.settings.state_dir / "audit" / "audit.jsonl"
        return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.agents.close()


def _token_login(w: World, cn: str, role: str) -> TestClient:
    """Log in the way a person without a browser certificate does: token, then form."""
    tok = w.browser(_cert(cn, role)).post("/login/token")
    assert tok.status_code == 200, tok.text
    b = w.browser()
    r = b.post("/login", data={"token": tok.json()["token"]}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    return b


# -- log-in -------------------------------------------------------------------------------------
def test_pages_need_a_login(world: World) -> None:
    b = world.browser()
    r = b.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert b.get("/moves/stream").status_code == 401
    assert "Log in" in b.get("/login").text


def test_token_needs_a_certificate_and_is_single_use(world: World) -> None:
    r = world.browser().post("/login/token")
    assert r.status_code == 401
    assert "certificate" in r.json()["error"]["message"]
    tok = world.browser(_cert("alice", "operator")).post("/login/token").json()
    assert tok["cn"] == "alice" and tok["role"] == "operator"
    assert tok["expires_at"] - time.time() <= world.settings.token_ttl_s
    b = world.browser()
    r = b.post("/login", data={"token": tok["token"]}, follow_redirects=False)
    cookie = r.headers["set-cookie"].lower()
    for attr in ("httponly", "secure", "samesite=strict", f"{COOKIE}="):
        assert attr in cookie
    again = world.browser().post("/login", data={"token": tok["token"]})
    assert again.status_code == 401 and "unknown, used or expired" in again.text


def test_token_session_shows_hosts_vms_and_the_user(world: World) -> None:
    b = _token_login(world, "alice", "operator")
    page = b.get("/").text
    for text in ('data-host="h1"', 'data-host="h2"', 'data-vm="web1"', "alice", "operator",
                 "1h 02m", "standalone"):  # fmt: skip
        assert text in page
    b.post("/logout")
    assert b.get("/", follow_redirects=False).status_code == 303


def test_a_token_expires(tmp_path: Path) -> None:
    w = World(tmp_path)
    w.settings.token_ttl_s = 0.0
    w.app = create_app(w.agents, w.settings)
    tok = w.browser(_cert("alice", "operator")).post("/login/token").json()["token"]
    assert w.browser().post("/login", data={"token": tok}).status_code == 401


def test_certificate_login_checks_role(world: World) -> None:
    assert "web1" in world.browser(_cert("vic", "viewer")).get("/").text
    host = world.browser(_cert("h1", "host")).get("/")
    assert host.status_code == 403 and "belongs to agents" in host.text
    norole = world.browser({"subject": ((("commonName", "x"),),), "subjectAltName": ()}).get("/")
    assert norole.status_code == 403


def test_revoked_certificate_is_refused_for_page_and_token(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    ca.issue(tmp_path / "ca" / "certs", "mallory", role="operator")
    serial = int(ca.certificates()[-1]["serial"], 16)
    w = World(tmp_path, crl=ca.crl_path, ca=ca.cert_path)
    cert = _cert("mallory", "operator", serial)
    assert w.browser(cert).get("/").status_code == 200
    ca.revoke("mallory")
    time.sleep(0.01)
    r = w.browser(cert).get("/")
    assert r.status_code == 401 and "revoked" in r.text
    assert w.browser(cert).post("/login/token").status_code == 401


def test_serial_revoked_on_the_agents_is_refused(world: World) -> None:
    world.h2.revoked = ["BEEF"]
    assert world.browser(_cert("eve", "admin", 0xBEEF)).get("/").status_code == 401
    assert world.browser(_cert("ann", "admin", 0xBEE0)).get("/").status_code == 200


# -- roles ---------------------------------------------------------------------------------------
MOVE_FORM = {"vm": "web1", "destination": "h2", "mode": "live", "storage": "single",
             "storage_path": "", "disk_map": ""}  # fmt: skip


def test_viewer_may_look_but_not_move(world: World) -> None:
    b = world.browser(_cert("vic", "viewer"))
    page = b.get("/").text
    assert "/move?vm=web1" not in page and ">Pause<" not in page
    assert "may look but not move VMs" in b.get("/move?vm=web1").text
    r = b.post("/move/what-if", data=MOVE_FORM)
    assert r.status_code == 403 and "needs operator or admin" in r.text
    r = b.post("/move/start", data=MOVE_FORM)
    assert r.status_code == 403
    assert not [c for c in world.h1.calls if c[0] == "move"]
    refused = [a for a in world.audit() if a["outcome"] == "refused"]
    assert refused and all(a["cn"] == "vic" for a in refused)


def test_operator_what_if_then_start(world: World) -> None:
    b = world.browser(_cert("olga", "operator"))
    form = {**MOVE_FORM, "storage": "vm-only"}
    r = b.post("/move/what-if", data=form, headers={"HX-Request": "true"})
    assert r.status_code == 200
    assert "every check passed" in r.text and "Start the move" in r.text
    name, req = world.h1.calls[-1][1]
    assert name == "web1" and req["what_if"] is True
    assert req["destination"] == {"name": "h2", "url": "https://h2"}
    assert req["options"] == {"quick": False, "vm_only": True}
    r = b.post("/move/start", data=form, headers={"HX-Request": "true"})
    assert r.headers["hx-redirect"] == "/migrations/h1/j-new"
    _, req = world.h1.calls[-1][1]
    assert "what_if" not in req
    moved = [a for a in world.audit() if a["message"] == "move web1 to h2"]
    assert moved and moved[0]["cn"] == "olga" and moved[0]["outcome"] == "ok"


def test_per_item_storage_map_and_bad_lines(world: World) -> None:
    b = world.browser(_cert("olga", "operator"))
    form = {**MOVE_FORM, "storage": "per-item", "disk_map": "disk0=/s/new.qcow2\n"}
    b.post("/move/what-if", data=form)
    assert world.h1.calls[-1][1][1]["options"]["disk_map"] == {"disk0": "/s/new.qcow2"}
    r = b.post("/move/what-if", data={**form, "disk_map": "disk0"}, headers={"HX-Request": "true"})
    assert "is not NAME=PATH" in r.text


def test_drain_needs_what_the_agents_require(world: World) -> None:
    cluster = {"name": "lab1", "leader": "h1", "vms": [{"name": "web1"}], "nodes": [
        {"name": n, "state": "up", "lease": "alive", "leader": n == "h1", "paused": False,
         "drain": None, "clustered_vms": ["web1"] if n == "h1" else []}
        for n in ("h1", "h2")]}  # fmt: skip
    world.h1.cluster = world.h2.cluster = cluster
    op = world.browser(_cert("olga", "operator"))
    assert "<button>Drain</button>" not in op.get("/").text
    assert op.post("/cluster/lab1/nodes/h1/drain").status_code == 403
    adm = world.browser(_cert("ada", "admin"))
    assert "<button>Drain</button>" in adm.get("/").text
    r = adm.post("/cluster/lab1/nodes/h1/drain", follow_redirects=False)
    assert r.status_code == 303
    assert ("drain", ("lab1", "h1")) in world.h1.calls


def test_best_node_what_if_uses_the_roomiest_node_and_start_asks_the_cluster(world: World) -> None:
    cluster = {"name": "lab1", "leader": "h1", "vms": [{"name": "web1"}], "nodes": [
        {"name": n, "state": "up", "lease": "alive", "leader": False, "paused": False,
         "drain": None, "clustered_vms": []} for n in ("h1", "h2")]}  # fmt: skip
    world.h1.cluster = world.h2.cluster = cluster
    b = world.browser(_cert("olga", "operator"))
    r = b.post("/move/what-if", data={**MOVE_FORM, "destination": "best"})
    assert "Checked against h2" in r.text
    assert world.h1.calls[-1][1][1]["destination"]["name"] == "h2"
    # a clustered VM moves through the cluster, files staying on the shared volume: the
    # what-if checks exactly that, whatever storage the form names
    b.post("/move/what-if", data={**MOVE_FORM, "destination": "h2", "storage": "per-item",
                                  "disk_map": "disk0=/s/new.qcow2\n"})  # fmt: skip
    assert world.h1.calls[-1][1][1]["options"] == {"quick": False, "vm_only": True}
    r = b.post("/move/start", data={**MOVE_FORM, "destination": "best"},
               headers={"HX-Request": "true"})  # fmt: skip
    assert ("cluster_vm_move", ("web1", None, True, False)) in world.h1.calls
    assert r.headers["hx-redirect"] == "/migrations/h1/c-new"


def test_vm_action_and_storage_move(world: World) -> None:
    b = world.browser(_cert("olga", "operator"))
    b.post("/vms/h1/web1/action", data={"action": "pause"})
    assert ("action", ("web1", "pause")) in world.h1.calls
    assert b.post("/vms/h1/web1/action", data={"action": "rm -rf"}).status_code == 400
    assert b.post("/vms/h1/web1%3Fx/action", data={"action": "pause"}).status_code == 400
    assert b.get("/migrations/h1/j%3F1").status_code == 400
    r = b.post("/storage/start", data={"vm": "web1", "to": "/fast/web1", "bandwidth_mbps": "800"},
               follow_redirects=False)  # fmt: skip
    assert r.headers["location"] == "/migrations/h1/s-new"
    sent = next(c for c in world.h1.calls if c[0] == "move_storage")[1][1]
    assert sent["to"] == "/fast/web1" and sent["bandwidth_mbps"] == 800


def test_post_from_another_origin_is_refused(world: World) -> None:
    b = _token_login(world, "olga", "operator")
    r = b.post("/vms/h1/web1/action", data={"action": "pause"},
               headers={"Origin": "https://evil.example"})  # fmt: skip
    assert r.status_code == 403
    assert ("action", ("web1", "pause")) not in world.h1.calls


# -- moves, SSE, migration page, events ------------------------------------------------------
def test_moves_page_and_stream_show_progress(world: World) -> None:
    world.h1.jobs["j1"] = _job("j1", "web1", "running")
    world.h1.jobs["j0"] = _job("j0", "web1", "completed", created_at=NOW - 100)
    b = world.browser(_cert("vic", "viewer"))
    page = b.get("/moves").text
    assert 'data-sse="/moves/stream"' in page
    assert 'data-job="j1" data-state="running"' in page and 'value="25.0"' in page
    body = b.get("/moves/stream").text
    assert "event: update" in body and 'data-job="j1"' in body
    assert body.count("event: update") == 1  # unchanged rows are not sent again


def test_migration_stream_ends_when_the_job_does(world: World) -> None:
    world.h1.jobs["j1"] = _job("j1", "web1", "completed")
    b = world.browser(_cert("vic", "viewer"))
    body = b.get("/migrations/h1/j1/stream").text
    assert "event: done" in body and 'data-state="completed"' in body
    assert b.get("/migrations/h9/j1").status_code == 404


def test_migration_page_charts_from_trace_or_job(world: World) -> None:
    world.h1.jobs["j1"] = _job(
        "j1", "web1", "completed", first_pass_bytes=200 * 2**20,
        qemu_stats={"ram": {"transferred": 230 * 2**20}},
        progress={"ram_total": 1, "ram_transferred": 1, "passes": 3},
    )  # fmt: skip
    b = world.browser(_cert("vic", "viewer"))
    page = b.get("/migrations/h1/j1").text
    assert page.count("<rect") == 3 + 2  # three phases, two pass bars
    assert "the agent has no per-pass trace" in page
    world.h1.trace_answer = {"passes": [  # as migration/trace.py's pass table has it
        {"pass": 1, "phase": "precopy", "start_s": 1.0, "duration_s": 0.5,
         "bytes": 200 * 2**20, "remaining_bytes": 256 * 2**20, "dirty_rate_bps": 2e6,
         "mbps": 900.0, "throttle_pct": None},
        {"pass": 2, "phase": "precopy", "start_s": 1.5, "duration_s": 0.1,
         "bytes": 10 * 2**20, "remaining_bytes": 12 * 2**20, "dirty_rate_bps": 1e6,
         "mbps": 850.0, "throttle_pct": 20}]}  # fmt: skip
    page = b.get("/migrations/h1/j1").text
    assert "from the trace" in page and page.count("<rect") == 3 + 2
    assert "200.0 MiB" in page and "10.0 MiB" in page and "20 %" in page


def test_events_filters_reach_the_agents(world: World) -> None:
    world.h1.events_list = [
        {"id": 1, "at": NOW - 5, "level": "info", "kind": "phase", "host": "h1", "vm": "web1",
         "job": "j1", "message": "entered precopy", "data": {}},
        {"id": 2, "at": NOW - 4, "level": "warning", "kind": "refused", "host": "h1",
         "vm": "db1", "job": None, "message": "refused a move", "data": {}},
    ]  # fmt: skip
    b = world.browser(_cert("vic", "viewer"))
    page = b.get("/events?level=warning&host=h1&since=60").text
    assert "refused a move" in page and "entered precopy" not in page
    flt = [c[1] for c in world.h1.calls if c[0] == "events"][-1]
    assert flt["level"] == "warning" and flt["since"] > NOW - 3700
    assert not [c for c in world.h2.calls if c[0] == "events"]
    assert b.get("/events?level=loud").status_code == 400


# -- charts ----------------------------------------------------------------------------------
def test_phase_bars_follow_the_timeline() -> None:
    job = _job("j", "v", "completed")
    job["phases"][-1]["ended_at"] = NOW - 8.0
    bars = charts.phase_bars(job)
    assert [b.label for b in bars] == ["queued", "checks", "precopy"]
    assert [round(b.start, 1) for b in bars] == [0.0, 0.1, 1.0]
    assert round(bars[-1].length, 1) == 1.0
    svg = charts.phases_svg({"phases": [{"phase": "<b>", "started_at": 1, "ended_at": 2}]})
    assert "<b>" not in svg and "&lt;b&gt;" in svg


# -- serving -------------------------------------------------------------------------------------
def test_service_identity_and_listen_address(tmp_path: Path) -> None:
    from vmferry.client import ClientConfig, RefusedError
    from vmferry.web import service_endpoints
    from vmferry.web.server import check_service_cert, parse_listen

    cfg = ClientConfig(hosts={
        "h1": HostEndpoint(url="https://h1", ca="/ca", cert="/me.crt", key="/me.key"),
        "h2": HostEndpoint(url="https://h2", ca="/ca", cert="/me.crt", key="/me.key"),
    })  # fmt: skip
    eps = service_endpoints(cfg, ["h2"], cert="/svc.crt", key="/svc.key")
    assert list(eps) == ["h2"] and eps["h2"].cert == "/svc.crt" and eps["h2"].url == "https://h2"
    assert sorted(service_endpoints(cfg, None)) == ["h1", "h2"]
    with pytest.raises(RefusedError, match="h9"):
        service_endpoints(cfg, ["h9"])
    ca = CertificateAuthority.create(tmp_path / "ca")
    check_service_cert(ca.issue(tmp_path, "svc", role="admin").cert)
    with pytest.raises(RefusedError, match="role operator"):
        check_service_cert(ca.issue(tmp_path, "op", role="operator").cert)
    assert parse_listen("127.0.0.1:8443") == ("127.0.0.1", 8443)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    for bad in ("8443", "host:", "h:99999"):
        with pytest.raises(RefusedError):
            parse_listen(bad)
