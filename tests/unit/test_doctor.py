"""``ferry doctor``: every check's pass and fail path over fake agent answers, and the source
agent's probe endpoint (``/v1/host/diagnostics/...``) on a real in-process app."""

from __future__ import annotations

import copy
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from vmferry.api import create_app
from vmferry.api import diagnostics as diag
from vmferry.client import doctor as doc
from vmferry.client.doctor import CertInfo, Check
from vmferry.errors import FerryError, UnreachableError
from vmferry.host import Host
from vmferry.security.roles import OPERATE, rule_for

NOW = 1_800_000_000.0
DAY = 86400.0
NET = "198.18.1.0/24"


def _host(name: str, addr: str) -> dict[str, Any]:
    return {
        "health": {"ok": True, "host": name, "version": "0.9.0"},
        "settings": {
            "name": name,
            "switches": {"external": {"bridge": "br-vm", "uplink": None}},
            "migration": {
                "enabled": True,
                "networks": [NET],
                "trusted_networks": [],
                "max_concurrent": 2,
                "port_min": 49152,
                "port_max": 49215,
                "authentication": "delegated",
            },
        },
        "facts": {
            "node": name,
            "version": "0.9.0",
            "cpu_vendor": "GenuineIntel",
            "cpu_flags": ["sse2", "avx2"],
            "switches": {"external": True},
            "migration_addresses": [addr],
            "storage_roots": [],
            "time": NOW,
        },
        "vms": [],
        "crl": {"number": 1, "revoked": []},
        "cert": CertInfo(
            subject=name,
            serial=0x1000 + int(addr.rsplit(".", 1)[1]),
            not_after=NOW + 400 * DAY,
            uris=("urn:vmferry:role:host", "urn:vmferry:delegate:live:*"),
        ),
    }


class FakeAgents:
    """Answers of two simulated agents h1 and h2 (``doc.DoctorApi``), changed per test."""

    def __init__(self) -> None:
        self.hosts = {"h1": _host("h1", "198.18.1.11"), "h2": _host("h2", "198.18.1.12")}
        self.hosts["h1"]["vms"] = [
            {"name": "web1", "state": "running", "nics": [{"switch": "external"}]}
        ]
        self.own: CertInfo | None = CertInfo("admin", 0x77, NOW + 300 * DAY)
        self.down: set[str] = set()  # listener addresses that time out
        self.peer_answers: dict[tuple[str, str], dict[str, Any]] = {}
        self.what_if_checks: list[dict[str, Any]] = [
            {"name": "cpu-vendor", "ok": True, "message": "CPU vendor GenuineIntel on both"},
            {"name": "cpu-features", "ok": True, "message": "every feature"},
        ]
        self.reached: list[tuple[str, str, int, str]] = []

    def _h(self, host: str) -> dict[str, Any]:
        h = self.hosts[host]
        if h.get("dead"):
            raise UnreachableError(f"cannot reach the agent of {host}")
        return h

    def url(self, host: str) -> str:
        return f"https://198.18.0.{11 if host == 'h1' else 12}:7443"

    def health(self, host: str) -> dict[str, Any]:
        return dict(self._h(host)["health"])

    def settings(self, host: str) -> dict[str, Any]:
        return copy.deepcopy(self._h(host)["settings"])

    def facts(self, host: str) -> dict[str, Any]:
        return copy.deepcopy(self._h(host)["facts"])

    def vms(self, host: str) -> list[dict[str, Any]]:
        return copy.deepcopy(self._h(host)["vms"])

    def crl(self, host: str) -> dict[str, Any] | None:
        return self._h(host)["crl"]  # type: ignore[no-any-return]

    def certificate(self, host: str) -> CertInfo:
        return self._h(host)["cert"]  # type: ignore[no-any-return]

    def own_certificate(self) -> CertInfo | None:
        return self.own

    def reach(self, host: str, address: str, port: int, peer: str) -> dict[str, Any]:
        self.reached.append((host, address, port, peer))
        if address in self.down:
            return {"address": address, "port": port, "result": "timeout", "ok": False,
                    "ms": 3000.0, "error": "TimeoutError: "}  # fmt: skip
        return {"address": address, "port": port, "result": "refused", "ok": True, "ms": 0.4,
                "error": None}  # fmt: skip

    def peer(self, host: str, url: str) -> dict[str, Any]:
        other = "h2" if host == "h1" else "h1"
        default = {
            "from": host, "url": url, "hostname": url.split("//")[1].split(":")[0],
            "is_address": True, "addresses": [], "resolve_error": None, "answered": True,
            "name": other, "version": "0.9.0", "error": None,
        }  # fmt: skip
        return {**default, **self.peer_answers.get((host, other), {})}

    def what_if(self, host: str, vm: str, dest: str, dest_url: str) -> dict[str, Any]:
        return {"vm": vm, "ok": True, "checks": copy.deepcopy(self.what_if_checks)}


