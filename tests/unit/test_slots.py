"""Move slots: FIFO order, limit respected, cancellation leaves no hole."""

import asyncio

from vmferry.migration.slots import Slots


def test_fifo_and_limit() -> None:
    async def main() -> list[str]:
        slots = Slots(lambda: 2)
        order: list[str] = []
        assert slots.try_acquire("a") and slots.try_acquire("b")
        assert not slots.try_acquire("x")

        async def job(k: str) -> None:
            await slots.acquire(k)
            order.append(k)

        tasks = [asyncio.create_task(job(k)) for k in ("c", "d", "e")]
        await asyncio.sleep(0)
        assert slots.position("c") == 1 and slots.position("e") == 3
        slots.release("a")
        await asyncio.sleep(0)
        slots.release("b")
        await asyncio.sleep(0)
        assert order == ["c", "d"] and slots.position("e") == 1
        tasks[2].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert slots.position("e") is None
        slots.release("c")
        assert slots.try_acquire("f")
        return order

    assert asyncio.run(main()) == ["c", "d"]


def test_a_group_limit_holds_its_moves_back_without_blocking_others() -> None:
    async def main() -> list[str]:
        slots = Slots(lambda: 3)
        order: list[str] = []

        async def take(key: str, group: str | None = None) -> None:
            await slots.acquire(key, group, 2 if group else 0)
            order.append(key)

        tasks = [asyncio.create_task(take(k, "drain")) for k in ("d1", "d2", "d3", "d4")]
        await asyncio.sleep(0)
        assert sorted(order) == ["d1", "d2"] and slots.position("d3") == 1
        other = asyncio.create_task(take("solo"))  # the host has a third slot: it passes
        await asyncio.sleep(0)
        assert "solo" in order and slots.position("d3") == 1
        slots.release("d1")  # one of the group ends: its next in line starts at once
        await asyncio.sleep(0)
        assert order[-1] == "d3" and slots.position("d4") == 1
        slots.release("solo")  # a free host slot does not let the group exceed its limit
        await asyncio.sleep(0)
        assert "d4" not in order
        slots.release("d2")
        await asyncio.gather(*tasks, other)
        return order

    assert asyncio.run(main())[-1] == "d4"
