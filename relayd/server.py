"""The composition root: builds one relay from its parts, and starts and stops it.

Data flows down from here: the server creates the store's users (sign-in,
protocol, REST, the port) and hands each the collaborators it needs, as the
narrow interfaces they declare (the gateway's ``RequestHandler`` and
``SessionHandler`` are the REST API and the router). Events come up from
three sources: the port (connection -> gateway -> router, or -> REST API,
whose key uploads tell the router), the cluster's bus (other instances ->
router), and the housekeeping timer (-> gateway and the sweepers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from typing import TYPE_CHECKING

from .clock import SYSTEM_CLOCK, Clock
from .config import Config
from .housekeeping import Housekeeping
from .identity.auth import Authenticator
from .net.admission import Admission
from .net.gateway import Gateway
from .api.rest import HttpApi
from .ops.history import ActivityHistory
from .ops.metrics import RelayMetrics
from .protocol.delivery import Delivery
from .protocol.presence import LocalPresence
from .protocol.router import Router
from .protocol.seams import NO_PEERS, NO_PUSH, MessagePath, Peers, Presence, PushRegistry, Routes
from .storage.backends import automatic_budget
from .storage.memory import MemoryStore
from .storage.sealed import CHECK_ADDRESS, SealedStore
from .storage.store import HistoryStore, StorageUnavailable, Store, StoreOpenError
from .protocol.writes import AddressWrites

if TYPE_CHECKING:
    from .cluster import Cluster
    from .push.service import PushService

log = logging.getLogger("relayd.server")


class RelayServer:
    """One relay: its store, presence, sign-in, protocol, REST API, port and timer."""

    def __init__(self, config: Config, store: Store | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self.clock = clock
        self.store: Store = store if store is not None else MemoryStore()
        self.metrics = RelayMetrics()
        writes = AddressWrites()
        self.cluster: Cluster | None = None
        """The peers on the same Redis or PostgreSQL database (``relayd.cluster``, imported only for those)."""
        self.presence: Presence
        routes: Routes
        peers: Peers = NO_PEERS
        if self.store.name == "redis":  # the cluster and the Redis store need the redis extra: imported here
            from .cluster import Cluster
            from .cluster.redis_backplane import RedisBackplane
            from .storage.redis.store import RedisStore
            sealed = self.store if isinstance(self.store, SealedStore) else None
            backing = sealed.inner if sealed is not None else self.store
            assert isinstance(backing, RedisStore)
            backplane = (RedisBackplane(backing, sealed=sealed, queue_key=sealed.queue, seals=sealed.sealer)
                         if sealed is not None
                         else RedisBackplane(backing))
            self.cluster = Cluster(config, self.store, backplane, writes, clock)
        elif self.store.name == "postgres" and config.postgres.cluster:  # else one instance per database (a lock)
            from .cluster import Cluster
            from .cluster.postgres_backplane import PostgresBackplane
            from .storage.postgres.store import PostgresStore
            sealed = self.store if isinstance(self.store, SealedStore) else None
            backing = sealed.inner if sealed is not None else self.store
            assert isinstance(backing, PostgresStore)
            pg_backplane = (PostgresBackplane(backing, sealed=sealed, queue_key=sealed.queue, seals=sealed.sealer)
                            if sealed is not None else PostgresBackplane(backing))
            self.cluster = Cluster(config, self.store, pg_backplane, writes, clock)
        if self.cluster is not None:
            self.presence = routes = self.cluster.presence
            peers = self.cluster.peers
        else:
            self.presence = routes = LocalPresence()
        self.authenticator = Authenticator(config, config.effective_public_url, self.store, self.metrics, clock)
        local = Delivery(config, routes, self.store, self.metrics, clock, writes)
        delivery: MessagePath = local if self.cluster is None else self.cluster.delivery(local)
        self.delivery = delivery
        self.push: PushService | None = None
        """Push notifications (``relayd.push``, imported only when ``[push] enabled``: it needs relayd[push])."""
        registry: PushRegistry = NO_PUSH
        if config.push.enabled:
            from .push.service import PushService
            self.push = registry = PushService(config, self.store, self.metrics, clock, self.storage_budget)
        self.router = Router(config, routes, self.store, self.metrics, self.authenticator, clock,
                             delivery=delivery, peers=peers, writes=writes, push=registry,
                             answers=local.answers if self.cluster is not None else None)
        if self.push is not None:
            # Only the instance that stored a message calls on_stored, and only when no session of the
            # recipient was ready on any instance: one push per event, and the message path never waits.
            backlog_stored, notify = delivery.on_stored, self.push.notify

            def stored(recipient: str) -> None:
                backlog_stored(recipient)
                notify(recipient)
            delivery.on_stored = stored
        if self.cluster is not None:
            self.cluster.bind(self.router, local)
            self.cluster.presence.counts = self.counts
        self.api = HttpApi(config, self.presence, self.store, self.metrics, self.authenticator,
                           sessions=self.router, relay=self, clock=clock,
                           vapid_public_key=self.push.vapid_public_key if self.push is not None else None)
        self.admission = Admission(config, self.metrics, clock)
        self.gateway = Gateway(config, self.api, self.router, self.admission, clock)
        self.history = ActivityHistory(self.metrics, self.session_count, clock.monotonic())
        """The status page's last hour (counts only), ticked by the housekeeping timer."""
        sweepers = [self.api.sweep, self.authenticator.sweep, self.admission.sweep]
        if self.push is not None:
            sweepers.append(self.push.sweep)
        self.housekeeping = Housekeeping(config, self.store, self.metrics, clock, sweepers=sweepers)
        self.housekeeping.tick_callbacks.append(self.gateway.tick)
        self.housekeeping.tick_callbacks.append(lambda now: self.history.tick(self.clock.monotonic()))
        self._stopping = False
        self.crypto = ""
        self.budget_how = ""
        """How the automatic storage budget was found (for the start-up log)."""

    def configure(self, config: Config) -> None:
        """Apply a (re)loaded configuration to every part; SIGHUP calls this."""
        self.config = config
        self.authenticator.configure(config, self.public_url)
        self.router.configure(config)
        with contextlib.suppress(StoreOpenError):  # a reload cannot turn history on where start-up refused it
            self._keep_history(config)
        self.api.configure(config)
        self.admission.configure(config)
        self.housekeeping.configure(config)
        self.gateway.configure(config)
        if self.push is not None:
            self.push.configure(config)

    @property
    def public_url(self) -> str:
        """The URL signed sign-ins are bound to: ``[server] public_url``, or derived from the bound port."""
        if self.config.server.public_url or self.gateway.server is None:
            return self.config.effective_public_url
        return self.config.replace("server", port=self.port).effective_public_url

    @property
    def port(self) -> int:
        assert self.gateway.server is not None
        return self.gateway.server.sockets[0].getsockname()[1]

    def session_count(self) -> int:
        return self.gateway.session_count()

    def counts(self) -> dict[str, int]:
        """This instance's connection counts, as ``/health/instances`` reports them."""
        return {"connections": len(self.gateway.sessions), "sessions": self.session_count()}

    async def instances(self) -> dict[str, dict[str, int]]:
        """Connection counts per instance: every live one on the same Redis, or just this one."""
        if self.cluster is None:
            return {"this": self.counts()}
        return await self.cluster.presence.instance_counts()

    def readiness_problem(self) -> str | None:
        """Why this instance cannot do all of its work although storage answers (None: nothing)."""
        if self.cluster is not None and not self.cluster.bus.subscribed:
            return f"the cluster inbox is not subscribed, messages cannot cross instances: " \
                   f"{self.cluster.bus.problem or 'subscribing'} ({self.cluster.bus.failures} failed attempts)"
        return None

    def storage_budget(self) -> int:
        return self.delivery.limits.max_total_bytes

    def accepting(self) -> bool:
        server = self.gateway.server
        return server is not None and server.is_serving() and not self._stopping

    async def start(self, *, sock: socket.socket | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        """Open the store, then listen; raises ``StoreOpenError`` or ``OSError`` when either fails."""
        backing = self.store.inner if isinstance(self.store, SealedStore) else self.store
        if hasattr(backing, "commit_observer"):
            backing.commit_observer = self.metrics.commit_latency.observe
        self._keep_history(self.config)
        await self.store.open()
        if not isinstance(self.store, SealedStore) and await self._sealed_without_key():
            await self.store.close()
            raise StoreOpenError("the store is sealed (encryption at rest) but [storage] encryption_key_file is "
                                 "not set: start with the key file(s) it was written with (nothing was changed)")
        if self.cluster is not None:
            await self.cluster.start()
        budget = automatic_budget(self.config, self.store)
        self.delivery.storage_budget, self.budget_how = budget.bytes, budget.how
        self.router.configure(self.config)
        self.crypto = self.authenticator.prepare(self.config.auth.crypto)
        delivery = self.delivery
        self.metrics.bind(connections=lambda: len(self.gateway.sessions), sessions=self.session_count,
                          online=self.presence.online_count, queue_depth=self.store.total,
                          storage_bytes=self.store.stored_bytes,
                          storage_budget=lambda: delivery.limits.max_total_bytes,
                          storage_healthy=lambda: 1 if self.store.healthy else 0,
                          ready=lambda: 1 if self.store.healthy and self.accepting() else 0)
        if self.push is not None:
            self.push.start()
        await self.gateway.start(sock=sock, ssl_context=ssl_context)
        self.authenticator.configure(self.config, self.public_url)
        self.housekeeping.start()

    def _keep_history(self, config: Config) -> None:
        """Tell the store how long to keep delivered messages; raises ``StoreOpenError`` on a backend without
        history (one that does not implement ``HistoryStore``)."""
        ms = config.history.days * 86_400_000
        if isinstance(self.store, HistoryStore):
            self.store.keep_history(ms)
        elif ms:
            raise StoreOpenError(f"[history] days = {config.history.days}: the {self.store.name} backend keeps "
                                 "no message history yet (use sqlite, or days = 0)")

    async def _sealed_without_key(self) -> bool:
        try:
            return await self.store.get_key(CHECK_ADDRESS) is not None
        except StorageUnavailable:  # Redis down at start-up: relayd starts and recovers; the check waits
            return False

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The (host, port) of every listening socket."""
        assert self.gateway.server is not None
        return [s.getsockname()[:2] for s in self.gateway.server.sockets]

    async def stop(self) -> None:
        """Stop accepting, close sessions with 1001, finish storage writes, close the store."""
        if self._stopping:
            return
        self._stopping = True
        log.info("shutting down")
        timeout = self.config.server.shutdown_timeout_s
        server = self.gateway.server
        if server is not None:
            server.close(close_connections=True)
            try:
                await asyncio.wait_for(asyncio.shield(server.wait_closed()), timeout)
            except asyncio.TimeoutError:
                log.warning("%d sessions did not close within %.1f s; dropping them",
                            len(self.gateway.sessions), timeout)
                for conn in list(self.gateway.sessions.values()):
                    conn.transport.abort()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(server.wait_closed(), 1.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.gateway.answered(), timeout)
        self.housekeeping.stop()
        self.gateway.stop_liveness()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.router.settle(), timeout)
        if self.push is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.push.stop(), timeout)
        if self.cluster is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.cluster.stop(), timeout)
        self.authenticator.close()
        await self.store.close()
        log.info("stopped")
