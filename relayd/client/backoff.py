"""Reconnecting the way app developers should: exponential backoff with jitter, capped."""

from __future__ import annotations

import asyncio
import random
from typing import Callable, Iterator

from .connection import RelayClient
from .errors import (
    AuthRefused,
    ClientError,
    ClientTimeout,
    ConnectionLost,
    RelayUnreachable,
)
from .values import SignIn


def backoff_delays(base: float = 0.5, cap: float = 30.0, *,
                   rng: Callable[[], float] = random.random) -> Iterator[float]:
    """Delays before each retry: exponential (base * 2^n) capped at ``cap``, with "equal jitter".

    Each delay is uniform in [d/2, d] for the step's d, so clients that lost
    the same relay at once spread out instead of reconnecting in lockstep,
    and none retries sooner than half the step.
    """
    step = 0
    while True:
        d = min(cap, base * (2 ** step))
        yield d / 2 + rng() * d / 2
        if d < cap:
            step += 1


async def connect_with_backoff(client: RelayClient, *, attempts: int | None = 8, base: float = 0.5,
                               cap: float = 30.0, rng: Callable[[], float] = random.random,
                               on_retry: Callable[[int, float, ClientError], None] | None = None) -> SignIn:
    """``client.connect()``, retried with ``backoff_delays`` while the relay is unreachable or busy.

    Retries unreachable relays, timeouts, lost connections and ``rate_limited``
    refusals; any other sign-in refusal is final and raised at once. Gives up
    after ``attempts`` tries (None: never) and raises the last error.
    ``on_retry(attempt, delay, error)`` is told before each wait.
    """
    delays = backoff_delays(base, cap, rng=rng)
    attempt = 0
    while True:
        attempt += 1
        try:
            return await client.connect()
        except AuthRefused as exc:
            if exc.code != "rate_limited":
                raise
            error: ClientError = exc
        except (RelayUnreachable, ClientTimeout, ConnectionLost) as exc:
            error = exc
        if attempts is not None and attempt >= attempts:
            raise error
        delay = next(delays)
        if on_retry is not None:
            on_retry(attempt, delay, error)
        await asyncio.sleep(delay)

