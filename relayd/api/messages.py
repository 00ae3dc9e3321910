"""REST routes for offline queues: read (drain or peek), clear, size, totals."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from ..addresses import normalize_address
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..identity.auth import Authenticator
from ..storage.store import QueuedMessage, Store
from .http import Route, json_response
from ..net.http_values import HttpRequest, HttpResponse
from .limits import Budget

MAX_LISTING_BYTES = 4 << 20


def message_view(msg: QueuedMessage) -> dict[str, Any]:
    """A queued message in the REST listing shape of the original relay."""
    return {"from": msg.sender, "content": msg.content, "messageId": msg.message_id,
            "timestamp": msg.timestamp, "queuedAt": msg.queued_at}


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


class MessageRoutes:
    def __init__(self, config: Config, store: Store, authenticator: Authenticator) -> None:
        self.store = store
        self.authenticator = authenticator
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.queue = config.queue

    def routes(self) -> list[Route]:
        return [Route("/api/messages/stats/all", "GET", self.queue_stats, Budget.WRITE),
                Route("/api/messages/*", "GET", self.get_messages, Budget.WRITE),
                Route("/api/messages/*", "DELETE", self.clear_messages, Budget.WRITE),
                Route("/api/messages/*/queue-size", "GET", self.queue_size, Budget.READ)]

    async def get_messages(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        """Without ``limit`` a GET drains what it returns; ``limit`` and HEAD only peek.

        One answer holds at most ``max_offline_messages`` messages and about
        ``MAX_LISTING_BYTES`` of content (always at least one message); a
        client drains a larger queue by asking again until ``count`` is 0.
        """
        address = normalize_address(args[0])
        raw_limit = req.query.get("limit")
        cap = self.queue.max_offline_messages
        limit = cap
        if raw_limit:
            try:
                limit = int(raw_limit[0])
            except ValueError:
                limit = -1
            if limit < 0:
                raise RelayError(ErrorCode.BAD_REQUEST, "limit must be a non-negative integer")
        await self.authenticator.authorize(req.header("authorization"), address)
        messages = await self.store.pending(address, min(limit, cap), max_bytes=MAX_LISTING_BYTES) if limit else []
        if messages and not raw_limit and req.method == "GET":
            await self.store.remove(address, [m.seq for m in messages])
        return json_response(HTTPStatus.OK, {"address": address, "count": len(messages),
                                             "messages": [message_view(m) for m in messages]})

    async def clear_messages(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        address = normalize_address(args[0])
        await self.authenticator.authorize(req.header("authorization"), address)
        removed = await self.store.clear(address)
        return json_response(HTTPStatus.OK, {"address": address, "cleared": removed > 0, "removed": removed,
                                             "message": "Queue cleared" if removed else "No messages to clear"})

    async def queue_size(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        address = normalize_address(args[0])
        return json_response(HTTPStatus.OK, {"address": address, "queueSize": await self.store.size(address)})

    async def queue_stats(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        stats = await self.store.stats()
        return json_response(HTTPStatus.OK, {"totalUsers": stats["recipients"], "totalMessages": stats["messages"],
                                             "maxMessagesPerUser": self.queue.max_offline_messages,
                                             "retentionHours": _number(self.queue.message_retention_hours)})
