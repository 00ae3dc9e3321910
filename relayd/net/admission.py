"""Who may connect, and how much memory they may hold: counted per client from accept.

Every TCP connection is counted from the moment it is accepted, per peer
address (an IPv4 address or an IPv6 /64), so that half-sent requests count
as much as open WebSockets. Three bounds apply at accept: the connections
the process can hold (a reserve of file descriptors is kept for accept's
batches, the database, logs and listeners), connections still in their HTTP head (per peer and in total), and
connections per peer. WebSocket upgrades additionally pass a rate per
client IP. Buffered bytes (unread input, unsent output, messages being
stored) are charged to the client's IP and to the process; past either
budget the connections holding the most are cut.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol

from ..access import DenyList, denied
from ..clock import Clock
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..ops.metrics import RelayMetrics
from ..ratelimit import TokenBucket, limit_key

log = logging.getLogger("relayd.server")

FD_RESERVE_MIN = 160
"""Descriptors kept free, never used by clients: asyncio accepts up to 100 connections per loop turn before
relayd can refuse any (each holds a descriptor until it is closed), plus the database, logs and listeners."""
MAX_LINGERING = 256
"""Refused connections answered with a 429/503 before closing; past this many, refusals just close."""


class Holder(Protocol):
    """A connection as the budget sees it."""

    held: int

    def cut(self, reason: str) -> None: ...


@dataclass(slots=True)
class _Peer:
    connections: int = 0
    in_head: int = 0


def descriptor_capacity() -> int:
    """Client connections the process can hold: the file-descriptor limit minus a reserve."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, soft - max(FD_RESERVE_MIN, soft // 20))


def _within(limit: int, share: int) -> int:
    """``limit`` (0: none) but at most ``share`` of the descriptor capacity."""
    return min(limit, share) if limit else share