@pytest.fixture
def agents() -> FakeAgents:
    return FakeAgents()


def _run(agents: FakeAgents) -> list[Check]:
    return doc.run(agents, "h1", "h2", now=NOW)


def _only(checks: list[Check], name: str, status: str | None = None) -> list[Check]:
    return [c for c in checks if c.check == name and (status is None or c.status == status)]


def _not_passing(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status != "pass"]


# -- a healthy pair ------------------------------------------------------------------------------
def test_healthy_pair_passes_every_check(agents: FakeAgents) -> None:
    checks = _run(agents)
    assert _not_passing(checks) == [], doc.render(checks)
    assert doc.exit_code(checks) == 0
    names = {c.check for c in checks}
    assert names == {
        "agent", "migration enabled", "max concurrent", "encryption", "authentication",
        "delegation allowed", "migration networks", "listener addresses", "network reach",
        "names resolve", "agent to agent", "certificates", "versions", "switches", "cpu",
    }  # fmt: skip
    # the source agent was asked to connect to both ends of the destination's port range, and
    # the destination agent back to the source's
    assert ("h1", "198.18.1.12", 49152, agents.url("h2")) in agents.reached
    assert ("h1", "198.18.1.12", 49215, agents.url("h2")) in agents.reached
    assert ("h2", "198.18.1.11", 49152, agents.url("h1")) in agents.reached
    [lst] = _only(checks, "listener addresses")[:1]
    assert "1. 198.18.1.12 (198.18.1.0/24)" in lst.saw and "TCP 49152-49215" in lst.saw


# -- agent -------------------------------------------------------------------------------------
def test_dead_agent_fails_and_stops(agents: FakeAgents) -> None:
    agents.hosts["h2"]["dead"] = True
    checks = _run(agents)
    [bad] = _not_passing(checks)
    assert bad.check == "agent" and bad.scope == "h2" and "start ferryd on h2" in (bad.fix or "")
    assert doc.exit_code(checks) == 1


def test_agent_with_another_name_fails(agents: FakeAgents) -> None:
    agents.hosts["h2"]["health"]["host"] = "h3"
    [bad] = _not_passing(_run(agents))
    assert bad.check == "agent" and "'h3'" in bad.saw


# -- settings on both hosts ----------------------------------------------------------------------
def test_migration_disabled_fails_with_the_command(agents: FakeAgents) -> None:
    agents.hosts["h2"]["settings"]["migration"]["enabled"] = False
    [bad] = _not_passing(_run(agents))
    assert (bad.check, bad.scope, bad.status) == ("migration enabled", "h2", "fail")
    assert bad.fix == "ferry --host h2 host set --migration-enabled"


