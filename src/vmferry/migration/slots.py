"""Concurrency: at most ``max_concurrent`` moves per host, counted at source and destination.

Outgoing moves wait in a FIFO queue for a slot; an incoming move takes a slot at once or is
refused (the source then waits and asks again, keeping its place in its own queue). A move may
also belong to a group with its own limit (a drain: at most ``drain_concurrency`` of its moves at
once); a waiter held back by its group lets the ones behind it pass.
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
        self._groups: dict[str, tuple[str, int]] = {}  # key → (group, its limit)

    def _fits(self, key: str) -> bool:
        if len(self.in_use) >= self._limit():
            return False
        group = self._groups.get(key)
        if group is None:
            return True
        name, limit = group
        return sum(1 for k in self.in_use if self._groups.get(k, ("",))[0] == name) < limit

    @property
    def waiting(self) -> int:
        """How many keys wait in the queue (the metrics' queue length)."""
        return sum(1 for _, fut in self._waiters if not fut.done())

    def position(self, key: str) -> int | None:
        """1-based place of ``key`` in the queue, or None if it is not waiting."""
        for i, (k, _) in enumerate(self._waiters, start=1):
            if k == key:
                return i
        return None

    def try_acquire(self, key: str) -> bool:
        """Take a slot now if one is free (for ``key``'s group too) and nobody who could take
        it is queued ahead."""
        if key in self.in_use:
            return True
        if self._fits(key) and not any(self._fits(k) for k, _ in self._waiters):
            self.in_use.add(key)
            return True
        return False

    async def acquire(self, key: str, group: str | None = None, group_limit: int = 0) -> None:
        """Wait in line for a slot (and, with ``group``, for one of the group's ``group_limit``)."""
        if group and group_limit > 0:
            self._groups[key] = (group, group_limit)
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
            self._groups.pop(key, None)
            raise

    def release(self, key: str) -> None:
        """Give a slot back and wake the next in line that may take one."""
        self.in_use.discard(key)
        self._groups.pop(key, None)
        keep: deque[tuple[str, asyncio.Future[None]]] = deque()
        while self._waiters:
            k, fut = self._waiters.popleft()
            if fut.done():
                continue
            if self._fits(k):
                self.in_use.add(k)
                fut.set_result(None)
            else:
                keep.append((k, fut))
        self._waiters = keep
