"""Push notifications as the rest of relayd sees them: subscriptions for the protocol, the VAPID public key for
the REST API, ``notify`` for the message path and start/stop/sweep for the composition root."""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable
from typing import Any

from ..clock import Clock, wall_ms
from ..config import Config
from ..config.schema import ConfigError
from ..errors import ErrorCode, RelayError
from ..ops.metrics import RelayMetrics
from ..storage.store import PushSubscription, StorageUnavailable, Store
from ..ratelimit import FixedWindow, limit_key
from ..tasks import TaskSet
from .sender import Provider, PushSender
from .subscriptions import check_url, parse_request, resolve, subscription_id
from .webpush import VapidKey, WebPush

log = logging.getLogger("relayd.push")

DAY_MS = 86_400_000
EXPIRY_INTERVAL_S = 60.0


def vapid_key_path(config: Config) -> str:
    """``[push] vapid_key_file``, or vapid.pem in the data directory (next to the SQLite database)."""
    if config.push.vapid_key_file:
        return config.push.vapid_key_file
    return os.path.join(os.path.dirname(os.path.abspath(config.storage.path)), "vapid.pem")


def _ssl_context(config: Config) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if config.push.ca_file:
        context.load_verify_locations(config.push.ca_file)
    return context


def build_providers(config: Config) -> tuple[VapidKey, dict[str, Provider]]:
    """The VAPID key and the providers ``[push]`` enables; raises ConfigError for unusable keys."""
    push = config.push
    timeout_s, max_bytes = push.timeout_s, push.max_response_bytes
    try:
        vapid = VapidKey.load_or_create(vapid_key_path(config), push.vapid_subject)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"[push] vapid_key_file: {exc}") from None
    providers: dict[str, Provider] = {
        "webpush": WebPush(vapid, allow_private=push.allow_private_endpoints,
                           ssl_context=_ssl_context(config), timeout_s=timeout_s, max_bytes=max_bytes)}
    if push.fcm_project:
        from .fcm import Fcm, ServiceAccount
        try:
            account = ServiceAccount.load(push.fcm_key_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"[push] fcm_key_file: {exc}") from None
        providers["fcm"] = Fcm(push.fcm_project, account, push.fcm_url, ssl_context=_ssl_context(config),
                               timeout_s=timeout_s, max_bytes=max_bytes)
    if push.apns_key_file:
        from .apns import Apns, load_key
        try:
            key = load_key(push.apns_key_file)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"[push] apns_key_file: {exc}") from None
        providers["apns"] = Apns(key, push.apns_key_id, push.apns_team_id, push.apns_topic, push.apns_url,
                                 ssl_context=_ssl_context(config), timeout_s=timeout_s, max_bytes=max_bytes)
    return vapid, providers


