"""REST route for push notifications: the relay's VAPID public key, a Web Push client's ``applicationServerKey``."""

from __future__ import annotations

from http import HTTPStatus

from ..config import Config
from ..errors import ErrorCode, RelayError
from ..net.http_values import HttpRequest, HttpResponse
from .http import Route, json_response
from .limits import Budget


class PushRoutes:
    def __init__(self, config: Config, vapid_public_key: str | None) -> None:
        """``vapid_public_key``: None when push notifications are off."""
        self.vapid_public_key = vapid_public_key

    def configure(self, config: Config) -> None:
        return None

    def routes(self) -> list[Route]:
        return [Route("/api/push/vapid-public-key", "GET", self.public_key, Budget.READ)]

    async def public_key(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        if self.vapid_public_key is None:
            raise RelayError(ErrorCode.PUSH_DISABLED)
        return json_response(HTTPStatus.OK, {"publicKey": self.vapid_public_key},
                             [("Cache-Control", "public, max-age=3600")])
