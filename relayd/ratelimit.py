"""Counting limits: fixed windows per key (a client IP or a /64), token buckets for smooth rates (frames per
connection, connection arrivals per client).

Every call takes ``now`` from its caller's injected clock; nothing here reads time itself."""

from __future__ import annotations

import enum
import functools
import ipaddress
import math


class FixedWindow:
    """At most ``limit`` hits per key per ``window_s``; ``limit`` 0 means unlimited."""

    __slots__ = ("limit", "window_s", "_windows")

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self._windows: dict[str, list[float]] = {}

    def hit(self, key: str, now: float, cost: int = 1) -> float:
        """Count ``cost`` hits; return 0 when allowed, else the seconds until the window resets.

        A hit is refused once the window's count has reached the limit; one
        that costs more than what is left still passes and fills the window,
        so a request larger than the whole budget is slowed to one per
        window rather than refused for ever.
        """
        if self.limit <= 0:
            return 0.0
        entry = self._windows.get(key)
        if entry is None or now - entry[0] >= self.window_s:
            self._windows[key] = [now, cost]
            return 0.0
        if entry[1] >= self.limit:
            return max(entry[0] + self.window_s - now, 0.001)
        entry[1] += cost
        return 0.0

    def sweep(self, now: float) -> None:
        """Forget finished windows so idle clients cost no memory."""
        stale = [k for k, (start, _) in self._windows.items() if now - start >= self.window_s]
        for key in stale:
            del self._windows[key]

    def __len__(self) -> int:
        return len(self._windows)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


class TokenBucket:
    """``rate`` tokens per second up to ``burst``: a smooth limit (frames on one connection, arrivals per client)."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if tokens < cost:
            self.tokens = tokens
            return False
        self.tokens = tokens - cost
        return True


class Verdict(enum.Enum):
    ALLOW = "allow"
    REFUSE = "refuse"
    CLOSE = "close"


class FrameLimiter:
    """Frames of one connection: a token bucket, and a count of refusals in a row.

    ``admit`` answers ALLOW, REFUSE (tell the peer to slow down) or, after
    ``strike_limit`` refusals in a row, CLOSE. A ``rate`` of 0 allows everything.
    """

    __slots__ = ("bucket", "strikes", "strike_limit")

    def __init__(self, rate: float, burst: float, strike_limit: int, now: float) -> None:
        self.bucket = TokenBucket(rate, burst, now) if rate else None
        self.strikes = 0
        self.strike_limit = strike_limit

    def admit(self, now: float) -> Verdict:
        if self.bucket is None or self.bucket.take(now):
            self.strikes = 0
            return Verdict.ALLOW
        self.strikes += 1
        return Verdict.CLOSE if self.strikes >= self.strike_limit else Verdict.REFUSE


def limit_key(ip: str) -> str:
    """IPv6 clients are limited per /64: one host usually owns the whole prefix. IPv4 addresses are their own key."""
    if ":" not in ip:
        return ip
    return _ipv6_key(ip)


@functools.lru_cache(maxsize=4096)
def _ipv6_key(ip: str) -> str:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
    return ip
