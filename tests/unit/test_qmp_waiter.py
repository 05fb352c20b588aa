"""The pre-copy loop's sleep wakes as soon as QEMU sends a watched event; a lost connection
is a :class:`QmpError` like any other failure to reach QEMU."""

from __future__ import annotations

import asyncio
import time

import pytest
from qemu.qmp import EventListener, ExecInterruptedError
from qemu.qmp.message import Message

from vmferry.qemu.qmp import EventWaiter, QmpError, QmpSession


def _event(name: str) -> Message:
    return Message({"event": name, "data": {"status": "pre-switchover"}, "timestamp": {}})


def test_no_event_sleeps_the_whole_timeout() -> None:
    waiter = EventWaiter(EventListener(("MIGRATION",)))
    t0 = time.monotonic()
    assert asyncio.run(waiter.wait(0.05)) is False
    assert time.monotonic() - t0 >= 0.045


def test_an_event_wakes_the_waiter_at_once_and_is_taken() -> None:
    async def scenario() -> tuple[bool, float, bool]:
        listener = EventListener(("MIGRATION",))
        waiter = EventWaiter(listener)
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, lambda: asyncio.ensure_future(listener.put(_event("MIGRATION"))))
        t0 = time.monotonic()
        woke = await waiter.wait(5.0)
        took = time.monotonic() - t0
        # two events that came while the loop was busy wake it once, then it sleeps again
        await listener.put(_event("MIGRATION"))
        await listener.put(_event("MIGRATION"))
        assert await waiter.wait(5.0)
        return woke, took, await waiter.wait(0.01)

    woke, took, again = asyncio.run(scenario())
    assert woke and took < 1.0
    assert again is False


class _LostClient:
    """A qemu.qmp client whose QEMU closed the socket before answering."""

    async def execute(self, cmd: str, args: object = None, oob: bool = False) -> object:
        raise ExecInterruptedError("Disconnected")


def test_a_connection_lost_mid_command_is_a_qmp_error() -> None:
    session = QmpSession(_LostClient(), timeout=1.0)  # type: ignore[arg-type]
    with pytest.raises(QmpError, match="query-status: the connection to QEMU was lost"):
        asyncio.run(session.status())
