"""What a save turns off covers every capability a live move may have turned on."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from vmferry.migration.qemu_ops import set_capabilities
from vmferry.qemu.stream import MOVE_CAPABILITIES, all_off


class _Recorder:
    """Stands in for a QMP session: keeps the capabilities it was asked to turn on."""

    def __init__(self) -> None:
        self.on: set[str] = set()

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        if cmd == "migrate-set-capabilities":
            assert args is not None
            self.on |= {c["capability"] for c in args["capabilities"] if c["state"]}
        return {}


def test_every_capability_a_move_turns_on_is_one_a_save_turns_off() -> None:
    seen: set[str] = set()
    combos = itertools.product(
        ("tcp", "compression", "multichannel"), (False, True), (False, True), (False, True),
        (False, True), (None, 64 << 20),
    )  # fmt: skip
    for transport, postcopy, incoming, pause, converge, cache in combos:
        q = _Recorder()
        asyncio.run(set_capabilities(
            q, transport, 4, postcopy, incoming=incoming, pause_before_switchover=pause,  # type: ignore[arg-type]
            auto_converge=converge, xbzrle_cache=cache,
        ))  # fmt: skip
        seen |= q.on
    assert seen - {"events"} == set(MOVE_CAPABILITIES)


def test_all_off_names_each_capability_once_and_turns_it_off() -> None:
    caps = all_off()["capabilities"]
    assert [c["capability"] for c in caps] == list(MOVE_CAPABILITIES)
    assert all(c["state"] is False for c in caps)