class PushService:
    """Owns the providers the configuration enables and the sender; raises ConfigError for unusable keys."""

    def __init__(self, config: Config, store: Store, metrics: RelayMetrics, clock: Clock,
                 budget: Callable[[], int]) -> None:
        self.store = store
        self.clock = clock
        self.budget = budget
        """The storage budget in force (0: none); subscriptions count in it (``store.push_bytes``)."""
        self.tasks = TaskSet()
        push = config.push
        self.vapid, providers = build_providers(config)
        self.providers = providers
        self.subscribes = FixedWindow(push.subscribes_per_ip_per_hour, 3600.0)
        """Subscriptions per client IP per hour: each one is stored, so each is paid for."""
        log.info("push notifications on: %s", ", ".join(providers))
        self.sender = PushSender(push, store, providers, metrics, clock)
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.config = config.push
        self.sender.configure(config.push)
        self.subscribes.limit = config.push.subscribes_per_ip_per_hour

    @property
    def vapid_public_key(self) -> str:
        return self.vapid.public_key

    def notify(self, address: str) -> None:
        self.sender.notify(address)

    # What the protocol asks (``protocol.seams.PushRegistry``)

    async def subscribe(self, address: str, ip: str, frame: dict[str, Any]) -> str:
        wait = self.subscribes.hit(limit_key(ip), self.clock.monotonic())
        if wait:
            raise RelayError(ErrorCode.RATE_LIMITED, f"Too many push subscriptions from this address; retry in "
                                                     f"{wait:.0f} s")
        request = parse_request(frame)
        if request.provider not in self.providers:
            raise RelayError(ErrorCode.PUSH_PROVIDER_UNAVAILABLE, f"{request.provider} pushes are not configured "
                                                                  "on this relay")
        if request.provider == "webpush":
            allow_private = self.config.allow_private_endpoints
            endpoint = check_url(request.target, allow_private)
            try:
                await resolve(endpoint, allow_private, self.config.timeout_s)
            except (OSError, TimeoutError):
                raise RelayError(ErrorCode.ENDPOINT_NOT_ALLOWED, "The endpoint's host does not resolve") from None
        now = wall_ms(self.clock)
        sub = PushSubscription(subscription_id(address, request.provider, request.target), address,
                               request.provider, request.target, request.p256dh, request.auth, now,
                               now + int(self.config.subscription_days * DAY_MS))
        await self._check_room(sub)
        await self.store.put_push_subscription(sub, self.config.max_subscriptions_per_address)
        return sub.id

    async def _check_room(self, sub: PushSubscription) -> None:
        """Refuse a subscription that would take the store past its budget, unless it frees at least as much as
        it takes: it replaces one no smaller (the same device again), or the address is at its cap and its
        oldest, which then goes, is no smaller. So devices keep renewing theirs when the store is full."""
        budget, size = self.budget(), sub.size()
        if not budget or self.store.stored_bytes() + size <= budget:
            return
        held = await self.store.push_subscriptions(sub.address, 0)
        same = [s for s in held if s.id == sub.id]
        if same:
            freed = same[0].size()
        elif len(held) >= self.config.max_subscriptions_per_address:
            freed = held[0].size()
        else:
            freed = 0
        if freed < size:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, "The relay's storage budget is used up; the push "
                                                            "subscription was not stored, retry later")

    async def unsubscribe(self, address: str, sub_id: str) -> bool:
        return await self.store.delete_push_subscription(address, sub_id)

    def signed_in(self, address: str) -> None:
        """A session of ``address`` signed in: its subscriptions live ``subscription_days`` from now."""
        self.tasks.spawn(self._extend(address, wall_ms(self.clock) + int(self.config.subscription_days * DAY_MS)))

    async def _extend(self, address: str, until: int) -> None:
        """A read first: most addresses have no subscription, and one extended today needs no write."""
        try:
            subs = await self.store.push_subscriptions(address, wall_ms(self.clock))
            lifetime = int(self.config.subscription_days * DAY_MS)
            if subs and until - min(s.expires_at for s in subs) >= min(DAY_MS, lifetime // 2):
                await self.store.extend_push_subscriptions(address, until)
        except StorageUnavailable as exc:
            log.warning("push subscriptions not extended: %s", exc)

    # Life cycle

    def start(self) -> None:
        self.sender.start()

    async def stop(self) -> None:
        await self.sender.stop()
        await self.tasks.settle()
        for provider in self.providers.values():
            await provider.close()

    def sweep(self) -> None:
        """From the housekeeping timer: forget passed intervals; delete expired subscriptions now and then."""
        self.sender.sweep()
        now = self.clock.monotonic()
        self.subscribes.sweep(now)
        if not self._expiring and now - self._expired_at >= EXPIRY_INTERVAL_S:
            self._expiring, self._expired_at = True, now
            self.tasks.spawn(self._expire())

    _expiring = False
    _expired_at = float("-inf")

    async def _expire(self) -> None:
        try:
            while await self.store.expire_push_subscriptions(wall_ms(self.clock)):
                pass
        except StorageUnavailable as exc:
            log.warning("expired push subscriptions not removed: %s", exc)
        finally:
            self._expiring = False
