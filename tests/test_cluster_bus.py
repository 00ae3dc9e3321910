"""relayd.cluster.bus: whether the inbox is subscribed is said by its current listener only."""

from __future__ import annotations

import asyncio
from typing import Any

from relayd.cluster.bus import Bus


class _SlowToLeave:
    """A backplane whose subscription confirms at once and, once dropped, ends only when ``release`` is set: the
    close of a connection on a link that was stalled."""

    deadline_s = 1.0

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.listens = 0

    async def listen(self, instance: str, events: Any) -> None:
        self.listens += 1
        events.confirmed()
        try:
            await asyncio.Event().wait()
        finally:
            await self.release.wait()


def test_a_listener_replaced_by_resubscribe_cannot_unsay_its_successors_subscription() -> None:
    """The pg_hang finding of a CI replica: the inbox's watchdog resubscribed while the old listener was still
    unwinding; the new one subscribed, then the old one's end marked the inbox unsubscribed, and /health/ready
    stayed 503 with the inbox listening (the heartbeat, which would have noticed, waits for a subscribed inbox)."""
    async def body() -> None:
        backplane = _SlowToLeave()
        bus = Bus(backplane, "node0", 1.0)  # type: ignore[arg-type]  # only listen() and deadline_s are used
        try:
            await bus.start()
            assert bus.subscribed
            old = bus._listener
            assert old is not None
            bus.resubscribe()
            assert not bus.subscribed  # the old subscription is dropped at once
            while backplane.listens < 2:
                await asyncio.sleep(0)
            assert bus.subscribed  # the new listener's
            backplane.release.set()
            await asyncio.wait([old])
            assert bus.subscribed
        finally:
            backplane.release.set()  # whatever failed, every listener can end
            await bus.close()
        assert not bus.subscribed
    asyncio.run(asyncio.wait_for(body(), 10))