def test_max_concurrent_differs_warns(agents: FakeAgents) -> None:
    agents.hosts["h2"]["settings"]["migration"]["max_concurrent"] = 4
    [bad] = _not_passing(_run(agents))
    assert bad.check == "max concurrent" and bad.status == "warn"
    assert "at most 2 at once" in bad.saw
    assert bad.fix == "ferry --host h1 host set --max-concurrent 4"


def test_trusted_networks_differ_warns(agents: FakeAgents) -> None:
    agents.hosts["h1"]["settings"]["migration"]["trusted_networks"] = [NET]
    [bad] = _not_passing(_run(agents))
    assert bad.check == "encryption" and bad.status == "warn"
    assert bad.fix == f"ferry --host h2 host migration-network add {NET} --trusted"


def test_authentication_differs_fails(agents: FakeAgents) -> None:
    agents.hosts["h2"]["settings"]["migration"]["authentication"] = "local"
    bad = _only(_run(agents), "authentication", "fail")
    assert len(bad) == 1 and "h2: local" in bad[0].saw
    assert bad[0].fix == "ferry --host h2 host set --migration-authentication delegated"


def test_agents_without_authentication_setting_skip_both_checks(agents: FakeAgents) -> None:
    for h in agents.hosts.values():
        del h["settings"]["migration"]["authentication"]
    checks = _run(agents)
    assert not _only(checks, "authentication") and not _only(checks, "delegation allowed")
    assert doc.exit_code(checks) == 0


# -- delegation ----------------------------------------------------------------------------------
def test_local_source_warns(agents: FakeAgents) -> None:
    for h in agents.hosts.values():
        h["settings"]["migration"]["authentication"] = "local"
    [bad] = _not_passing(_run(agents))
    assert bad.check == "delegation allowed" and bad.status == "warn"
    assert "moves start only on h1 itself" in bad.saw


def test_source_certificate_without_target_fails(agents: FakeAgents) -> None:
    agents.hosts["h1"]["cert"] = CertInfo(
        "h1", 0x1011, NOW + 400 * DAY, ("urn:vmferry:role:host", "urn:vmferry:delegate:live:h9")
    )
    [bad] = _not_passing(_run(agents))
    assert bad.check == "delegation allowed" and bad.status == "fail"
    assert "h9:live" in bad.saw
    assert bad.fix is not None and "ferry cert issue host h1 --ip 198.18.0.11 --delegate h2" in (
        bad.fix
    )


# -- migration networks, listeners, reach -----------------------------------------------------
def test_destination_without_migration_address_fails_with_the_network(agents: FakeAgents) -> None:
    agents.hosts["h2"]["settings"]["migration"]["networks"] = ["10.99.0.0/24"]
    agents.hosts["h2"]["facts"]["migration_addresses"] = []
    checks = _run(agents)
    bad = [c for c in checks if c.status == "fail"]
    assert {(c.check, c.scope) for c in bad} == {
        ("migration networks", "h2"),
        ("listener addresses", "h1->h2"),
        ("network reach", "h1->h2"),
    }
    for c in bad:
        assert c.fix == f"ferry --host h2 host migration-network add {NET} --position 1"
    # and back: h1's listener lies on none of h2's (wrong) networks
    [warn] = [c for c in checks if c.status == "warn"]
    assert (warn.check, warn.scope) == ("listener addresses", "h2->h1")


def test_any_network_warns(agents: FakeAgents) -> None:
    agents.hosts["h1"]["settings"]["migration"]["networks"] = ["any"]
    [bad] = _not_passing(_run(agents))
    assert (bad.check, bad.scope, bad.status) == ("migration networks", "h1", "warn")
    assert bad.fix is not None and f"add {NET} --position 1" in bad.fix


