"""Throttling of repeated authentication and authorization failures, per source address."""

from __future__ import annotations

import time
from collections import OrderedDict, deque


class FailureThrottle:
    """Counts authentication/authorization failures per source address; bounded memory.

    After ``limit`` failures within ``window`` seconds an address is blocked for ``block``
    seconds. At most ``max_addresses`` addresses are tracked (the least recently seen are
    forgotten first), each with at most ``limit`` timestamps.
    """

    def __init__(
        self,
        limit: int = 20,
        window: float = 60.0,
        block: float = 60.0,
        max_addresses: int = 4096,
    ) -> None:
        self.limit = limit
        self.window = window
        self.block = block
        self.max_addresses = max_addresses
        self._fails: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked: OrderedDict[str, float] = OrderedDict()

    def blocked_for(self, address: str, now: float | None = None) -> float:
        """Seconds ``address`` stays blocked (0 when it is not)."""
        now = time.monotonic() if now is None else now
        until = self._blocked.get(address)
        if until is None:
            return 0.0
        if until <= now:
            del self._blocked[address]
            return 0.0
        return until - now

    def failure(self, address: str, now: float | None = None) -> bool:
        """Record one failure; True when it starts a block for ``address``."""
        now = time.monotonic() if now is None else now
        q = self._fails.get(address)
        if q is None:
            q = deque(maxlen=self.limit)
            self._fails[address] = q
            while len(self._fails) > self.max_addresses:
                self._fails.popitem(last=False)
        else:
            self._fails.move_to_end(address)
        q.append(now)
        while q and q[0] < now - self.window:
            q.popleft()
        if len(q) >= self.limit:
            q.clear()
            self._blocked[address] = now + self.block
            self._blocked.move_to_end(address)
            while len(self._blocked) > self.max_addresses:
                self._blocked.popitem(last=False)
            return True
        return False

    def tracked(self) -> int:
        """How many addresses are remembered (for tests of the memory bound)."""
        return len(self._fails) + len(self._blocked)
