"""The relay's one timer (``relayd.housekeeping``) stops when told, whatever its jobs do with the cancellation."""

from __future__ import annotations

import asyncio

from support import make_config, wait_for_state

from relayd.clock import SYSTEM_CLOCK
from relayd.housekeeping import Housekeeping
from relayd.ops.metrics import RelayMetrics
from relayd.storage.memory import MemoryStore


class SwallowingStore(MemoryStore):
    """A store whose retention expiry waits (a round trip that never ends) and swallows a cancellation, as a
    library catching ``CancelledError`` does, or ``asyncio.timeout`` on Python 3.11 when its deadline and an
    outside cancel coincide."""

    def __init__(self) -> None:
        super().__init__()
        self.expiring = asyncio.Event()

    async def expire(self, before_ms: int) -> int:
        self.expiring.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass
        return 0


def test_housekeeping_stops_even_when_a_job_swallows_the_cancellation():
    async def scenario() -> None:
        store = SwallowingStore()
        housekeeping = Housekeeping(make_config(server={"auth_timeout_s": "1"}), store, RelayMetrics(),
                                    SYSTEM_CLOCK, sweepers=[])
        housekeeping.start()
        await asyncio.wait_for(store.expiring.wait(), 10)  # the first tick runs retention expiry
        housekeeping.stop()
        await wait_for_state(lambda: not housekeeping.running, "housekeeping to stop")  # a tick here; before, never
    asyncio.run(scenario())
