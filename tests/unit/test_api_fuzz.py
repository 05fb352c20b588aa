"""Schemathesis fuzzes ferryd's whole OpenAPI in process: no 5xx, no crash, refusals change nothing.

The agent app runs on a temporary host (state directory and storage root under tmp). Nothing
leaves the process:

* QEMU is never started: the guest image provider and QEMU's launcher are *simulated* ones that
  refuse with 409 ("this test host runs no QEMU"), so start/restore/incoming routes stop there;
* virtual switches are created by a *simulated* ``ensure_switch`` that only records the call;
* a network guard refuses every IP connect and every name lookup, so a route that would contact
  a peer agent or etcd sees an unreachable peer (and must say so with a clean 4xx).

After each call the host's settings are put back and the known VM ``vm1`` re-created, so every
request starts from the same state; a refused request (4xx) must leave the state directory, the
storage root and the VM list exactly as they were.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode
from schemathesis.python import asgi

from vmferry.api import create_app
from vmferry.errors import ConflictError
from vmferry.host import Host
from vmferry.host import network as host_network
from vmferry.host import vms as host_vms
from vmferry.host.settings import SwitchSpec
from vmferry.host.vms import VMState

KNOWN_VM = "vm1"
CALL_TIMEOUT_S = 20.0


class SimulatedNoQemu(ConflictError):
    """Raised by the simulated image provider and QEMU launcher of this test."""


def _simulated_image() -> tuple[Path, Path]:
    raise SimulatedNoQemu("simulated host: this test host runs no QEMU (no guest image)")


def _simulated_spawn(*_: Any, **__: Any) -> Any:
    raise SimulatedNoQemu("simulated host: this test host runs no QEMU")


@dataclass
class NetworkGuard:
    """Refuses every IP connect and name lookup; records what was attempted."""

    attempts: list[str] = field(default_factory=list)

    def install(self, mp: pytest.MonkeyPatch) -> None:
        """Patch socket connect and getaddrinfo for the rest of the test."""
        real_getaddrinfo = socket.getaddrinfo
        real_connect = socket.socket.connect
        real_connect_ex = socket.socket.connect_ex

        def _allowed(sock: socket.socket) -> bool:
            return sock.family == socket.AF_UNIX

        def connect(sock: socket.socket, address: Any) -> None:
            if not _allowed(sock):
                self.attempts.append(f"connect {address!r}")
                raise ConnectionRefusedError(111, "refused by the fuzz test's network guard")
            real_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> int:
            if not _allowed(sock):
                self.attempts.append(f"connect {address!r}")
                return 111
            return real_connect_ex(sock, address)

        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            text = host.decode() if isinstance(host, bytes) else host
            try:
                if text is not None:
                    ipaddress.ip_address(text)
            except ValueError:
                self.attempts.append(f"lookup {text!r}")
                raise socket.gaierror(
                    socket.EAI_NONAME, "name lookups are off in this test"
                ) from None
            return real_getaddrinfo(host, *args, **kwargs)

        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket.socket, "connect_ex", connect_ex)
        mp.setattr(socket, "getaddrinfo", getaddrinfo)


#: Written on every mutating call, refused or not, by design (the audit log), and on every
#: refusal (the event log, host/events.py).
AUDIT_DIR = Path("state") / "audit"
EVENT_LOG = "events.db"


#: VM states an earlier request's background job passes through.
BUSY_STATES = frozenset({
    VMState.STARTING, VMState.SHUTTING_DOWN, VMState.STOPPING, VMState.SAVING,
    VMState.RESTORING, VMState.MIGRATING,
})  # fmt: skip


def _snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` with a digest of its content (not the audit log)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        if base.relative_to(root) == AUDIT_DIR:
            dirnames.clear()
            continue
        for d in dirnames:
            out[str((base / d).relative_to(root)) + "/"] = "dir"
        for f in filenames:
            p = base / f
            if base.relative_to(root) == Path("state") and f.startswith(EVENT_LOG):
                continue
            if p.is_symlink() or not p.is_file():
                out[str(p.relative_to(root))] = "special"
                continue
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return out


@dataclass
class FuzzEnv:
    """The app under test and how to reset and observe its host."""

    host: Host
    root: Path
    client: Any
    baseline_settings: Any
    findings: list[str] = field(default_factory=list)
    calls: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def settle(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until no VM is in the middle of something an earlier accepted request
        started (a move answered 202 goes on in the background and ends in its own time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(v.state in BUSY_STATES for v in self.host.vms.list()):
                return
            time.sleep(0.05)

    def reset(self) -> None:
        """Back to the baseline: settings as at the start, the known VM present, no VM busy."""
        self.settle()
        self.host.settings = self.baseline_settings
        self.host.store.save(self.baseline_settings)
        if KNOWN_VM not in {v.name for v in self.host.vms.list()}:
            r = self.client.post("/v1/vms", json={"name": KNOWN_VM, "memory_mib": 64}, timeout=30)
            assert r.status_code == 201, r.text

    def observe(self) -> tuple[dict[str, str], list[tuple[str, str]]]:
        """The files under the test root and the VM list."""
        vms = [(v.name, v.state.value) for v in self.host.vms.list()]
        return _snapshot(self.root), vms

    def check(self, case: Any) -> None:
        """Send ``case``; record a finding for a 5xx, a crash, or a refusal that changed state."""
        self.reset()
        before = self.observe()
        label = f"{case.method} {case.formatted_path}"
        try:
            resp = case.call(session=self.client, timeout=CALL_TIMEOUT_S)
        except Exception as exc:  # the app raised instead of answering
            msg = f"{label}: crashed: {exc.__class__.__name__}: {str(exc)[:300]}"
            self.findings.append(msg)
            raise AssertionError(msg) from exc
        self.calls += 1
        self.statuses[resp.status_code] = self.statuses.get(resp.status_code, 0) + 1
        if resp.status_code >= 500:
            msg = f"{label}: {resp.status_code} {resp.text[:300]} (body {case.body!r:.300})"
            self.findings.append(msg)
            raise AssertionError(msg)
        if 400 <= resp.status_code < 500:
            err = resp.json().get("error") if resp.content else None
            if not isinstance(err, dict) or not err.get("message"):
                msg = f"{label}: {resp.status_code} without an error message: {resp.text[:200]}"
                self.findings.append(msg)
                raise AssertionError(msg)
            after = self.observe()
            if after != before:
                files_b, vms_b = before
                files_a, vms_a = after
                diff = sorted(set(files_a.items()) ^ set(files_b.items()))[:6]
                msg = f"{label}: refused ({resp.status_code}) but changed {diff} {vms_b}->{vms_a}"
                self.findings.append(msg)
                raise AssertionError(msg)


@pytest.fixture
def fuzz_env(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FuzzEnv]:
    """The agent app on a temporary host with simulated QEMU/switches and no network."""
    guard = NetworkGuard()
    guard.install(monkeypatch)
    switches_made: list[str] = []

    def simulated_ensure_switch(bridge: str, uplink: str | None) -> None:
        switches_made.append(bridge)

    monkeypatch.setattr(host_network, "ensure_switch", simulated_ensure_switch)
    monkeypatch.setattr(host_network, "link_exists", lambda name: name in switches_made)
    monkeypatch.setattr(host_vms, "spawn_daemon", _simulated_spawn)
    # QMP socket folders (runtime scratch, not state): under tmp, outside the observed tree.
    monkeypatch.setenv("VMFERRY_RUN_DIR", str(tmp_path_factory.mktemp("fuzz-run")))

    storage = tmp_path / "storage"
    storage.mkdir()
    host = Host(tmp_path / "state", image=_simulated_image)
    host.settings = host.settings.model_copy(
        update={
            "storage_roots": [str(storage)],
            "name": "fuzz1",
            "accelerator": "tcg",
            "switches": {"ext": SwitchSpec(bridge="vfzsim0")},
        }
    )
    host.store.save(host.settings)
    app = create_app(host, require_client_cert=False)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    client = asgi.get_client(app)
    try:
        with client:
            env = FuzzEnv(host, tmp_path, client, host.settings)
            env.schema = schema  # type: ignore[attr-defined]
            env.guard = guard  # type: ignore[attr-defined]
            env.reset()
            yield env
    finally:
        asgi.shutdown_lifespans()


def _run_strategy(env: FuzzEnv, strategy: Any, examples: int, derandomize: bool) -> None:
    """Draw ``examples`` cases from ``strategy`` and check each (raises on the first finding)."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=derandomize,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.explicit, Phase.generate),
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        case = data.draw(strategy)
        if "name" in (case.path_parameters or {}) and data.draw(st.booleans()):
            case.path_parameters["name"] = KNOWN_VM
        env.check(case)

    run()


