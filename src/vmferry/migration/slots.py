"""Concurrency: at most ``max_concurrent`` moves per host, counted at source and destination.

Outgoing moves wait in a FIFO queue for a slot; an incoming move takes a slot at once or is
refused (the source then waits and asks again, keeping its place in its own queue).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class Slots:
    """A FIFO-fair counting semaphore whose size can change at run time."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self.in_use: set[str] = set()
        self._waiters: deque[tuple[str, asyncio.Future[None]]] = deque()

    def position(self, key: str) -> int | None:
        """1-based place of ``key`` in the queue, or None if it is not waiting."""
        for i, (k, _) in enumerate(self._waiters, start=1):
            if k == key:
                return i
        return None

    def try_acquire(self, key: str) -> bool:
        """Take a slot now if one is free and nobody is queued ahead."""
        if key in self.in_use:
            return True
        if len(self.in_use) < self._limit() and not self._waiters:
            self.in_use.add(key)
            return True
        return False

    async def acquire(self, key: str) -> None:
        """Wait in line for a slot."""
        if self.try_acquire(key):
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((key, fut))
        try:
            await fut
        except BaseException:
            self._waiters = deque((k, f) for k, f in self._waiters if k != key)
            if fut.done() and not fut.cancelled():
                self.release(key)
            raise

    def release(self, key: str) -> None:
        """Give a slot back and wake the next in line."""
        self.in_use.discard(key)
        while self._waiters and len(self.in_use) < self._limit():
            k, fut = self._waiters.popleft()
            if not fut.done():
                self.in_use.add(k)
                fut.set_result(None)
