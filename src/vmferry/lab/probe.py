"""Client-side probes run inside the lab's client namespace against the guest's port-7 echo.

Kinds: ``udp`` / ``tcp`` (short echo checks), ``stat`` (guest counters), ``blackout`` (a UDP
stream every millisecond; reports the longest gap between replies) and ``session`` (one TCP
connection exchanging numbered lines; reports whether it survived).

Run as ``python -m vmferry.lab.probe KIND IP [...]``; prints one JSON object (and writes it to
``--out`` if given). Every loop is bounded in count and time, ``blackout`` and ``session`` stop
early (still reporting) on SIGTERM/SIGINT, and only the given address is ever sent to; the
callers (:func:`vmferry.lab.lab.probe`, :func:`vmferry.lab.lab.start_probe`) check it is on the
lab's VM network.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

PORT = 7
MAX_DURATION_S = 600.0
BEHIND_LIMIT_S = 0.05  # a sender further behind its schedule than this skips ahead
GAP_REPORT_MS = 5.0  # gaps longer than this are listed (the 10 longest)
GAP_LIST_LEN = 10
DRAIN_S = 0.25  # after the last send, how long to wait for replies still in flight
SESSION_READ_TIMEOUT_S = 30.0
READY_MARK = "vmferry.lab.probe ready"  # printed to stderr once blackout/session is measuring


def udp_echo(
    ip: str, count: int, interval: float, timeout: float, port: int = PORT
) -> dict[str, Any]:
    """Send ``count`` datagrams and report which came back and the round-trip times."""
    replies = 0
    rtts: list[float] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for i in range(count):
            payload = f"ferry-probe {i} {time.time_ns()}".encode()
            t0 = time.monotonic()
            s.sendto(payload, (ip, port))
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


def tcp_echo(
    ip: str, count: int, interval: float, timeout: float, port: int = PORT
) -> dict[str, Any]:
    """Open one TCP session and exchange ``count`` lines over it."""
    echoed = 0
    with socket.create_connection((ip, port), timeout=timeout) as s:
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


def stat(ip: str, timeout: float, tries: int = 5, port: int = PORT) -> dict[str, Any]:
    """Ask the guest probe for its counters (heartbeat, disk ack, dirty rounds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for _ in range(tries):
            s.sendto(b"STAT", (ip, port))
            try:
                data, _ = s.recvfrom(2048)
            except TimeoutError:
                continue
            text = data.decode(errors="replace").strip()
            if text.startswith("STAT"):
                fields = dict(kv.split("=", 1) for kv in text.split()[1:] if "=" in kv)
                return {"kind": "stat", "ip": ip, **{k: int(v) for k, v in fields.items()}}
    raise TimeoutError(f"no STAT reply from {ip} after {tries} tries")


class StopFlag:
    """Set by SIGTERM/SIGINT once installed; the long-running probes poll it."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: str | None = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal = signal.Signals(signum).name

    def install(self) -> None:
        """Catch SIGTERM and SIGINT (the probe then stops and still reports)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def blackout(
    ip: str,
    duration: float,
    interval: float = 0.001,
    port: int = PORT,
    stop: StopFlag | None = None,
    ready: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Stream numbered UDP datagrams to ``ip`` and measure the longest gap between replies.

    One thread: sends are paced on a deadline schedule (``next += interval``; more than
    :data:`BEHIND_LIMIT_S` late skips ahead instead of bursting) and replies are read in a
    ``select`` loop in between. ``longest_gap_ms`` (between consecutive replies, by arrival
    time) is the guest-observed blackout; ``tail_gap_ms`` is the time after the last reply.
    """
    stop = stop or StopFlag()
    duration = min(max(duration, 0.0), MAX_DURATION_S)
    interval = max(interval, 0.0001)
    max_count = int(duration / interval) + 1
    seen = bytearray(max_count)
    prefix = b"ferry-bo "  # never "STAT": the guest must echo, not answer with counters
    seq = sent = send_errors = recv_errors = received = duplicates = skips = 0
    longest_gap = 0.0
    longest_gap_at: float | None = None
    gaps: list[tuple[float, float]] = []  # min-heap of (length_s, start_offset_s)
    first_reply: float | None = None
    last_reply: float | None = None
    last_send: float | None = None
    longest_send_gap = 0.0
    rtt_max = rtt_sum = 0.0
    stopped_by = "duration"

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((ip, port))  # the kernel then only delivers replies from ip:port
        s.setblocking(False)
        if ready is not None:
            ready()
        t0 = time.monotonic()
        wall0 = time.time()
        end = t0 + duration
        send_end = end
        next_send = t0
        drain_until: float | None = None
        while True:
            now = time.monotonic()
            if drain_until is None and (now >= end or seq >= max_count or stop.requested):
                if stop.requested:
                    stopped_by = stop.signal or "signal"
                send_end = now
                drain_until = now + DRAIN_S
            if drain_until is not None and (now >= drain_until or received >= sent):
                break
            if drain_until is None and now >= next_send:
                if now - next_send > BEHIND_LIMIT_S:
                    skips += 1
                    next_send = now
                try:
                    s.send(b"%s%d %d" % (prefix, seq, time.monotonic_ns()))
                    sent += 1
                except OSError:  # EHOSTUNREACH, ECONNREFUSED from an earlier ICMP, ENOBUFS
                    send_errors += 1
                if last_send is not None:
                    longest_send_gap = max(longest_send_gap, now - last_send)
                last_send = now
                seq += 1
                next_send += interval
            wake = min(next_send, end) if drain_until is None else drain_until
            readable, _, _ = select.select([s], [], [], max(0.0, wake - time.monotonic()))
            if not readable:
                continue
            for _ in range(10_000):  # read what is queued, bounded
                try:
                    data = s.recv(2048)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:  # ECONNREFUSED after an ICMP port unreachable
                    recv_errors += 1
                    break
                t = time.monotonic()
                fields = data[len(prefix) :].split(b" ") if data.startswith(prefix) else []
                try:
                    rseq, sent_ns = int(fields[0]), int(fields[1])
                except (IndexError, ValueError):
                    continue
                if not 0 <= rseq < seq or seen[rseq]:
                    duplicates += 1
                    continue
                seen[rseq] = 1
                received += 1
                rtt = max(0.0, (time.monotonic_ns() - sent_ns) / 1e9)
                rtt_max = max(rtt_max, rtt)
                rtt_sum += rtt
                if last_reply is None:
                    first_reply = t - t0
                else:
                    gap = t - last_reply
                    if gap > longest_gap:
                        longest_gap, longest_gap_at = gap, last_reply - t0
                    if gap * 1000 > GAP_REPORT_MS:
                        item = (gap, last_reply - t0)
                        if len(gaps) < GAP_LIST_LEN:
                            heapq.heappush(gaps, item)
                        else:
                            heapq.heappushpop(gaps, item)
                last_reply = t
    elapsed = send_end - t0
    return {
        "kind": "blackout",
        "ip": ip,
        "port": port,
        "ok": received >= 2,
        "interval_ms": _ms(interval),
        "duration_s": round(elapsed, 3),
        "stopped_by": stopped_by,
        "started_epoch": round(wall0, 6),
        "sent": sent,
        "received": received,
        "lost": max(0, sent - received),
        "send_errors": send_errors,
        "recv_errors": recv_errors,
        "duplicates": duplicates,
        "rate_hz": round(sent / elapsed, 1) if elapsed > 0 else 0.0,
        "skips": skips,
        "longest_send_gap_ms": _ms(longest_send_gap),
        "longest_gap_ms": _ms(longest_gap) if received >= 2 else None,
        "longest_gap_start_s": round(longest_gap_at, 6) if longest_gap_at is not None else None,
        "longest_gap_start_epoch": (
            round(wall0 + longest_gap_at, 6) if longest_gap_at is not None else None
        ),
        "gaps": [[round(at, 6), _ms(g)] for g, at in sorted(gaps, reverse=True)],
        "first_reply_s": round(first_reply, 6) if first_reply is not None else None,
        "tail_gap_ms": _ms(max(0.0, send_end - last_reply)) if last_reply is not None else None,
        "rtt_ms_max": _ms(rtt_max) if received else None,
        "rtt_ms_avg": _ms(rtt_sum / received) if received else None,
    }


def outages(
    gaps: list[list[float]], min_ms: float = 100.0, join_ms: float = 250.0
) -> list[tuple[float, float]]:
    """The outages in a ``blackout`` result's ``gaps`` ([start s, length ms]), in time order.

    Gaps longer than ``min_ms`` count; gaps less than ``join_ms`` apart are one outage (the guest
    answered once in between). Each is (start s, length ms from its first to its last gap's end).
    """
    merged: list[tuple[float, float]] = []
    for at, ms in sorted((at, ms) for at, ms in gaps if ms > min_ms):
        if merged and at <= merged[-1][0] + (merged[-1][1] + join_ms) / 1000:
            start = merged[-1][0]
            merged[-1] = (start, max(merged[-1][1], (at - start) * 1000 + ms))
        else:
            merged.append((at, ms))
    return merged


class _Closed(Exception):
    """The peer closed the TCP session (EOF)."""


def _sleep_until(deadline: float, stop: StopFlag) -> None:
    """Sleep until ``deadline`` in short steps, returning early once a stop is requested."""
    while not stop.requested:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


def _read_exact(s: socket.socket, n: int, deadline: float, stop: StopFlag) -> bytes | None:
    """Read ``n`` bytes by ``deadline``; None if a stop was requested first."""
    buf = b""
    while len(buf) < n:
        if stop.requested:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no echo within {SESSION_READ_TIMEOUT_S:.0f} s")
        readable, _, _ = select.select([s], [], [], min(left, 0.05))
        if readable:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise _Closed("the guest closed the TCP session (EOF)")
            buf += chunk
    return buf


def session(
    ip: str,
    duration: float,
    interval: float = 0.02,
    port: int = PORT,
    stop: StopFlag | None = None,
    read_timeout: float = SESSION_READ_TIMEOUT_S,
    ready: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Keep one TCP connection exchanging numbered lines; report whether it survived.

    Each line's echo may take up to ``read_timeout`` (a migration pause is not an error);
    a reset, EPIPE or EOF sets ``reset``; a wrong echo or a timeout sets ``error``.
    """
    stop = stop or StopFlag()
    duration = min(max(duration, 0.0), MAX_DURATION_S)
    interval = max(interval, 0.001)
    lines = 0
    reset = False
    error: str | None = None
    longest_stall = 0.0
    connected_at: float | None = None
    t0 = time.monotonic()
    end = t0 + duration
    try:
        with socket.create_connection((ip, port), timeout=read_timeout) as s:
            connected_at = last_ok = next_send = time.monotonic()
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ready is not None:
                ready()
            n = 0
            max_lines = int(duration / interval) + 2  # bounded; the clock ends it sooner
            while n < max_lines:
                now = time.monotonic()
                if stop.requested or now >= end:
                    break
                if now < next_send:
                    _sleep_until(min(next_send, end), stop)
                    continue
                if now - next_send > BEHIND_LIMIT_S:
                    next_send = now
                next_send += interval
                line = b"ferry-ses %d\n" % n
                n += 1
                s.sendall(line)
                got = _read_exact(s, len(line), time.monotonic() + read_timeout, stop)
                if got is None:
                    break
                if got != line:
                    error = f"echo mismatch: sent {line!r}, got {got!r}"
                    break
                t = time.monotonic()
                longest_stall = max(longest_stall, t - last_ok)
                last_ok = t
                lines += 1
    except _Closed as exc:
        reset, error = True, str(exc)
    except TimeoutError as exc:
        error = str(exc) or "timed out"
    except OSError as exc:
        reset = exc.errno in (errno.ECONNRESET, errno.EPIPE)
        error = str(exc)
    done = time.monotonic()
    return {
        "kind": "session",
        "ip": ip,
        "port": port,
        "ok": error is None and not reset and lines > 0,
        "lines": lines,
        "reset": reset,
        "error": error,
        "longest_stall_ms": _ms(longest_stall),
        "connected_s": round(done - connected_at, 3) if connected_at is not None else 0.0,
        "stopped_by": stop.signal or ("duration" if error is None else "error"),
    }


def _write_out(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (readers never see a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry (inside the client namespace)."""
    ap = argparse.ArgumentParser(prog="vmferry.lab.probe")
    ap.add_argument("kind", choices=("udp", "tcp", "stat", "blackout", "session"))
    ap.add_argument("ip")
    ap.add_argument("--port", type=int, default=PORT)
    ap.add_argument("--count", type=int, default=5)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--timeout", type=float, default=1.0)
    ap.add_argument("--duration", type=float, help="seconds (blackout, session; max 600)")
    ap.add_argument("--interval-ms", type=float, help="blackout: 1 (default), session: 20")
    ap.add_argument("--out", type=Path, help="also write the JSON result to this file")
    a = ap.parse_args(argv)
    if not 0 < a.port < 65536:
        ap.error("--port must be 1..65535")
    if a.kind in ("blackout", "session"):
        if a.duration is None or not 0 < a.duration <= MAX_DURATION_S:
            ap.error(f"{a.kind} needs --duration in (0, {MAX_DURATION_S:.0f}] seconds")
        if a.interval_ms is not None and not 0.1 <= a.interval_ms <= 60_000:
            ap.error("--interval-ms must be 0.1..60000")
    count = max(1, min(a.count, 100_000))
    stop = StopFlag()

    def ready() -> None:
        print(f"{READY_MARK} {a.kind}", file=sys.stderr, flush=True)

    result: dict[str, Any]
    try:
        if a.kind == "udp":
            result = udp_echo(a.ip, count, a.interval, a.timeout, a.port)
        elif a.kind == "tcp":
            result = tcp_echo(a.ip, count, a.interval, a.timeout, a.port)
        elif a.kind == "stat":
            result = stat(a.ip, a.timeout, port=a.port)
        elif a.kind == "blackout":
            stop.install()
            interval = (a.interval_ms or 1.0) / 1000
            result = blackout(a.ip, a.duration, interval, a.port, stop, ready)
        else:
            stop.install()
            interval = (a.interval_ms or 20.0) / 1000
            result = session(a.ip, a.duration, interval, a.port, stop, ready=ready)
    except OSError as exc:
        result = {"kind": a.kind, "ip": a.ip, "ok": False, "error": str(exc)}
    text = json.dumps(result)
    if a.out is not None:
        _write_out(a.out, text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
