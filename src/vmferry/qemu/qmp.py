"""A short-lived QMP session over qemu.qmp, with timeouts and typed errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    StateError,
)

log = logging.getLogger("vmferry.qemu")


class QmpError(RuntimeError):
    """A QMP command failed or QEMU could not be reached; names the command."""


class EventWaiter:
    """Sleeps for a polling loop, waking early when QEMU sends one of the watched events."""

    def __init__(self, listener: EventListener) -> None:
        self._listener = listener

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds; True as soon as a watched event came (every event
        that came meanwhile is taken with it)."""
        if self._listener.empty():
            try:
                await asyncio.wait_for(self._listener.get(), timeout)
            except TimeoutError:
                return False
        self._listener.clear()
        return True


class QmpSession:
    """One connected QMP client; use :func:`qmp_session` to open one."""

    def __init__(self, client: QMPClient, timeout: float) -> None:
        self._client = client
        self.timeout = timeout

    async def execute(
        self,
        cmd: str,
        args: Mapping[str, object] | None = None,
        timeout: float | None = None,
        oob: bool = False,
    ) -> Any:
        """Run one QMP command and return its ``return`` value.

        ``oob`` runs it out of band (QEMU's monitor thread), for the few commands that must
        work while QEMU's main loop is blocked (``migrate-recover``, ``migrate-pause``).
        """
        try:
            return await asyncio.wait_for(
                self._client.execute(cmd, args, oob=oob), timeout or self.timeout
            )
        except ExecuteError as exc:
            raise QmpError(f"QMP {cmd} failed: {exc.error.error.desc}") from exc
        except (ExecInterruptedError, StateError) as exc:
            # QEMU closed the socket (it quit, or died) before it answered
            raise QmpError(f"QMP {cmd}: the connection to QEMU was lost ({exc})") from exc
        except TimeoutError as exc:
            raise QmpError(
                f"QMP {cmd} did not answer within {timeout or self.timeout:.0f} s"
            ) from exc

    async def send_fd(self, fd: int, name: str) -> None:
        """Pass an open file descriptor to QEMU under ``name`` (QMP getfd)."""
        self._client.send_fd_scm(fd)
        await self.execute("getfd", {"fdname": name})

    async def status(self) -> str:
        """QEMU's run state (running, paused, shutdown, inmigrate, postmigrate, ...)."""
        res = await self.execute("query-status")
        return str(res["status"])

    @contextmanager
    def waiter(self, *names: str) -> Iterator[EventWaiter]:
        """An :class:`EventWaiter` for events ``names`` (e.g. ``MIGRATION``) while in use."""
        listener = EventListener(names)
        self._client.register_listener(listener)
        try:
            yield EventWaiter(listener)
        finally:
            self._client.remove_listener(listener)


async def wait_for_socket(path: Path, timeout: float) -> None:
    """Wait until QEMU has created its QMP socket."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not path.exists():
        if asyncio.get_running_loop().time() >= deadline:
            raise QmpError(f"QMP socket {path} did not appear within {timeout:.0f} s")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def qmp_session(socket_path: Path, timeout: float = 10.0) -> AsyncIterator[QmpSession]:
    """Connect to QEMU's QMP socket for the duration of the block."""
    client = QMPClient(socket_path.parent.name)
    try:
        await asyncio.wait_for(client.connect(str(socket_path)), timeout)
    except (ConnectError, OSError, TimeoutError) as exc:
        raise QmpError(f"cannot reach QEMU's QMP socket {socket_path}: {exc}") from exc
    try:
        yield QmpSession(client, timeout)
    finally:
        try:
            await asyncio.wait_for(client.disconnect(), 5)
        except Exception as exc:  # disconnect errors after QEMU quit are expected
            log.debug("QMP disconnect: %s", exc)
