"""Presence across instances: sessions here, every instance's entries on the backplane, a heartbeat, a cache.

Sessions live in this process (``LocalPresence``). The backplane holds, per
address, which instances have sessions of it and whether one of them acks
(instance -> ``p`` or ``a``), and which instance has which addresses (so a
dead instance's entries can be found). An instance writes its entry when its first session of an address attaches (or
the kind changes) and removes it when its last one detaches: one write per
address and instance, not per session.

Every instance renews its heartbeat in a registry every ``heartbeat_s`` (by
the backplane's clock, so instances need not agree on time). Everyone ignores the
entries of an instance whose heartbeat is older than ``presence_ttl_s`` (an
instance it has not heard of yet is taken as live: it just started): after
a ``kill -9`` its sessions are offline everywhere within ``presence_ttl_s +
heartbeat_s``. A survivor removes the dead instance's entries after
``FORGET_AFTER_S``. An instance that finds its own heartbeat lapsed (it
stalled, or the backplane lost its data) writes its entries again and has its ready
sessions catch up with what was stored for them meanwhile.

Where an address has sessions elsewhere is cached here. The lookup *watches*
the address on the backplane, and the instance that next changes the address's
presence tells every watcher (through the bus) and waits (bounded) until they
dropped their copy before its session reads its backlog, so once a session has
its ``auth_success``, every instance routes to it. A message routed in the
instant before that is stored and still delivered (``Elsewhere.enqueue`` reads
the presence atomically with the write).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import tasks
from ..clock import Clock
from ..protocol.presence import LocalPresence
from ..protocol.session import Session
from ..storage.store import StorageUnavailable
from ..protocol.writes import AddressWrites
from .backplane import Backplane, PresenceEntries
from .bus import Bus

log = logging.getLogger("relayd.cluster")

CACHE_TTL_S = 30.0
WATCH_TTL_MS = 60_000
"""A watch outlives the cache entry it protects (twice as long), so an entry is never used unwatched."""
CACHE_SIZE = 100_000
FORGET_AFTER_S = 60.0
FORGET_CHUNK = 100


@dataclass(frozen=True, slots=True)
class PeerSessions:
    """Where an address has sessions on peers: the instances, and whether a session there acks."""

    instances: tuple[str, ...] = ()
    ack: bool = False


NO_PEER_SESSIONS = PeerSessions()
"""No sessions on peers (most stored messages' recipients): one object for all of them."""


class ClusterPresence:
    """``Routes`` and ``Presence`` of one instance among several on one backplane (see the module docstring)."""

    def __init__(self, backplane: Backplane, bus: Bus, instance: str, writes: AddressWrites, clock: Clock, *,
                 heartbeat_s: float, presence_ttl_s: float) -> None:
        self.backplane = backplane
        self.bus = bus
        self.instance = instance
        self.writes = writes
        self.clock = clock
        self.heartbeat_s = heartbeat_s
        self.ttl_ms = int(presence_ttl_s * 1000)
        self.local = LocalPresence()
        self.counts: Callable[[], dict[str, int]] = dict
        """This instance's counts to publish (the composition root sets it: connections, sessions)."""
        self._live: tuple[str, ...] = ()
        self.on_lapse: Callable[[], None] = lambda: None
        """Called when an instance's heartbeat lapsed or came back, this one's included (after writing its
        entries again): notices between instances may have been lost meanwhile."""
        self._kinds: dict[str, str] = {}
        self._unsynced: set[str] = set()
        self._cache: OrderedDict[str, tuple[PresenceEntries, float, PeerSessions, frozenset[str]]] = OrderedDict()
        self._lapsed: frozenset[str] = frozenset()
        self._beats: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[Any]] = set()

    # Routes: sessions of this instance, each address's entry kept on the backplane

    def attach(self, session: Session) -> None:
        self.local.attach(session)
        self._register(session.address)  # type: ignore[arg-type]

    def detach(self, session: Session) -> bool:
        last = self.local.detach(session)
        if session.address is not None:
            self._register(session.address)
        return last

    def ready_sessions(self, address: str) -> tuple[Session, ...]:
        return self.local.ready_sessions(address)

    def sessions(self, address: str) -> tuple[Session, ...]:
        return self.local.sessions(address)

    def _kind(self, address: str) -> str:
        sessions = self.local.sessions(address)
        if not sessions:
            return ""
        return "a" if any(s.ack for s in sessions) else "p"

    def _register(self, address: str) -> None:
        """Write this instance's entry for ``address`` when it changed; a backlog read of the address waits for
        the write and for the watchers' acknowledgements."""
        kind = self._kind(address)
        if self._kinds.get(address, "") == kind and address not in self._unsynced:
            return
        if kind:
            self._kinds[address] = kind
        else:
            self._kinds.pop(address, None)
        self._unsynced.discard(address)
        try:
            joined = self.backplane.join(address, self.instance, kind, WATCH_TTL_MS)
        except StorageUnavailable:
            self._unsynced.add(address)
            return
        task = asyncio.ensure_future(self._joined(address, joined))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.writes.note(address, task)

    async def _joined(self, address: str, joined: asyncio.Future[tuple[list[str], PresenceEntries]]) -> None:
        try:
            watchers, found = await joined
        except StorageUnavailable:
            self._unsynced.add(address)  # written again by the next heartbeat once the backplane is back
            return
        self._fill(address, found)
        others = [w for w in watchers if w != self.instance]
        if others:
            await self.bus.request(others, {"k": "inv", "a": address})

    # Where an address has sessions elsewhere

    def cached(self, address: str) -> PeerSessions | None:
        entry = self._cache.get(address)
        if entry is None:
            return None
        found, expires, remote, lapsed = entry
        if expires < self.clock.monotonic():
            del self._cache[address]
            return None
        if lapsed is not self._lapsed:  # an instance lapsed or came back since: compute it again
            remote = self._peer_sessions(found)
            self._cache[address] = (found, expires, remote, self._lapsed)
        return remote

    async def lookup(self, address: str) -> PeerSessions:
        found = await self.backplane.lookup(address, self.instance, WATCH_TTL_MS)
        self._fill(address, found)
        return self._peer_sessions(found)

    def lapsed_holders(self, found: PresenceEntries) -> tuple[str, ...]:
        """The instances in an address's entries whose heartbeat lapsed (they may be only slow, not dead)."""
        return tuple(i for i in found if i != self.instance and i in self._lapsed) if found else ()

    def peer_sessions(self, found: PresenceEntries) -> PeerSessions:
        """The live instances other than this one in an address's entries."""
        return self._peer_sessions(found)

    def fill(self, address: str, found: PresenceEntries) -> None:
        """Cache entries read by a write that also watched the address for this instance."""
        self._fill(address, found)

    def invalidate(self, address: str) -> None:
        self._cache.pop(address, None)

    def _peer_sessions(self, found: PresenceEntries) -> PeerSessions:
        if not found:
            return NO_PEER_SESSIONS
        instances = tuple(i for i in found if i != self.instance and i not in self._lapsed)
        return PeerSessions(instances, any(found[i] == "a" for i in instances))

    def _fill(self, address: str, found: PresenceEntries) -> None:
        self._cache[address] = (found, self.clock.monotonic() + CACHE_TTL_S, self._peer_sessions(found), self._lapsed)
        self._cache.move_to_end(address)
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    # Presence (REST)

    def online_count(self) -> int:
        return self.local.online_count()

    async def statuses(self, addresses: list[str]) -> dict[str, bool]:
        out = {a: True for a in addresses if self.local.sessions(a)}
        rest = [a for a in dict.fromkeys(addresses) if a not in out]
        if rest:
            for address, found in zip(rest, await self.backplane.presence_of(rest)):
                out[address] = bool(self._peer_sessions(found).instances)
        return {a: out.get(a, False) for a in addresses}

    async def online_list(self) -> list[str]:
        found = dict.fromkeys(self.local.online_addresses())
        registered = await self.backplane.registered()
        others = [i for i in registered if i != self.instance and i not in self._lapsed]
        if others:
            found.update(dict.fromkeys(await self.backplane.addresses_of(others)))
        return list(found)

    # Heartbeat

    async def start(self) -> None:
        """The first heartbeat (bounded; a backplane that is down is retried by the loop), then the loop."""
        try:
            await self.beat()
        except StorageUnavailable as exc:
            log.warning("cluster heartbeat failed (%s); relayd keeps trying", exc)
        self._beats = asyncio.get_running_loop().create_task(self._beat_loop())

    async def stop(self) -> None:
        """Leave the registry at once, so the others stop routing here (entries go as sessions detach)."""
        beats, self._beats = self._beats, None
        if beats is not None:
            await tasks.stop(beats, self.backplane.deadline_s)
        try:
            await self.backplane.leave(self.instance)
        except StorageUnavailable:
            pass

    async def instance_counts(self) -> dict[str, dict[str, int]]:
        """Each live instance's counts as of its last heartbeat (this one's as of now). Raises
        StorageUnavailable."""
        stored = await self.backplane.counts()
        out: dict[str, dict[str, int]] = {}
        for instance in sorted(set(self._live) | {self.instance}):
            if instance == self.instance:
                out[instance] = self.counts()
                continue
            try:
                out[instance] = {k: int(v) for k, v in json.loads(stored.get(instance) or "{}").items()}
            except (ValueError, TypeError, AttributeError):
                out[instance] = {}
        return out

    async def _beat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self.beat()
            except StorageUnavailable:
                pass
            except Exception:
                log.exception("cluster heartbeat failed")

    async def beat(self) -> None:
        """Renew this instance's heartbeat (only while its inbox listens), learn which instances live, write
        entries again after a lapse, check the inbox, and forget long-dead instances."""
        if not self.bus.subscribed:
            return
        beat = await self.backplane.heartbeat(self.instance, self.ttl_ms, int(FORGET_AFTER_S * 1000))
        self._live = beat.live
        await self.backplane.put_counts(self.instance, json.dumps(self.counts()))
        peers_changed = frozenset(beat.lapsed) != self._lapsed
        if peers_changed:
            self._lapsed = frozenset(beat.lapsed)
        age = beat.age_ms
        own_lapse = age is None or age > self.ttl_ms
        if own_lapse and self._kinds:
            log.warning("this instance's presence had lapsed (%s); writing it again",
                        "not registered" if age is None else f"last heartbeat {age} ms ago")
            self._unsynced.update(self._kinds)
        for address in list(self._unsynced):
            self._register(address)
        if (own_lapse or peers_changed) and self._kinds:
            self.on_lapse()
        loop = asyncio.get_running_loop()
        if loop.time() - self.bus.heard > 3 * self.heartbeat_s + self.bus.reply_timeout_s:
            log.warning("the cluster inbox heard nothing, not even its own heartbeat; subscribing again")
            self.bus.resubscribe()
        self.bus.send(self.instance, {"k": "ping"})
        for instance in beat.dead:
            if instance != self.instance:
                await self._forget(instance)

    async def _forget(self, instance: str) -> None:
        """Remove a long-dead instance's entries, a chunk at a time, and tell their watchers; then its heartbeat."""
        log.info("removing the presence entries of instance %s (no heartbeat for %.0f s)", instance,
                 FORGET_AFTER_S)
        async for part, watchers in self.backplane.forget(instance, FORGET_CHUNK):
            for watcher in watchers:
                if watcher != self.instance:
                    for address in part:
                        self.bus.send(watcher, {"k": "inv", "a": address})
            for address in part:
                self.invalidate(address)
        await self.backplane.leave(instance)