def test_listener_outside_source_networks_warns(agents: FakeAgents) -> None:
    agents.hosts["h2"]["settings"]["migration"]["networks"] = [NET, "10.7.0.0/24"]
    agents.hosts["h2"]["facts"]["migration_addresses"] = ["198.18.1.12", "10.7.0.12"]
    bad = _not_passing(_run(agents))
    [warn] = [c for c in bad if c.check == "listener addresses"]
    assert warn.status == "warn" and "10.7.0.12 lie on none of h1's" in warn.saw
    assert "1. 198.18.1.12 (198.18.1.0/24); 2. 10.7.0.12 (10.7.0.0/24)" in warn.saw
    assert warn.fix == "ferry --host h1 host migration-network add 10.7.0.0/24"


def test_two_listeners_on_one_network_warn(agents: FakeAgents) -> None:
    agents.hosts["h2"]["facts"]["migration_addresses"] = ["198.18.1.12", "198.18.1.13"]
    [bad] = _not_passing(_run(agents))
    assert bad.check == "listener addresses" and "several addresses on one network" in bad.saw


def test_unreachable_listener_fails_with_the_fix(agents: FakeAgents) -> None:
    agents.down = {"198.18.1.12"}
    [bad] = _not_passing(_run(agents))
    assert (bad.check, bad.scope, bad.status) == ("network reach", "h1->h2 198.18.1.12", "fail")
    assert "198.18.1.12:49152 timeout" in bad.saw
    assert bad.fix is not None and "bring up h2's interface with 198.18.1.12" in bad.fix
    assert "TCP 49152-49215 from h1" in bad.fix


def test_one_of_two_listeners_unreachable_suggests_removing_it(agents: FakeAgents) -> None:
    for h in agents.hosts.values():
        h["settings"]["migration"]["networks"] = [NET, "10.7.0.0/24"]
    agents.hosts["h2"]["facts"]["migration_addresses"] = ["10.7.0.12", "198.18.1.12"]
    agents.down = {"10.7.0.12"}
    [bad] = _not_passing(_run(agents))
    assert bad.scope == "h1->h2 10.7.0.12"
    assert bad.fix is not None
    assert bad.fix.startswith("ferry --host h2 host migration-network remove 10.7.0.0/24")


def test_refused_probe_is_a_failure(agents: FakeAgents) -> None:
    def refuse(*_: Any) -> dict[str, Any]:
        raise FerryError("not a migration listener this agent may probe")

    agents.reach = refuse  # type: ignore[method-assign, assignment]
    bad = _only(_run(agents), "network reach", "fail")
    assert len(bad) == 2 and all("may probe" in c.saw for c in bad)


# -- names and the agent-to-agent path ---------------------------------------------------------
def test_name_resolution(agents: FakeAgents) -> None:
    agents.peer_answers[("h1", "h2")] = {
        "hostname": "h2.example", "is_address": False, "addresses": ["198.18.0.12"],
    }  # fmt: skip
    [ok] = [c for c in _only(_run(agents), "names resolve") if c.scope == "h1->h2"]
    assert ok.status == "pass" and "resolves h2.example to 198.18.0.12" in ok.saw
    agents.peer_answers[("h1", "h2")] = {
        "hostname": "h2.example", "is_address": False,
        "resolve_error": "gaierror: [Errno -2] Name or service not known",
    }  # fmt: skip
    [bad] = _not_passing(_run(agents))
    assert (bad.check, bad.scope, bad.status) == ("names resolve", "h1->h2", "fail")
    assert bad.fix is not None and "add h2.example to h1's DNS or /etc/hosts" in bad.fix


def test_agent_to_agent(agents: FakeAgents) -> None:
    agents.peer_answers[("h1", "h2")] = {"answered": False, "error": "SSL: CERTIFICATE_UNKNOWN"}
    [bad] = _not_passing(_run(agents))
    assert (bad.check, bad.scope) == ("agent to agent", "h1->h2") and "SSL" in bad.saw
    agents.peer_answers[("h1", "h2")] = {"name": "h3"}
    [bad] = _not_passing(_run(agents))
    assert bad.check == "agent to agent" and "as host 'h3'" in bad.saw


