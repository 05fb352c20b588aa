"""Host-side tests of the in-guest probe (loopback only, bounded timeouts)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmferry.guest.image import compile_probe

BLK = 4096
VERIFY_RE = re.compile(r"FERRY-DISK-VERIFY last=(\d+) gaps=(\d+) corrupt=(\d+) torn=(\d+)")
STAT_RE = re.compile(rb"^STAT hb=(\d+) disk_ack=(\d+) dirty_rounds=(\d+) uptime_ms=(\d+)$")


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The probe compiled for the host (dynamic, to need only a basic toolchain)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    return compile_probe(tmp_path_factory.mktemp("probe") / "probe", static=False)


def free_port() -> int:
    """A loopback port currently free for both TCP and UDP."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


class Probe:
    """A running probe process whose stdout lines are collected by a thread."""

    def __init__(self, exe: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(exe), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip())

    def wait_line(self, prefix: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line
            time.sleep(0.02)
        raise AssertionError(f"no {prefix!r} line in {self.lines[-20:]}")

    def kill(self) -> None:
        """SIGKILL the probe's own process group (parent and role children)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        time.sleep(0.1)  # let the orphaned children finish dying


@pytest.fixture
def running() -> Iterator[list[Probe]]:
    procs: list[Probe] = []
    yield procs
    for p in procs:
        p.kill()


def udp_request(port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send one datagram, retrying until the echo server answers."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            s.sendto(payload, ("127.0.0.1", port))
            try:
                data, _ = s.recvfrom(70000)
                return data
            except TimeoutError:
                continue
    raise AssertionError("no UDP reply")


def stat(port: int) -> dict[str, int]:
    m = STAT_RE.match(udp_request(port, b"STAT"))
    assert m, "malformed STAT reply"
    return dict(
        zip(("hb", "disk_ack", "dirty_rounds", "uptime_ms"), map(int, m.groups()), strict=True)
    )


def test_compiles_cleanly(tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    src = Path(__file__).parents[2] / "src/vmferry/guest/probe.c"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(tmp_path / "p"), str(src)],
        check=True,
        timeout=120,
    )


def test_udp_echo_and_stat(probe: Path, running: list[Probe]) -> None:
    port = free_port()
    p = Probe(
        probe, "--bind", "127.0.0.1", "--port", str(port), "--hb-ms", "50", "heartbeat,udpecho"
    )
    running.append(p)
    payload = os.urandom(1400)
    assert udp_request(port, payload) == payload
    assert udp_request(port, b"") == b""
    p.wait_line("FERRY-HB 3 ")
    first = stat(port)
    assert first["hb"] >= 3 and first["disk_ack"] == 0 and first["dirty_rounds"] == 0
    time.sleep(0.3)
    assert stat(port)["hb"] > first["hb"]
    assert STAT_RE.match(udp_request(port, b"STAT please"))
    hb = [int(line.split()[1]) for line in p.lines if line.startswith("FERRY-HB ")]
    assert hb == list(range(1, len(hb) + 1))


def test_tcp_echo_many_clients(probe: Path, running: list[Probe]) -> None:
    port = free_port()
    running.append(Probe(probe, "--bind", "127.0.0.1", "--port", str(port), "tcpecho"))
    deadline = time.monotonic() + 5
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(8)]
    try:
        blobs = [os.urandom(200_000) for _ in clients]
        senders = [
            threading.Thread(target=c.sendall, args=(b,))
            for c, b in zip(clients, blobs, strict=True)
        ]
        for t in senders:
            t.start()
        for c, blob in zip(clients, blobs, strict=True):
            got = bytearray()
            while len(got) < len(blob):
                chunk = c.recv(65536)
                assert chunk, "connection closed early"
                got += chunk
            assert bytes(got) == blob
        for t in senders:
            t.join(timeout=5)
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("spec", ["4M@0", "4M@0:full"])  # one byte per page, whole pages
def test_dirty_rounds(probe: Path, running: list[Probe], spec: str) -> None:
    port = free_port()
    p = Probe(probe, "--bind", "127.0.0.1", "--port", str(port), "udpecho", f"dirty={spec}")
    running.append(p)
    p.wait_line("FERRY-DIRTY size=4194304 rate=0")
    time.sleep(0.5)
    assert stat(port)["dirty_rounds"] > 0


def test_dirty_rate_limited(probe: Path, running: list[Probe]) -> None:
    port = free_port()
    p = Probe(
        probe, "--bind", "127.0.0.1", "--port", str(port), "--dirty", "1M@4M", "udpecho,dirty"
    )
    running.append(p)
    p.wait_line("FERRY-DIRTY")
    time.sleep(1.0)
    rounds = stat(port)["dirty_rounds"]
    assert 1 <= rounds <= 8  # ~4 rounds/s; loose bounds for slow CI


def test_bad_dirty_mode_rejected(probe: Path) -> None:
    r = subprocess.run([str(probe), "dirty=4M@0:half"], capture_output=True, timeout=10)
    assert r.returncode == 2 and b"4M@0:half" in r.stderr


def test_bad_role_rejected(probe: Path) -> None:
    r = subprocess.run([str(probe), "heartbeat,bogus"], capture_output=True, timeout=10)
    assert r.returncode == 2 and b"bogus" in r.stderr


def run_verify(probe: Path, disk: Path) -> tuple[int, tuple[int, int, int, int]]:
    r = subprocess.run(
        [str(probe), "--once-verify", "--disk-file", str(disk)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    m = VERIFY_RE.search(r.stdout)
    assert m, r.stdout + r.stderr
    last, gaps, corrupt, torn = map(int, m.groups())
    return r.returncode, (last, gaps, corrupt, torn)


def write_for(probe: Path, disk: Path, seconds: float) -> tuple[Probe, int]:
    """Run the disk role for ``seconds``, SIGKILL it, return it and the last ACK."""
    p = Probe(probe, "--disk-file", str(disk), "--disk-pace-us", "200", "--ack-ms", "20", "disk")
    try:
        p.wait_line("FERRY-DISK-ACK")
        time.sleep(seconds)
    finally:
        p.kill()
    acks = [int(line.split()[1]) for line in p.lines if line.startswith("FERRY-DISK-ACK ")]
    return p, acks[-1]


def flip_byte(disk: Path, index: int, offset: int = 100) -> None:
    with open(disk, "r+b") as fh:
        fh.seek(index * BLK + offset)
        b = fh.read(1)
        fh.seek(index * BLK + offset)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_disk_write_kill_verify(probe: Path, tmp_path: Path) -> None:
    nblocks = 16
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * nblocks * BLK)
    assert run_verify(probe, disk) == (0, (0, 0, 0, 0))

    first, last_ack = write_for(probe, disk, 1.0)
    assert "FERRY-DISK-VERIFY last=0 gaps=0 corrupt=0 torn=0" in first.lines
    rc, (last, gaps, corrupt, torn) = run_verify(probe, disk)
    assert rc == 0 and last >= last_ack > nblocks and gaps == corrupt == 0 and torn == 0

    # Block layout is documented in probe.c; check it from Python.
    data = disk.read_bytes()
    blk = data[((last - 1) % nblocks) * BLK :][:BLK]
    assert blk[:8] == b"FERRYBLK" and int.from_bytes(blk[8:16], "little") == last
    assert zlib.crc32(blk[8:16] + blk[20:]) == int.from_bytes(blk[16:20], "little")

    # A restarted writer resumes at last+1.
    second, _ = write_for(probe, disk, 0.3)
    assert f"FERRY-DISK-VERIFY last={last} gaps=0 corrupt=0 torn=0" in second.lines
    assert second.wait_line("FERRY-DISK-ACK") == f"FERRY-DISK-ACK {last + 1}"


def test_disk_verify_detects_damage(probe: Path, tmp_path: Path) -> None:
    nblocks = 16
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * nblocks * BLK)
    write_for(probe, disk, 0.5)
    _, (last, *_rest) = run_verify(probe, disk)
    assert last > nblocks
    pristine = disk.read_bytes()

    flip_byte(disk, (last - 4) % nblocks)  # an acknowledged block
    assert run_verify(probe, disk) == (3, (last, 0, 1, 0))

    disk.write_bytes(pristine)
    flip_byte(disk, last % nblocks)  # where the unacknowledged last+1 would go
    assert run_verify(probe, disk) == (0, (last, 0, 0, 1))

    disk.write_bytes(pristine)
    with open(disk, "r+b") as fh:  # a lost write
        fh.seek(((last - 2) % nblocks) * BLK)
        fh.write(b"\0" * BLK)
    assert run_verify(probe, disk) == (3, (last, 1, 0, 0))


def test_udp_mark_keeps_text_in_memory(probe: Path, running: list[Probe]) -> None:
    """``MARK <text>`` fills 4 MiB of the probe's memory with the text (migration capture test)."""
    port = free_port()
    p = Probe(probe, "--bind", "127.0.0.1", "--port", str(port), "udpecho")
    running.append(p)
    assert udp_request(port, b"MARK secret-123") == b"MARKED 4194304"
    assert udp_request(port, b"MARK ") == b"MARK "  # no text: echoed like any datagram
    assert udp_request(port, b"MARKING") == b"MARKING"
