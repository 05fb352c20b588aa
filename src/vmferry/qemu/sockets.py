"""Set TCP options on the sockets a QEMU process opened for a migration stream.

QEMU opens its migration connections itself and leaves two things to the kernel's defaults that
cost the guest time (docs/migration.md, "The migration sockets"): Nagle's algorithm on the main
channel (small writes wait for the peer's delayed acknowledgement, up to 40 ms), and a send
queue of up to ``net.ipv4.tcp_wmem``'s 4 MiB that QEMU's switchover plan does not count. The
agent takes a duplicate of QEMU's socket descriptor (``pidfd_getfd``, Linux 5.6+, which needs
the right to trace QEMU that the agent that started it has) and sets the option on it; the
duplicate shares the socket, so the setting is QEMU's. Nothing else on the host changes.
"""

from __future__ import annotations

import ctypes
import os
import socket
from pathlib import Path

#: pidfd_getfd(2): the same number on every architecture (Linux 5.6+).
_SYS_PIDFD_GETFD = 438
_TCP_ESTABLISHED, _TCP_LISTEN = "01", "0A"
_TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


def _inodes(pid: int, port: int, *, listening: bool) -> set[int]:
    """Socket inodes in ``pid``'s network namespace: connected to remote ``port``, or (with
    ``listening``) listening on local ``port``."""
    inodes: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[3] != (_TCP_LISTEN if listening else _TCP_ESTABLISHED):
                continue
            if int(f[1 if listening else 2].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(f[9]))
    return inodes


def _fds_of(pid: int, wanted: set[int]) -> dict[int, int]:
    found: dict[int, int] = {}
    if not wanted:
        return found
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in entries:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inode = int(target[8:-1])
            if inode in wanted:
                found[int(name)] = inode
    return found


def stream_fds(pid: int, remote_port: int) -> dict[int, int]:
    """The process's descriptors (fd -> socket inode) of its connections to ``remote_port``."""
    return _fds_of(pid, _inodes(pid, remote_port, listening=False))


def listener_fds(pid: int, local_port: int) -> dict[int, int]:
    """The process's descriptors (fd -> socket inode) listening on ``local_port``."""
    return _fds_of(pid, _inodes(pid, local_port, listening=True))


def _getfd(pidfd: int, fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    new = int(libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0))
    if new < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return new


def _set_tcp_option(pid: int, fds: list[int], option: int, value: int) -> None:
    pidfd = os.pidfd_open(pid)
    try:
        for fd in fds:
            sock = socket.socket(fileno=_getfd(pidfd, fd))
            try:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
            finally:
                sock.close()  # closes the duplicate only; the process's descriptor stays open
    finally:
        os.close(pidfd)


def set_notsent_lowat(pid: int, fds: list[int], limit_bytes: int) -> None:
    """Set ``TCP_NOTSENT_LOWAT`` on sockets ``fds`` of process ``pid``.

    Raises OSError when the kernel refuses (no pidfd_getfd, not allowed to trace ``pid``).
    """
    _set_tcp_option(pid, fds, _TCP_NOTSENT_LOWAT, limit_bytes)


def set_nodelay(pid: int, fds: list[int]) -> None:
    """Turn Nagle's algorithm off (``TCP_NODELAY``) on sockets ``fds`` of process ``pid``;
    connections a listening socket accepts afterwards inherit it. Raises OSError as above."""
    _set_tcp_option(pid, fds, socket.TCP_NODELAY, 1)