# -- certificates --------------------------------------------------------------------------------
def test_expired_expiring_revoked_and_unverified_certificates(agents: FakeAgents) -> None:
    h2 = agents.hosts["h2"]["cert"]
    agents.hosts["h2"]["cert"] = CertInfo("h2", h2.serial, NOW - DAY, h2.uris)
    [bad] = _not_passing(_run(agents))
    assert (bad.check, bad.scope, bad.status) == ("certificates", "h2", "fail")
    assert "expired" in bad.saw
    assert bad.fix is not None and bad.fix.startswith(
        "ferry cert issue host h2 --ip 198.18.0.12 --delegate *"
    )

    agents.hosts["h2"]["cert"] = CertInfo("h2", h2.serial, NOW + 5 * DAY, h2.uris)
    [bad] = _not_passing(_run(agents))
    assert bad.status == "warn" and "in 5.0 days" in bad.saw

    agents.hosts["h2"]["cert"] = h2
    agents.hosts["h1"]["crl"] = {"revoked": [f"{h2.serial:x}"]}  # h1 refuses h2's certificate
    [bad] = _not_passing(_run(agents))
    assert bad.status == "fail" and bad.scope == "h2" and "revocation list of h1" in bad.saw

    agents.hosts["h1"]["crl"] = {"revoked": []}
    agents.hosts["h2"]["cert"] = CertInfo("h2", h2.serial, NOW + 99 * DAY, h2.uris, "bad name")
    [bad] = _not_passing(_run(agents))
    assert bad.status == "fail" and "does not verify: bad name" in bad.saw


def test_your_certificate(agents: FakeAgents) -> None:
    agents.hosts["h2"]["crl"] = {"revoked": ["77"]}
    [bad] = _not_passing(_run(agents))
    assert (bad.check, bad.scope) == ("certificates", "you") and "h2" in bad.saw
    assert bad.fix == "ferry cert issue user admin --role operator"


# -- versions ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dst_version", "status"), [("0.9.0", "pass"), ("0.10.0", "warn"), ("0.8.9", "fail")]
)
def test_versions(agents: FakeAgents, dst_version: str, status: str) -> None:
    agents.hosts["h2"]["health"]["version"] = dst_version
    [c] = _only(_run(agents), "versions")
    assert c.status == status
    if status == "fail":
        assert c.fix == "upgrade vmferry on h2 to 0.9.0"


# -- switches --------------------------------------------------------------------------------------
def test_switch_missing_on_destination_names_vm_and_switch(agents: FakeAgents) -> None:
    agents.hosts["h1"]["settings"]["switches"]["internal"] = {"bridge": "br-int", "uplink": None}
    agents.hosts["h1"]["vms"].append(
        {"name": "db1", "state": "off", "nics": [{"switch": "external"}, {"switch": "internal"}]}
    )
    [bad] = _not_passing(_run(agents))
    assert (bad.check, bad.scope, bad.status) == ("switches", "h1->h2 db1", "fail")
    assert "VM db1 (nic 1) needs switch 'internal'" in bad.saw and "it has: external" in bad.saw
    assert bad.fix is not None and bad.fix.startswith(
        "ferry --host h2 host set --switch internal=br-int"
    )


def test_switch_without_bridge_warns(agents: FakeAgents) -> None:
    agents.hosts["h2"]["facts"]["switches"] = {"external": False}
    [bad] = _not_passing(_run(agents))
    assert (bad.check, bad.scope, bad.status) == ("switches", "h1->h2", "warn")


# -- cpu -----------------------------------------------------------------------------------------
def test_cpu_vendor_differs_fails(agents: FakeAgents) -> None:
    agents.hosts["h2"]["facts"]["cpu_vendor"] = "AuthenticAMD"
    bad = _not_passing(_run(agents))
    assert [c.check for c in bad] == ["cpu"] and bad[0].status == "fail"
    assert "CPU vendor differs" in bad[0].saw


