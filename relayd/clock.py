"""Time as relayd decides by it: one injectable clock, so tests can move it instead of sleeping.

Two kinds of time are kept apart. *Wall* time (unix epoch) is what clients
see in timestamps and what signed statements carry. *Monotonic* time measures
durations. The server hands one ``Clock`` to the parts whose decisions a test
must be able to move: message timestamps, sign-in challenges and tokens,
the auth deadline, retention, the new-queue budgets, the REST and connection
rate windows, and the per-connection frame limiter (which binds
``monotonic`` once and reads it for every frame).

Not on this clock: timers that only pace I/O run on the event loop's clock
(HTTP head and idle timeouts, keepalive pings and stalls, the housekeeping
tick, the cluster's heartbeats and replies), so a test that moves a
``Clock`` still waits for them in real time; the cluster's presence cache
reads ``time.monotonic()`` and the storage backends stamp some records with
``time.time()`` themselves.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def wall(self) -> float:
        """Unix time in seconds (may step when the system clock is set)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never steps; only differences mean anything."""
        ...


class SystemClock:
    """The operating system's clocks."""

    wall = staticmethod(time.time)
    monotonic = staticmethod(time.monotonic)


def wall_ms(clock: Clock) -> int:
    """Milliseconds since the epoch, the unit of every timestamp on the wire."""
    return int(clock.wall() * 1000)


SYSTEM_CLOCK = SystemClock()
