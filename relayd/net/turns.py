"""REST answers take turns per client IP: each IP starts at most a few answers per event-loop iteration.

Pipelined requests already yield between answers, but one IP with hundreds of
connections would still get hundreds of answers (``/metrics`` costs about
2 ms) in every iteration, ahead of everyone else. Here one IP's requests past
``PER_TURN`` in an iteration wait, in order, for the next one; other IPs,
WebSocket frames and timers are not held up. An idle relay's iterations are
short, so the app's key lookups behind one carrier NAT lose nothing.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field

from ..ratelimit import limit_key

PER_TURN = 4
"""Answers one client IP may start in one event-loop iteration."""


@dataclass(slots=True)
class _Ip:
    started: int = 0
    waiting: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)


class Turns:
    """Per client IP: how many answers started in this iteration, and the requests waiting for the next."""

    def __init__(self) -> None:
        self._ips: dict[str, _Ip] = {}
        self._reset_scheduled = False

    async def take(self, client_ip: str) -> None:
        """Return when ``client_ip`` may start one more answer (at once unless it used its turn's share)."""
        key = limit_key(client_ip)
        ip = self._ips.get(key)
        if ip is None:
            ip = self._ips[key] = _Ip()
        if ip.started < PER_TURN and not ip.waiting:
            ip.started += 1
            self._schedule_reset()
            return
        waiter = asyncio.get_running_loop().create_future()
        ip.waiting.append(waiter)
        self._schedule_reset()
        await waiter  # started is counted by _next_turn, which resolved it

    def _schedule_reset(self) -> None:
        if not self._reset_scheduled:
            self._reset_scheduled = True
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        """A new iteration: every IP's share starts again, and its first waiting requests go on."""
        self._reset_scheduled = False
        for key, ip in list(self._ips.items()):
            ip.started = 0
            while ip.waiting and ip.started < PER_TURN:
                waiter = ip.waiting.popleft()
                if not waiter.done():  # a cancelled one (shutdown) gives its place to the next
                    waiter.set_result(None)
                    ip.started += 1
            if ip.waiting or ip.started:
                self._schedule_reset()
            else:
                del self._ips[key]
