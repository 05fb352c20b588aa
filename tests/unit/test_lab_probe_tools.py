"""The blackout and session probes and the background runner, on loopback (no root)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from vmferry.errors import HostError, RefusedError
from vmferry.lab.lab import Lab, start_probe
from vmferry.lab.records import LabRecords, pid_matches

LOOP = "127.0.0.1"


def run_probe(*args: str, timeout: float = 30) -> dict[str, Any]:
    """Run ``python -m vmferry.lab.probe ARGS`` and return its JSON line."""
    done = subprocess.run(
        [sys.executable, "-m", "vmferry.lab.probe", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


class UdpEcho:
    """A UDP echo thread that drops everything during ``pause`` (seconds after first packet)."""

    def __init__(self, pause: tuple[float, float] | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOP, 0))
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.pause = pause
        self.heads: set[bytes] = set()
        self.packets = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        first: float | None = None
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            now = time.monotonic()
            first = now if first is None else first
            self.packets += 1
            self.heads.add(data[:4])
            if self.pause and self.pause[0] <= now - first < self.pause[1]:
                continue
            self.sock.sendto(data, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class TcpEcho:
    """A one-connection TCP echo thread; ``on_line(n, conn)`` may stall or break the session."""

    def __init__(self, on_line: Callable[[int, socket.socket], bool] | None = None) -> None:
        self.lsock = socket.create_server((LOOP, 0))
        self.lsock.settimeout(0.1)
        self.port = int(self.lsock.getsockname()[1])
        self.on_line = on_line
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn: socket.socket | None = None
        while conn is None and not self._stop.is_set():
            try:
                conn, _ = self.lsock.accept()
            except TimeoutError:
                continue
        if conn is None:
            return
        with conn:
            conn.settimeout(0.1)
            buf = b""
            n = 0
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if self.on_line is not None and not self.on_line(n, conn):
                        return
                    conn.sendall(line + b"\n")
                    n += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.lsock.close()


@pytest.fixture
def closers() -> Iterator[list[UdpEcho | TcpEcho]]:
    servers: list[UdpEcho | TcpEcho] = []
    yield servers
    for s in servers:
        s.close()


def test_blackout_measures_a_pause(closers: list[UdpEcho | TcpEcho]) -> None:
    srv = UdpEcho(pause=(0.6, 0.9))
    closers.append(srv)
    r = run_probe("blackout", LOOP, "--port", str(srv.port), "--duration", "1.5")
    assert r["kind"] == "blackout" and r["ok"] is True and r["stopped_by"] == "duration"
    assert 250 <= r["longest_gap_ms"] <= 600, r
    assert r["received"] > 500 and r["sent"] <= 1501
    assert r["lost"] == r["sent"] - r["received"] > 100  # the pause dropped ~300 datagrams
    start, length = r["gaps"][0]
    assert length == r["longest_gap_ms"] and start == r["longest_gap_start_s"]
    assert 0.4 < start < 1.0
    assert abs(r["longest_gap_start_epoch"] - (r["started_epoch"] + start)) < 0.01
    assert len(r["gaps"]) <= 10 and all(g[1] > 5 for g in r["gaps"])
    assert [g[1] for g in r["gaps"]] == sorted((g[1] for g in r["gaps"]), reverse=True)
    assert b"STAT" not in srv.heads and srv.heads == {b"ferr"}


def test_blackout_sigterm_writes_result(tmp_path: Path, closers: list[UdpEcho | TcpEcho]) -> None:
    srv = UdpEcho()
    closers.append(srv)
    out = tmp_path / "bo.json"
    argv = [sys.executable, "-m", "vmferry.lab.probe", "blackout", LOOP]
    argv += ["--port", str(srv.port), "--duration", "30", "--out", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline().startswith(b"vmferry.lab.probe ready blackout")
        time.sleep(1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=5)
        assert time.monotonic() - t0 < 5
        assert proc.returncode == 0
        r = json.loads(out.read_text())
        assert r["sent"] > 0 and r["received"] > 0 and r["stopped_by"] == "SIGTERM"
        assert r["duration_s"] < 5
        assert not (tmp_path / "bo.json.tmp").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_blackout_no_listener_is_not_ok() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOP, 0))
        port = int(s.getsockname()[1])
    r = run_probe("blackout", LOOP, "--port", str(port), "--duration", "0.3")
    assert r["ok"] is False and r["received"] == 0 and r["longest_gap_ms"] is None


def test_session_survives_a_stall(closers: list[UdpEcho | TcpEcho]) -> None:
    def stall(n: int, conn: socket.socket) -> bool:
        if n == 25:  # ~0.5 s in at 20 ms per line
            time.sleep(0.3)
        return True

    srv = TcpEcho(stall)
    closers.append(srv)
    r = run_probe("session", LOOP, "--port", str(srv.port), "--duration", "1.5")
    assert r["ok"] is True and r["reset"] is False and r["error"] is None, r
    assert r["longest_stall_ms"] >= 250
    assert r["lines"] > 30 and 1.3 < r["connected_s"] < 2.5


@pytest.mark.parametrize("how", ["rst", "eof"])
def test_session_reset(how: str, closers: list[UdpEcho | TcpEcho]) -> None:
    def cut(n: int, conn: socket.socket) -> bool:
        if n < 10:
            return True
        if how == "rst":  # SO_LINGER 0: close() sends a RST
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False

    srv = TcpEcho(cut)
    closers.append(srv)
    r = run_probe("session", LOOP, "--port", str(srv.port), "--duration", "3")
    assert r["ok"] is False and r["reset"] is True and r["error"], r
    assert r["lines"] == 10


def test_session_refused_is_an_error_not_a_reset() -> None:
    with socket.socket() as s:
        s.bind((LOOP, 0))
        port = int(s.getsockname()[1])
    r = run_probe("session", LOOP, "--port", str(port), "--duration", "1")
    assert r["ok"] is False and r["reset"] is False and r["error"] and r["lines"] == 0


def test_duration_is_required_and_capped() -> None:
    for extra in ([], ["--duration", "601"], ["--duration", "0"]):
        done = subprocess.run(
            [sys.executable, "-m", "vmferry.lab.probe", "blackout", LOOP, *extra],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 2 and b"--duration" in done.stderr


# -- the background runner, with a fake lab whose "client netns" is the root namespace -------


def fake_lab(tmp_path: Path, vm_cidr: str = "127.0.0.0/8") -> Lab:
    topo = SimpleNamespace(vm_cidr=vm_cidr, client_netns=None)
    return cast(Lab, SimpleNamespace(dir=tmp_path, topology=lambda: topo))


def test_start_probe_refuses_outside_vm_cidr(tmp_path: Path) -> None:
    lab = fake_lab(tmp_path, "10.77.0.0/24")
    for ip in ("127.0.0.1", "10.77.1.5", "not-an-ip"):
        with pytest.raises(RefusedError):
            start_probe(lab, "blackout", ip, 1)
    with pytest.raises(RefusedError):
        start_probe(lab, "udp", "10.77.0.5", 1)
    with pytest.raises(RefusedError):
        start_probe(lab, "session", "10.77.0.5", 601)
    assert not (tmp_path / "probes").exists()


def test_start_probe_stop_and_already_exited(tmp_path: Path) -> None:
    lab = fake_lab(tmp_path)
    # start_probe always uses port 7; nothing need answer there for the runner's mechanics.
    bo = start_probe(lab, "blackout", LOOP, 30)
    assert bo.out == tmp_path / "probes" / "blackout-1.json" and bo.kind == "blackout"
    recs = [e for e in LabRecords(tmp_path).entries() if e["kind"] == "pid"]
    assert [e["pid"] for e in recs] == [bo.pid] and recs[0]["start_time"] == bo.start_time
    assert {"kind": "dir", "path": str(tmp_path / "probes")} in LabRecords(tmp_path).entries()
    time.sleep(0.5)
    assert bo.running()
    r = bo.stop(timeout=10)
    assert r["kind"] == "blackout" and r["sent"] > 0 and r["stopped_by"] == "SIGTERM"
    assert not bo.running() and not pid_matches(bo.pid, bo.start_time)

    short = start_probe(lab, "session", LOOP, 0.3, interval_ms=50)
    assert short.out.name == "session-1.json"
    deadline = time.monotonic() + 10
    while not short.out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    r2 = short.stop(timeout=5)  # already exited: no signal, just the result
    assert r2["kind"] == "session" and r2["stopped_by"] in ("duration", "error")
    assert start_probe(lab, "blackout", LOOP, 0.2).out.name == "blackout-2.json"


def test_stop_without_result_raises(tmp_path: Path) -> None:
    lab = fake_lab(tmp_path)
    p = start_probe(lab, "blackout", LOOP, 30)
    os.kill(p.pid, signal.SIGKILL)  # dies before writing anything
    with pytest.raises(HostError):
        p.stop(timeout=2)


@pytest.fixture(scope="module")
def guest_probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real in-guest probe, compiled for the host."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    from vmferry.guest.image import compile_probe

    return compile_probe(tmp_path_factory.mktemp("gprobe") / "probe", static=False)


def test_against_the_guest_probe_paused_with_sigstop(guest_probe: Path) -> None:
    with socket.socket() as t:
        t.bind((LOOP, 0))
        port = str(t.getsockname()[1])
    gp = subprocess.Popen(
        [str(guest_probe), "--bind", LOOP, "--port", port, "udpecho,tcpecho"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        time.sleep(0.3)
        base = [sys.executable, "-m", "vmferry.lab.probe"]
        bo = subprocess.Popen(
            [*base, "blackout", LOOP, "--port", port, "--duration", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        ses = subprocess.Popen(
            [*base, "session", LOOP, "--port", port, "--duration", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for p in (bo, ses):
            assert p.stderr is not None and b"ready" in p.stderr.readline()
        time.sleep(0.5)
        os.killpg(gp.pid, signal.SIGSTOP)  # the probe forks per role: stop its whole group
        time.sleep(0.4)
        os.killpg(gp.pid, signal.SIGCONT)
        r_bo = json.loads(bo.communicate(timeout=15)[0])
        r_ses = json.loads(ses.communicate(timeout=15)[0])
    finally:
        os.killpg(gp.pid, signal.SIGCONT)
        os.killpg(gp.pid, signal.SIGKILL)
        gp.wait(5)
    assert 350 <= r_bo["longest_gap_ms"] <= 900, r_bo
    assert r_ses["ok"] is True and r_ses["reset"] is False and r_ses["longest_stall_ms"] >= 350


def test_outages_join_close_gaps() -> None:
    from vmferry.lab.probe import outages

    # One reply in the middle of a long silence is still one outage; a later gap is another;
    # short gaps are not outages.
    gaps = [[0.2, 1500.0], [1.7, 500.0], [2.6, 35.0], [5.0, 300.0]]
    assert outages(gaps) == [(0.2, 2000.0), (5.0, 300.0)]
    assert outages([[0.2, 80.0]]) == []
    assert outages([]) == []
