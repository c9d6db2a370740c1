"""FairGate: streams take turns at the compute thread, whatever their backlog."""

from __future__ import annotations

import asyncio

from ditserve.stage.fairness import FairGate, OriginWindow


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


def _serve_origins(gate: FairGate, arrivals: list[tuple[str, str, int]]) -> list[str]:
    """Each (stream, origin, n) queues n jobs before any runs; returns "stream/origin" in
    the order they ran."""
    order: list[str] = []

    async def job(stream: str, origin: str) -> None:
        async with gate.turn(stream, origin):
            await asyncio.sleep(0)
            order.append(f"{stream}/{origin}")

    async def main() -> None:
        tasks = [asyncio.create_task(job(s, o)) for s, o, n in arrivals for _ in range(n)]
        await asyncio.gather(*tasks)

    asyncio.run(main())
    return order


def test_origins_take_turns_within_the_relay_stream():
    # Stage 1 sees one relay stream: a flood that entered stage 0 (origin 7) queued ahead
    # of the coordinator's microbatches (origin 3) no longer runs first.
    order = _serve_origins(FairGate(slots=1), [("relay", "7", 20), ("relay", "3", 3)])
    assert order[:6] == ["relay/7", "relay/7", "relay/3", "relay/7", "relay/3", "relay/7"], order
    assert order.count("relay/7") == 20


def test_streams_come_before_origins():
    # A peer dialling this stage directly and inventing an origin per microbatch gets its
    # stream's turn, not one turn per invented origin.
    arrivals = [("direct", str(i), 1) for i in range(12)] + [("relay", "coordinator", 4)]
    order = _serve_origins(FairGate(slots=1), arrivals)
    first_eight = [o.split("/")[0] for o in order[:8]]
    assert first_eight == ["direct", "direct", "relay", "direct", "relay", "direct", "relay",
                           "direct"], order


def test_the_origin_window_holds_a_backlog_back_and_forgets_idle_origins():
    async def main() -> None:
        window, inside, peak = OriginWindow(3), [], [0]
        release = asyncio.Event()

        async def job(origin: str) -> None:
            async with window.hold(origin):
                inside.append(origin)
                peak[0] = max(peak[0], window.inside("flood"))
                await release.wait()

        floods = [asyncio.create_task(job("flood")) for _ in range(10)]
        other = asyncio.create_task(job("coordinator"))
        for _ in range(5):
            await asyncio.sleep(0)
        assert inside.count("flood") == 3 and "coordinator" in inside  # not behind the 10
        release.set()
        await asyncio.gather(*floods, other)
        assert peak[0] == 3 and len(inside) == 11
        assert window._held == {} and not +window._users  # nothing kept per origin

    asyncio.run(main())


def test_a_cancelled_wait_in_the_window_leaks_nothing():
    async def main() -> None:
        window, release = OriginWindow(1), asyncio.Event()

        async def job() -> None:
            async with window.hold("a"):
                await release.wait()

        first, doomed = asyncio.create_task(job()), asyncio.create_task(job())
        await asyncio.sleep(0)
        doomed.cancel()
        release.set()
        await first
        assert doomed.cancelled() or doomed.done()
        assert window._held == {} and not +window._users

    asyncio.run(main())