def _fuzz(env: FuzzEnv, examples: int, budget_s: float, derandomize: bool = True) -> None:
    schema = env.schema  # type: ignore[attr-defined]
    ops = [r.ok() for r in schema.get_all_operations()]
    deadline = time.monotonic() + budget_s
    failed: list[str] = []
    for op in ops:
        inputs = sum(len(c) for c in (op.path_parameters, op.query, op.headers, op.body))
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if inputs else [])
        for mode in modes:
            if time.monotonic() > deadline:
                break
            try:
                _run_strategy(env, op.as_strategy(generation_mode=mode), examples, derandomize)
            except Unsatisfiable:
                continue  # nothing to make invalid (no parameters, no body)
            except AssertionError as exc:
                failed.append(f"{op.label} [{mode.value}]: {str(exc).splitlines()[0][:400]}")
    assert not failed, "\n".join(failed)
    assert env.calls > len(ops), f"only {env.calls} calls for {len(ops)} operations"


def test_fuzz_api_short(fuzz_env: FuzzEnv) -> None:
    """A short run over every operation (``make test``); the same cases every run."""
    _fuzz(fuzz_env, examples=6, budget_s=45)
    print(f"fuzz: {fuzz_env.calls} calls, statuses {sorted(fuzz_env.statuses.items())}")


@pytest.mark.slow
def test_fuzz_api_long(fuzz_env: FuzzEnv) -> None:
    """A longer run over every operation (``make test-all``); new random cases each run."""
    _fuzz(fuzz_env, examples=100, budget_s=600, derandomize=False)
    print(f"fuzz: {fuzz_env.calls} calls, statuses {sorted(fuzz_env.statuses.items())}")


def test_events_cursor_beyond_sqlite_is_refused(fuzz_env: FuzzEnv) -> None:
    """Found by the long run: an ``after`` past SQLite's 64-bit INTEGER crashed the query."""
    resp = fuzz_env.client.get("/v1/events", params={"after": str(2**70)})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["field"] == "query.after"
    assert fuzz_env.client.get("/v1/events", params={"after": str(2**63 - 1)}).json() == []