def raise_descriptor_limit() -> int:
    """Raise the soft file-descriptor limit to the hard one, as daemons do; returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class Admission:
    """Counts connections and buffered bytes per peer; refuses or cuts past the configured bounds."""

    def __init__(self, config: Config, metrics: RelayMetrics, clock: Clock) -> None:
        self.metrics = metrics
        self.clock = clock
        self._peers: dict[str, _Peer] = {}
        self._holders: dict[str, set[Holder]] = {}
        self._arrivals: dict[str, TokenBucket] = {}
        self._sockets: dict[str, int] = {}
        self._held_by_ip: dict[str, int] = {}
        self.open = 0
        self.in_head = 0
        self.lingering = 0
        self.held = 0
        self.capacity = descriptor_capacity()
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Apply ``[limits]``; whatever they say, one IP holds at most half the descriptor capacity, and at most a
        quarter in connections that have not sent a request head (all IPs: half), so another IP always gets in."""
        limits = config.limits
        self.max_per_ip = _within(limits.max_connections_per_ip, self.capacity // 2)
        self.max_head_per_ip = _within(limits.max_pending_handshakes_per_ip, self.capacity // 4)
        self.max_head = _within(limits.max_pending_handshakes, self.capacity // 2)
        self.rate = limits.connections_per_ip_per_s
        self.burst = limits.connection_burst_per_ip
        self.budget_per_ip = limits.max_buffered_bytes_per_ip
        self.budget = limits.max_buffered_bytes
        self.max_open = min(limits.max_connections or self.capacity, self.capacity)
        self.deny = DenyList(config.access.deny)

    def refuses(self, client_ip: str) -> RelayError | None:
        """The 403 for a client IP on the operator's deny list, else None (checked on every request)."""
        if self.deny.denies_ip(client_ip):
            self.metrics.access_denied.labels(kind="ip").inc()
            return denied("IP address")
        return None

    # From accept

    def accept(self, peer: str, trusted: bool) -> RelayError | None:
        """Count a new TCP connection from ``peer``; the refusal to answer when it must not stay.

        A trusted proxy's connections carry many clients, so only the
        process-wide bounds apply to them here; their clients are counted by
        ``admit_upgrade`` once the head names them.
        """
        if self.open >= self.max_open:
            self.metrics.rate_limited.labels(limit="capacity").inc()
            return RelayError(ErrorCode.RATE_LIMITED, "The relay is at capacity; retry later",
                              status=HTTPStatus.SERVICE_UNAVAILABLE, headers=(("Retry-After", "5"),))
        if self.max_head and self.in_head >= self.max_head:
            self.metrics.rate_limited.labels(limit="handshakes").inc()
            return RelayError(ErrorCode.RATE_LIMITED, "Too many connections are opening; retry later",
                              status=HTTPStatus.SERVICE_UNAVAILABLE, headers=(("Retry-After", "2"),))
        key = limit_key(peer)
        entry = self._peers.get(key)
        if not trusted and entry is not None:
            if self.max_per_ip and entry.connections >= self.max_per_ip:
                self.metrics.rate_limited.labels(limit="connections").inc()
                return RelayError(ErrorCode.RATE_LIMITED, "Too many open connections from this address",
                                  headers=(("Retry-After", "5"),))
            if self.max_head_per_ip and entry.in_head >= self.max_head_per_ip:
                self.metrics.rate_limited.labels(limit="handshakes").inc()
                return RelayError(ErrorCode.RATE_LIMITED, "Too many connections opening from this address",
                                  headers=(("Retry-After", "2"),))
        if entry is None:
            entry = self._peers[key] = _Peer()
        entry.connections += 1
        entry.in_head += 1
        self.open += 1
        self.in_head += 1
        return None

    def start_lingering(self) -> bool:
        """May one more refused connection be answered before it closes (it holds a descriptor meanwhile)?"""
        if self.lingering >= MAX_LINGERING or self.open >= self.max_open:
            return False
        self.lingering += 1
        return True

    def stop_lingering(self) -> None:
        self.lingering -= 1

    def head_done(self, peer: str) -> None:
        """The connection's first request head has arrived."""
        entry = self._peers[limit_key(peer)]
        entry.in_head -= 1
        self.in_head -= 1

    def closed(self, peer: str, in_head: bool) -> None:
        """A counted connection is gone."""
        key = limit_key(peer)
        entry = self._peers[key]
        entry.connections -= 1
        self.open -= 1
        if in_head:
            entry.in_head -= 1
            self.in_head -= 1
        if entry.connections == 0:
            del self._peers[key]

    # WebSocket upgrades, by client IP (behind a trusted proxy: from X-Forwarded-For)

    def admit_upgrade(self, client_ip: str) -> RelayError | None:
        """None when ``client_ip`` may open one more WebSocket now, else the refusal (429)."""
        key = limit_key(client_ip)
        if self.max_per_ip and self._sockets.get(key, 0) >= self.max_per_ip:
            self.metrics.rate_limited.labels(limit="connections").inc()
            return RelayError(ErrorCode.RATE_LIMITED, "Too many open connections from this address",
                              headers=(("Retry-After", "5"),))
        if self.rate:
            now = self.clock.monotonic()
            bucket = self._arrivals.get(key)
            if bucket is None:
                bucket = self._arrivals[key] = TokenBucket(self.rate, self.burst, now)
            if not bucket.take(now):
                self.metrics.rate_limited.labels(limit="connection_rate").inc()
                log.debug("connection rate limit hit by %s", client_ip)
                return RelayError(ErrorCode.RATE_LIMITED, "Too many new connections from this address",
                                  headers=(("Retry-After", "1"),))
        self._sockets[key] = self._sockets.get(key, 0) + 1
        return None

    def socket_closed(self, client_ip: str) -> None:
        key = limit_key(client_ip)
        left = self._sockets[key] - 1
        if left:
            self._sockets[key] = left
        else:
            del self._sockets[key]

    # Buffered bytes

    def track(self, client_ip: str, holder: Holder) -> None:
        self._holders.setdefault(limit_key(client_ip), set()).add(holder)

    def untrack(self, client_ip: str, holder: Holder) -> None:
        key = limit_key(client_ip)
        holders = self._holders.get(key)
        if holders is not None:
            holders.discard(holder)
            if not holders:
                del self._holders[key]
        self.charge(client_ip, -holder.held)
        holder.held = 0

    def charge(self, client_ip: str, delta: int) -> bool:
        """Add ``delta`` buffered bytes for ``client_ip``; False when a budget had to cut connections."""
        if not delta:
            return True
        key = limit_key(client_ip)
        self.held += delta
        held_by_ip = self._held_by_ip.get(key, 0) + delta
        if held_by_ip > 0:
            self._held_by_ip[key] = held_by_ip
        else:
            self._held_by_ip.pop(key, None)
        if delta < 0:
            return True
        within = True
        if self.budget_per_ip and held_by_ip > self.budget_per_ip:
            within = self._shed(self._holders.get(key, ()), held_by_ip - self.budget_per_ip, "buffered_per_ip")
        if self.budget and self.held > self.budget:
            everyone = [h for holders in self._holders.values() for h in holders]
            within = self._shed(everyone, self.held - self.budget, "buffered_total") and within
        return within

    def _shed(self, holders: Iterable[Holder], excess: int, limit: str) -> bool:
        """Cut the connections holding the most until ``excess`` bytes are freed."""
        victims = sorted(holders, key=lambda h: h.held, reverse=True)
        for holder in victims:
            if excess <= 0:
                break
            excess -= holder.held
            self.metrics.rate_limited.labels(limit=limit).inc()
            holder.cut("it held more buffered bytes than its budget allows")
        return False

    def sweep(self) -> None:
        """Forget arrival buckets that have refilled, so idle clients cost no memory."""
        now = self.clock.monotonic()
        full = [k for k, b in self._arrivals.items() if now - b.stamp > b.burst / max(b.rate, 1e-9)]
        for key in full:
            del self._arrivals[key]
