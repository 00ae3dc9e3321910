"""Time as relayd reads it: one injectable clock, so tests can move it instead of sleeping.

Two kinds of time are kept apart. *Wall* time (unix epoch) is what clients
see in timestamps and what signed statements carry. *Monotonic* time measures
durations: timeouts, rate windows, token lifetimes. Code that needs either
takes a ``Clock``; nothing else in relayd calls ``time.time()`` or
``time.monotonic()`` for protocol decisions.
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