def test_cpu_flags_differ_warns(agents: FakeAgents) -> None:
    agents.hosts["h1"]["facts"]["cpu_flags"] = ["sse2", "avx2", "avx512f"]
    [bad] = _not_passing(_run(agents))
    assert bad.check == "cpu" and bad.status == "warn" and "avx512f" in bad.saw


def test_vm_what_if_cpu_failure_names_the_vm(agents: FakeAgents) -> None:
    agents.what_if_checks[1] = {
        "name": "cpu-features", "ok": False, "fix": "turn on processor compatibility",
        "message": "the destination CPU lacks 1 feature(s) the VM uses: avx512f",
    }  # fmt: skip
    [bad] = _not_passing(_run(agents))
    assert (bad.check, bad.scope, bad.status) == ("cpu", "h1->h2 web1", "fail")
    assert bad.saw.startswith("web1: the destination CPU lacks")
    assert bad.fix == "turn on processor compatibility"


# -- output --------------------------------------------------------------------------------------
def test_render_one_line_per_check_with_the_fix(agents: FakeAgents) -> None:
    agents.hosts["h2"]["settings"]["migration"]["enabled"] = False
    checks = _run(agents)
    lines = doc.render(checks).splitlines()
    assert len(lines) == len(checks)
    [line] = [ln for ln in lines if ln.startswith("FAIL")]
    assert "migration enabled" in line and "h2: live migration is disabled" in line
    assert line.endswith("fix: ferry --host h2 host set --migration-enabled")
    assert all(ln.split()[0] in ("PASS", "WARN", "FAIL") for ln in lines)


def test_cert_info_reads_an_issued_certificate(tmp_path: Path) -> None:
    from vmferry.security import CertificateAuthority

    ca = CertificateAuthority.create(tmp_path / "ca", "test CA")
    paths = ca.issue(tmp_path, "h1", role="host", server_names=["127.0.0.1"], days=3,
                     delegate=["h2"])  # fmt: skip
    info = doc.cert_info(paths.cert.read_bytes())
    assert info.subject == "h1" and "urn:vmferry:delegate:live:h2" in info.uris
    assert 2.9 * DAY < info.not_after - time.time() <= 3 * DAY + 60


# -- the probe endpoint (api/diagnostics.py) ------------------------------------------------------
def test_probe_routes_are_for_operators_and_admins() -> None:
    assert rule_for("POST", "/v1/host/diagnostics/reach").roles == OPERATE
    assert rule_for("POST", "/v1/host/diagnostics/peer").roles == OPERATE


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def probe_api(tmp_path: Path, listener: socket.socket) -> Iterator[TestClient]:
    port = int(listener.getsockname()[1])
    h = Host(tmp_path / "state", image=lambda: (Path("/nonexistent"), Path("/nonexistent")))
    mig = h.settings.migration.model_copy(
        update={"networks": ["127.0.0.0/8"], "port_min": port, "port_max": port}
    )
    h.settings = h.settings.model_copy(update={"name": "h1", "migration": mig})
    with TestClient(create_app(h, require_client_cert=False)) as c:
        yield c


def test_reach_connects_to_a_listener_on_a_migration_network(
    probe_api: TestClient, listener: socket.socket
) -> None:
    port = int(listener.getsockname()[1])
    r = probe_api.post("/v1/host/diagnostics/reach", json={"address": "127.0.0.1", "port": port})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["result"] == "accepted" and body["ok"] and "127.0.0.0/8" in body["allowed_by"]
    listener.close()  # nothing listens now: refused, which still proves the path
    body = probe_api.post(
        "/v1/host/diagnostics/reach", json={"address": "127.0.0.1", "port": port}
    ).json()
    assert body["result"] == "refused" and body["ok"]


