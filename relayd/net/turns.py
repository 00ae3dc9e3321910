"""REST answers take turns per client IP: a few at a time, and a few started per event-loop iteration.

Pipelined requests already yield between answers, but one IP with hundreds of
connections would still get hundreds of answers (``/metrics`` costs about
2 ms) in every iteration, ahead of everyone else, and as many answers being
built at once (a batch of 1,000 keys is about 5 MB of objects while it is
built) as it has connections. Here one IP's requests past ``PER_IP`` wait, in
order, for one of its answers to finish and for the next iteration; other
IPs, WebSocket frames and timers are not held up. An idle relay's iterations
are short, so the app's key lookups behind one carrier NAT lose nothing.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field
from types import TracebackType

from ..ratelimit import limit_key

PER_IP = 4
"""Answers of one client IP being built at once, and started in one event-loop iteration."""


@dataclass(slots=True)
class _Ip:
    started: int = 0
    running: int = 0
    waiting: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)

    def may_start(self) -> bool:
        return self.started < PER_IP and self.running < PER_IP


class Turn:
    """One answer's turn, as ``async with``: a plain class, since every REST request takes one."""

    __slots__ = ("turns", "key")

    def __init__(self, turns: Turns, key: str) -> None:
        self.turns = turns
        self.key = key

    async def __aenter__(self) -> None:
        await self.turns._take(self.key)

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.turns._done(self.key)


class Turns:
    """Per client IP: answers started in this iteration, answers being built, and the requests waiting."""

    def __init__(self) -> None:
        self._ips: dict[str, _Ip] = {}
        self._next_scheduled = False

    def turn(self, client_ip: str) -> Turn:
        """Wait for ``client_ip``'s turn, then build the answer inside the block."""
        return Turn(self, limit_key(client_ip))

    def _done(self, key: str) -> None:
        ip = self._ips[key]
        ip.running -= 1
        if ip.waiting:
            self._schedule()

    async def _take(self, key: str) -> None:
        ip = self._ips.get(key)
        if ip is None:
            ip = self._ips[key] = _Ip()
        if not ip.waiting and ip.may_start():
            ip.started += 1
            ip.running += 1
            self._schedule()
            return
        waiter = asyncio.get_running_loop().create_future()
        ip.waiting.append(waiter)
        self._schedule()
        try:
            await waiter  # _next_turn counted it as started and running when it resolved it
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                ip.running -= 1
            raise

    def _schedule(self) -> None:
        if not self._next_scheduled:
            self._next_scheduled = True
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        """A new iteration: every IP may start its share again, and its first waiting requests go on."""
        self._next_scheduled = False
        for key, ip in list(self._ips.items()):
            ip.started = 0
            while ip.waiting and ip.may_start():
                waiter = ip.waiting.popleft()
                if not waiter.done():  # a cancelled one (shutdown) gives its place to the next
                    waiter.set_result(None)
                    ip.started += 1
                    ip.running += 1
            if ip.started:
                self._schedule()
            elif not ip.waiting and not ip.running:
                del self._ips[key]
