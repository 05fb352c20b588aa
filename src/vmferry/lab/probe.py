"""Client-side probes run inside the lab's client namespace: UDP echo, TCP echo, guest STAT.

Run as ``python -m vmferry.lab.probe KIND IP [...]``; prints one JSON object. Every loop is
bounded in count and time, and the target must be on the lab's VM network (checked by the
caller, :meth:`vmferry.lab.Lab.probe`).
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from typing import Any

PORT = 7


def udp_echo(ip: str, count: int, interval: float, timeout: float) -> dict[str, Any]:
    """Send ``count`` datagrams and report which came back and the round-trip times."""
    replies = 0
    rtts: list[float] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for i in range(count):
            payload = f"ferry-probe {i} {time.time_ns()}".encode()
            t0 = time.monotonic()
            s.sendto(payload, (ip, PORT))
            try:
                while True:
                    data, _ = s.recvfrom(2048)
                    if data == payload:
                        replies += 1
                        rtts.append((time.monotonic() - t0) * 1000)
                        break
            except TimeoutError:
                pass
            time.sleep(interval)
    return {
        "kind": "udp",
        "ip": ip,
        "sent": count,
        "received": replies,
        "rtt_ms_max": round(max(rtts), 3) if rtts else None,
        "rtt_ms_avg": round(sum(rtts) / len(rtts), 3) if rtts else None,
    }


def tcp_echo(ip: str, count: int, interval: float, timeout: float) -> dict[str, Any]:
    """Open one TCP session and exchange ``count`` lines over it."""
    echoed = 0
    with socket.create_connection((ip, PORT), timeout=timeout) as s:
        for i in range(count):
            line = f"ferry-tcp {i}\n".encode()
            s.sendall(line)
            got = b""
            while len(got) < len(line):
                chunk = s.recv(len(line) - len(got))
                if not chunk:
                    raise ConnectionError("guest closed the TCP session")
                got += chunk
            if got == line:
                echoed += 1
            time.sleep(interval)
    return {"kind": "tcp", "ip": ip, "sent": count, "echoed": echoed}


def stat(ip: str, timeout: float, tries: int = 5) -> dict[str, Any]:
    """Ask the guest probe for its counters (heartbeat, disk ack, dirty rounds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for _ in range(tries):
            s.sendto(b"STAT", (ip, PORT))
            try:
                data, _ = s.recvfrom(2048)
            except TimeoutError:
                continue
            text = data.decode(errors="replace").strip()
            if text.startswith("STAT"):
                fields = dict(kv.split("=", 1) for kv in text.split()[1:] if "=" in kv)
                return {"kind": "stat", "ip": ip, **{k: int(v) for k, v in fields.items()}}
    raise TimeoutError(f"no STAT reply from {ip} after {tries} tries")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry (inside the client namespace)."""
    ap = argparse.ArgumentParser(prog="vmferry.lab.probe")
    ap.add_argument("kind", choices=("udp", "tcp", "stat"))
    ap.add_argument("ip")
    ap.add_argument("--count", type=int, default=5)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--timeout", type=float, default=1.0)
    a = ap.parse_args(argv)
    count = max(1, min(a.count, 100_000))
    result: dict[str, Any]
    try:
        if a.kind == "udp":
            result = udp_echo(a.ip, count, a.interval, a.timeout)
        elif a.kind == "tcp":
            result = tcp_echo(a.ip, count, a.interval, a.timeout)
        else:
            result = stat(a.ip, a.timeout)
    except OSError as exc:
        result = {"kind": a.kind, "ip": a.ip, "error": str(exc)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
