"""Encrypted data plane: what crosses the migration link during a move (captured with tcpdump).

A guest keeps a random marker in its memory; a capture of the migration link must never
contain it during an encrypted move, and does contain it with ``--no-encryption`` (so the
check can fail). A shared-nothing move over TLS keeps the guest's disk data intact and never
shows the disk writer's blocks on the wire.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import LabHandle, cleanup_vms, move, needs_lab, serial_lines, wait_for

from vmferry.client import FerryError
from vmferry.lab.procs import run_in_netns

pytestmark = [
    *needs_lab,
    pytest.mark.skipif(shutil.which("tcpdump") is None, reason="needs tcpdump"),
]

#: Bounds of every capture: packets (each up to 256 KiB with GSO) and seconds.
CAPTURE_PACKETS = 400_000
CAPTURE_SECONDS = 240


class Capture:
    """tcpdump on one lab host's migration interface, writing a pcap file."""

    def __init__(self, lab: LabHandle, host: str, out: Path) -> None:
        h = next(x for x in lab.topo.hosts if x.name == host)
        self.out = out
        argv = [
            "timeout", "-s", "INT", str(CAPTURE_SECONDS),
            "ip", "netns", "exec", h.netns,
            "tcpdump", "-i", h.migration_if, "-s", "0", "-U", "-n",
            "-c", str(CAPTURE_PACKETS), "-w", str(out), "tcp",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline().decode()  # "listening on mig0, ..." once it captures
        assert "listening on" in line, line

    def stop(self) -> dict[tuple[str, int, str, int], bytes]:
        """End the capture (SIGINT to our own process) and return the TCP streams."""
        time.sleep(0.5)  # the last segments
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        data = self.out.read_bytes()
        self.out.unlink()  # about 100 MB per move
        return tcp_streams(data)


def tcp_streams(pcap: bytes) -> dict[tuple[str, int, str, int], bytes]:
    """Reassemble the TCP payload of every flow of an Ethernet pcap, in sequence order."""
    magic = struct.unpack("<I", pcap[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack(endian + "I", pcap[20:24])[0]
    assert linktype == 1, f"expected Ethernet captures, got link type {linktype}"
    segments: dict[tuple[str, int, str, int], dict[int, bytes]] = {}
    off = 24
    while off + 16 <= len(pcap):
        incl = struct.unpack(endian + "I", pcap[off + 8 : off + 12])[0]
        frame = pcap[off + 16 : off + 16 + incl]
        off += 16 + incl
        if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
            continue
        ihl = (frame[14] & 0x0F) * 4
        ip_len = struct.unpack(">H", frame[16:18])[0]
        tcp = frame[14 + ihl : 14 + ip_len]
        if len(tcp) < 20:
            continue
        sport, dport, seq = struct.unpack(">HHI", tcp[:8])
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if payload:
            src = ".".join(str(b) for b in frame[26:30])
            dst = ".".join(str(b) for b in frame[30:34])
            segments.setdefault((src, sport, dst, dport), {})[seq] = payload
    streams = {}
    for flow, segs in segments.items():
        base = min(segs)  # no capture here is long enough for sequence numbers to wrap
        data = bytearray()
        for seq in sorted(segs):
            rel = seq - base
            chunk = segs[seq]
            if rel + len(chunk) > len(data):
                data[rel:] = chunk  # retransmissions overlap: the later copy is the same bytes
        streams[flow] = bytes(data)
    return streams


def mark_guest(lab: LabHandle, ip: str, marker: str) -> None:
    """Have the guest's probe keep ``marker`` in its memory (4 MiB of copies)."""
    code = (
        "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(2);"
        f"s.sendto(b'MARK {marker}',({ip!r},7));print(s.recvfrom(256)[0].decode())"
    )
    for _ in range(5):
        done = run_in_netns(lab.topo.client_netns, [sys.executable, "-c", code], 15)
        if done.returncode == 0 and done.stdout.startswith("MARKED 4194304"):
            return
        time.sleep(0.5)
    raise AssertionError(f"the guest did not keep the marker: {done.stdout} {done.stderr}")


def _set_trusted(lab: LabHandle, trusted: bool) -> None:
    for host in ("h1", "h2"):
        with lab.client(host) as c:
            mig = dict(c.settings()["migration"])
            mig["trusted_networks"] = [lab.topo.migration_cidr] if trusted else []
            c.update_settings(migration=mig)


def _make(lab: LabHandle, host: str, name: str, roles: str, **spec: Any) -> str:
    ip = lab.guest_ip()
    with lab.client(host) as c:
        c.create_vm({"name": name, "memory_mib": 256, "nics": [{"switch": "external"}],
                     "probe": {"ip": f"{ip}/24", "roles": roles.split(",")}, **spec})  # fmt: skip
        c.action(name, "start")
    lab.wait_guest(ip)
    return ip


def _payload_bytes(streams: dict[tuple[str, int, str, int], bytes]) -> int:
    return sum(len(s) for s in streams.values())


def test_marker_never_on_the_wire_when_encrypted(lab: LabHandle, tmp_path: Path) -> None:
    marker = f"VMFERRY-MARKER-{secrets.token_hex(12)}"
    name = "tlsmark"
    ip = _make(lab, "h1", name, "heartbeat,udpecho", storage_dir=str(lab.lab.shared_dir / name))
    try:
        mark_guest(lab, ip, marker)
        # Encrypted by default.
        cap = Capture(lab, "h1", tmp_path / "encrypted.pcap")
        job = move(lab, "h1", name, "h2")
        streams = cap.stop()
        assert job["state"] == "completed", job["error"]
        assert job["encrypted"] is True
        assert _payload_bytes(streams) > 8 * 2**20, "the capture missed the migration stream"
        assert not any(marker.encode() in s for s in streams.values()), "marker in clear text"
        # Every stream to the destination QEMU starts with a TLS handshake record.
        to_qemu = [s for (_, _, dst, _), s in streams.items() if len(s) > 2**20]
        assert to_qemu and all(s[:1] == b"\x16" and s[1:2] == b"\x03" for s in to_qemu)
        assert lab.stat(ip)["hb"] > 0

        # Clear text is refused while no migration network is marked trusted.
        with pytest.raises(FerryError) as refused:
            move(lab, "h2", name, "h1", encryption=False)
        assert refused.value.field == "encryption"
        assert refused.value.fix and "--trusted" in refused.value.fix
        with lab.client("h2") as c:
            assert c.vm(name)["state"] == "running"

        # On a trusted network it is allowed, and the capture shows the guest's memory.
        _set_trusted(lab, True)
        mark_guest(lab, ip, marker)
        cap = Capture(lab, "h2", tmp_path / "clear.pcap")
        job = move(lab, "h2", name, "h1", encryption=False)
        streams = cap.stop()
        assert job["state"] == "completed", job["error"]
        assert job["encrypted"] is False
        assert any(marker.encode() in s for s in streams.values()), "marker not in clear capture"
        assert lab.stat(ip)["hb"] > 0
    finally:
        _set_trusted(lab, False)
        cleanup_vms(lab, name)


def test_shared_nothing_move_over_tls_keeps_disk_data(lab: LabHandle, tmp_path: Path) -> None:
    name = "tlsdisk"
    ip = _make(lab, "h1", name, "heartbeat,udpecho,disk", disks=[{"size_mib": 128}])
    try:
        wait_for(lambda: lab.stat(ip)["disk_ack"] > 200, 60, "disk writes")
        cap = Capture(lab, "h1", tmp_path / "sn.pcap")
        job = move(lab, "h1", name, "h2")
        streams = cap.stop()
        assert job["state"] == "completed", job["error"]
        assert job["mode"] == "shared-nothing" and job["encrypted"] is True
        assert "mirror" in [p["phase"] for p in job["phases"]]
        acked = lab.stat(ip)["disk_ack"]
        # The disk writer's blocks start with "FERRYBLK": never visible on the wire.
        assert _payload_bytes(streams) > 8 * 2**20
        assert not any(b"FERRYBLK" in s for s in streams.values()), "disk data in clear text"
        # The NBD client (flags, "IHAVEOPT") asks for STARTTLS (option 5) first, then speaks
        # TLS, and the disk copy went through that connection.
        nbd = [s for s in streams.values() if s[4:12] == b"IHAVEOPT"]
        assert len(nbd) == 1 and len(nbd[0]) > 2**20, [len(s) for s in nbd]
        assert nbd[0][12:20] == struct.pack(">II", 5, 0) and nbd[0][20:22] == b"\x16\x03"
        with lab.client("h2") as c:
            c.action(name, "stop")
            c.action(name, "start")
        lab.wait_guest(ip)
        line = wait_for(lambda: serial_lines(lab, "h2", name, "FERRY-DISK-VERIFY"), 30, "verify")
        m = re.search(r"last=(\d+) gaps=(\d+) corrupt=(\d+)", line[-1])
        assert m, line
        assert int(m.group(1)) >= acked and m.group(2) == "0" and m.group(3) == "0", line[-1]
    finally:
        with contextlib.suppress(FerryError):
            cleanup_vms(lab, name)
