"""REST routes for presence: one address, a batch, and the (optional) list of everyone online."""

from __future__ import annotations

from http import HTTPStatus

from ..addresses import normalize_address
from ..clock import Clock, wall_ms
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..net.http_values import HttpRequest, HttpResponse
from ..protocol.seams import Presence
from .http import Route, address_batch, json_body, json_response
from .limits import Budget, RestLimits


class PresenceRoutes:
    def __init__(self, config: Config, presence: Presence, limits: RestLimits, clock: Clock) -> None:
        self.presence = presence
        self.limits = limits
        self.clock = clock
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.expose_online_list = config.expose_online_list

    def routes(self) -> list[Route]:
        return [Route("/api/status/batch", "POST", self.status_batch, Budget.READ),
                Route("/api/status/online/all", "GET", self.online_all, Budget.WRITE),
                Route("/api/status/*", "GET", self.status, Budget.READ)]

    async def status(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        address = normalize_address(args[0])
        online = (await self.presence.statuses([address]))[address]
        return json_response(HTTPStatus.OK, {"address": address, "online": online, "timestamp": wall_ms(self.clock)})

    async def status_batch(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        """A batch costs one read per address (the request itself paid the first)."""
        addresses = address_batch(json_body(req))
        self.limits.charge(Budget.READ, req.client_ip, self.clock.monotonic(), len(addresses) - 1)
        return json_response(HTTPStatus.OK, {"timestamp": wall_ms(self.clock),
                                             "statuses": await self.presence.statuses(addresses)})

    async def online_all(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        if not self.expose_online_list:
            raise RelayError(ErrorCode.DISABLED, "The online list is disabled on this relay")
        users = await self.presence.online_list()
        return json_response(HTTPStatus.OK, {"count": len(users), "users": users,
                                             "timestamp": wall_ms(self.clock)})
