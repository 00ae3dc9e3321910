"""relayd.cluster.deadlines: limits of one length under one timer behave like asyncio.timeout."""

from __future__ import annotations

import asyncio

import pytest

from relayd.cluster.deadlines import Deadlines


async def _guarded(deadlines: Deadlines, wait: asyncio.Future[None]) -> str:
    with deadlines.limit():
        await wait
    return "done"


def test_a_block_past_its_limit_raises_timeout_and_one_in_time_does_not() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        deadlines = Deadlines(0.05)
        never: asyncio.Future[None] = loop.create_future()
        soon: asyncio.Future[None] = loop.create_future()
        stuck = [asyncio.create_task(_guarded(deadlines, never)) for _ in range(3)]
        quick = asyncio.create_task(_guarded(deadlines, soon))
        await asyncio.sleep(0)
        soon.set_result(None)
        assert await quick == "done"
        for task in stuck:
            with pytest.raises(TimeoutError):
                await task
            assert task.cancelling() == 0
        assert await asyncio.create_task(_guarded(deadlines, _done(loop))) == "done"
        await _emptied(deadlines)  # the limits left behind go once their time passed
    asyncio.run(asyncio.wait_for(body(), 10))


def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    async def body() -> None:
        deadlines = Deadlines(10)
        task = asyncio.create_task(_guarded(deadlines, asyncio.get_running_loop().create_future()))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(asyncio.wait_for(body(), 10))


def test_an_error_inside_the_block_passes_through_and_the_limit_is_left() -> None:
    async def failing(deadlines: Deadlines) -> None:
        with deadlines.limit():
            raise ValueError("inside")

    async def body() -> None:
        deadlines = Deadlines(0.02)
        with pytest.raises(ValueError):
            await asyncio.create_task(failing(deadlines))
        await _emptied(deadlines)
    asyncio.run(asyncio.wait_for(body(), 10))


async def _emptied(deadlines: Deadlines) -> None:
    while len(deadlines):
        await asyncio.sleep(0.01)


def _done(loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    future: asyncio.Future[None] = loop.create_future()
    future.set_result(None)
    return future