@pytest.mark.parametrize(
    ("address", "port_delta", "field"),
    [("192.0.2.10", 0, "address"), ("127.0.0.1", 1, "address"), ("not-an-ip", 0, "address")],
)
def test_reach_refuses_targets_outside_migration_listeners(
    probe_api: TestClient, listener: socket.socket, address: str, port_delta: int, field: str
) -> None:
    port = int(listener.getsockname()[1]) + port_delta
    r = probe_api.post("/v1/host/diagnostics/reach", json={"address": address, "port": port})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == field


def test_reach_allows_what_the_peer_lists_and_nothing_else(
    probe_api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    async def fake_get(self: Any, url: str, path: str) -> Any:  # a simulated peer agent
        asked.append(f"{url}{path}")
        if path == "/v1/cluster/facts":
            return {"node": "h2", "migration_addresses": ["192.0.2.77"]}
        return {"migration": {"port_min": 50000, "port_max": 50010}}

    async def fake_connect(address: str, port: int, timeout: float = 3.0) -> dict[str, Any]:
        return {"address": address, "port": port, "result": "refused", "ok": True, "ms": 1.0,
                "error": None}  # fmt: skip

    monkeypatch.setattr(diag._PeerAgent, "get", fake_get)
    monkeypatch.setattr(diag, "connect_once", fake_connect)
    peer = "https://192.0.2.2:7443"
    r = probe_api.post(
        "/v1/host/diagnostics/reach", json={"address": "192.0.2.77", "port": 50010, "peer": peer}
    )
    assert r.status_code == 200, r.text
    assert r.json()["allowed_by"] == "a migration listener of h2"
    assert f"{peer}/v1/cluster/facts" in asked
    for address, port in (("192.0.2.78", 50000), ("192.0.2.77", 50011), ("192.0.2.77", 22)):
        r = probe_api.post(
            "/v1/host/diagnostics/reach", json={"address": address, "port": port, "peer": peer}
        )
        assert r.status_code == 400, (address, port, r.text)


def test_connect_timeout_is_bounded() -> None:
    assert diag.CONNECT_TIMEOUT_S <= 3.0
    assert diag.classify(TimeoutError()) == "timeout"
    assert diag.classify(ConnectionRefusedError()) == "refused"
    assert diag.classify(OSError(113, "No route to host")) == "unreachable"
    assert diag.classify(OSError(101, "Network is unreachable")) == "no-route"


def test_no_route_on_the_source_points_at_the_source(agents: FakeAgents) -> None:
    def no_route(host: str, address: str, port: int, peer: str) -> dict[str, Any]:
        return {"address": address, "port": port, "result": "no-route", "ok": False, "ms": 0.1,
                "error": "OSError: [Errno 101] Network is unreachable"}  # fmt: skip

    agents.reach = no_route  # type: ignore[method-assign]
    bad = _only(_run(agents), "network reach", "fail")
    [fwd] = [c for c in bad if c.scope == "h1->h2 198.18.1.12"]
    assert "198.18.1.12:49152 no-route" in fwd.saw
    assert (
        fwd.fix == f"bring up h1's interface on {NET} (or add a route to 198.18.1.12 on h1), "
        "then: ferry doctor h1 h2"
    )


def test_peer_probe_reports_an_address_and_an_agent_that_does_not_answer(
    probe_api: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_agent(self: Any, url: str, path: str) -> Any:  # a simulated dead peer
        raise UnreachableError(f"the agent at {url} did not answer: ConnectError")

    monkeypatch.setattr(diag._PeerAgent, "get", no_agent)
    body = probe_api.post(
        "/v1/host/diagnostics/peer", json={"url": "https://192.0.2.2:7443"}
    ).json()
    assert body["is_address"] and body["addresses"] == ["192.0.2.2"]
    assert not body["answered"] and "did not answer" in body["error"]
    body = probe_api.post(
        "/v1/host/diagnostics/peer", json={"url": "https://no-such-host.invalid:7443"}
    ).json()
    assert body["resolve_error"] and not body["answered"]
