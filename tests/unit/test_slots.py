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
