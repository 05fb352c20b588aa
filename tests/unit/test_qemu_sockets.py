"""Bounding the send queue of another process's sockets (what the engine does to QEMU's)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from vmferry.qemu.sockets import (
    _getfd,
    listener_fds,
    set_nodelay,
    set_notsent_lowat,
    stream_fds,
)

_CHILD = """
import socket, sys, time
a = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
b = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
print("up", flush=True)
time.sleep(30)
"""


@pytest.fixture
def child() -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """A process holding one connection to each of two local listeners."""
    servers = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    ports = [s.getsockname()[1] for s in servers]
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, *map(str, ports)], stdout=subprocess.PIPE, text=True
    )
    accepted = [s.accept()[0] for s in servers]
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    try:
        yield proc, ports[0], ports[1]
    finally:
        proc.kill()
        proc.wait()
        for s in [*accepted, *servers]:
            s.close()


def _option(pid: int, fd: int, option: int) -> int:
    pidfd = os.pidfd_open(pid)
    try:
        s = socket.socket(fileno=_getfd(pidfd, fd))
    finally:
        os.close(pidfd)
    try:
        return s.getsockopt(socket.IPPROTO_TCP, option)
    finally:
        s.close()


def _lowat(pid: int, fd: int) -> int:
    return _option(pid, fd, socket.TCP_NOTSENT_LOWAT)


def test_only_the_stream_to_the_port_is_bounded(
    child: tuple[subprocess.Popen[str], int, int],
) -> None:
    proc, port, other_port = child
    fds = stream_fds(proc.pid, port)
    others = stream_fds(proc.pid, other_port)
    assert len(fds) == 1 and len(others) == 1 and fds.keys() != others.keys()
    before = _lowat(proc.pid, next(iter(others)))
    set_notsent_lowat(proc.pid, list(fds), 128 << 10)
    assert _lowat(proc.pid, next(iter(fds))) == 128 << 10
    assert _lowat(proc.pid, next(iter(others))) == before  # the other socket is untouched
    # the process's own descriptor still works after the agent's duplicate is closed
    time.sleep(0.05)
    assert proc.poll() is None
    assert next(iter(fds)) in {int(n) for n in os.listdir(f"/proc/{proc.pid}/fd")}


def test_no_connection_to_the_port_finds_nothing(
    child: tuple[subprocess.Popen[str], int, int],
) -> None:
    proc, _port, _other = child
    unused = socket.create_server(("127.0.0.1", 0))
    try:
        assert stream_fds(proc.pid, unused.getsockname()[1]) == {}
    finally:
        unused.close()


def test_a_process_that_is_gone_is_an_os_error() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert stream_fds(proc.pid, 1) == {}
    with pytest.raises(OSError):
        set_notsent_lowat(proc.pid, [3], 1 << 17)


_LISTENER = """
import socket, time
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
print("accepted", flush=True)
time.sleep(30)
"""


def test_connections_accepted_after_nodelay_on_the_listener_inherit_it() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _LISTENER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        listeners = listener_fds(proc.pid, port)
        assert len(listeners) == 1
        assert stream_fds(proc.pid, port) == {}  # nothing connects *to* that port from it
        set_nodelay(proc.pid, list(listeners))
        with socket.create_connection(("127.0.0.1", port)) as client:
            assert proc.stdout.readline().strip() == "accepted"
            accepted = stream_fds(proc.pid, client.getsockname()[1])
            assert len(accepted) == 1
            assert _option(proc.pid, next(iter(accepted)), socket.TCP_NODELAY) == 1
    finally:
        proc.kill()
        proc.wait()
