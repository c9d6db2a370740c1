"""FairGate: streams take turns at the compute thread, whatever their backlog."""

from __future__ import annotations

import asyncio

from ditserve.stage.fairness import FairGate


def _serve(gate: FairGate, arrivals: list[tuple[str, int]]) -> list[str]:
    """Each (stream, n) queues n jobs, all before any runs; returns the order they ran."""
    order: list[str] = []

    async def job(stream: str) -> None:
        async with gate.turn(stream):
            await asyncio.sleep(0)  # the compute: yields like the executor would
            order.append(stream)

    async def main() -> None:
        tasks = []
        for stream, n in arrivals:
            tasks += [asyncio.create_task(job(stream)) for _ in range(n)]
        await asyncio.gather(*tasks)

    asyncio.run(main())
    return order


def test_a_late_stream_is_served_within_one_turn_of_a_backlog():
    order = _serve(FairGate(slots=2), [("flood", 40), ("coordinator", 3)])
    # The two admitted at once, then the streams alternate while both have work (a FIFO
    # would run all 40 of the flood first).
    assert order[:8] == ["flood", "flood", "flood", "coordinator", "flood", "coordinator",
                         "flood", "coordinator"], order
    assert order.count("flood") == 40 and len(order) == 43


def test_three_streams_round_robin():
    order = _serve(FairGate(slots=1), [("a", 5), ("b", 5), ("c", 5)])
    assert order[:10] == ["a", "a", "b", "c", "a", "b", "c", "a", "b", "c"], order


def test_a_cancelled_waiter_passes_its_turn_on():
    async def main() -> list[str]:
        gate, order = FairGate(slots=1), []
        release = asyncio.Event()

        async def job(stream: str, hold: bool = False) -> None:
            async with gate.turn(stream):
                order.append(stream)
                if hold:
                    await release.wait()

        first = asyncio.create_task(job("a", hold=True))
        await asyncio.sleep(0)
        doomed = asyncio.create_task(job("b"))
        later = asyncio.create_task(job("c"))
        await asyncio.sleep(0)
        doomed.cancel()
        release.set()
        await asyncio.gather(first, later)
        assert doomed.cancelled()
        assert gate._running == 0 and gate.waiting == 0  # nothing leaked
        return order

    assert asyncio.run(main()) == ["a", "c"]
