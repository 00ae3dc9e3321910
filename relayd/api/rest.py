"""The REST API of the seed, as a function from an ``HttpRequest`` to an ``HttpResponse``.

No sockets: the transport (``relayd.net``) turns bytes into the request and
the response back into bytes, and calls ``HttpApi.handle`` as its
``RequestHandler``. This module routes and applies what every route shares
(Origin policy, per-IP budgets, ``HEAD``, ``OPTIONS``, ``405``, errors as
``{"error": ..., "code": ...}``); the routes live in ``keys``, ``messages``,
``presence``, ``push`` and ``health``.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from urllib.parse import unquote

from ..clock import Clock
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..identity.auth import Authenticator
from ..ops.metrics import RelayMetrics
from ..protocol.seams import Presence
from ..storage.store import StorageUnavailable, Store
from .health import HealthRoutes, RelayStatus
from .keys import KeyRoutes, SessionRegistry
from .messages import MessageRoutes
from .presence import PresenceRoutes
from .push import PushRoutes
from .http import Route
from ..net.http_values import HttpRequest, HttpResponse, error_response
from ..net.origins import OriginPolicy
from .limits import Budget, RestLimits

log = logging.getLogger("relayd.http")

Pattern = tuple[str, ...]


def _segments(path: str) -> list[str]:
    stripped = path.strip("/")
    parts = stripped.split("/") if stripped else []
    return [unquote(p) for p in parts] if "%" in stripped else parts


def _allowed(methods: dict[str, Route]) -> list[str]:
    """The methods a path answers, for ``Allow``: its routes', ``OPTIONS``, and ``HEAD`` where ``GET`` is."""
    return sorted({*methods, "OPTIONS"} | ({"HEAD"} if "GET" in methods else set()))


class HttpApi:
    """Routes requests to handlers; applies CORS, the per-IP budgets, ``HEAD`` and ``OPTIONS``.

    ``GET`` routes answer ``HEAD`` too. ``HEAD`` and ``OPTIONS`` spend the
    read budget; unknown paths and refused methods spend the write budget.
    Answers that set no ``Cache-Control`` get ``no-store``.
    """

    def __init__(self, config: Config, presence: Presence, store: Store, metrics: RelayMetrics,
                 authenticator: Authenticator, sessions: SessionRegistry, relay: RelayStatus, clock: Clock,
                 vapid_public_key: str | None = None) -> None:
        """``vapid_public_key``: the relay's Web Push key when push notifications are on."""
        self.metrics = metrics
        self.clock = clock
        self.limits = RestLimits(config.limits, metrics)
        self.groups = (HealthRoutes(config, store, metrics, relay, clock),
                       KeyRoutes(config, store, authenticator, sessions, self.limits, clock, relay.storage_budget),
                       MessageRoutes(config, store, authenticator),
                       PresenceRoutes(config, presence, self.limits, clock),
                       PushRoutes(config, vapid_public_key))
        self._table: dict[int, dict[Pattern, dict[str, Route]]] = {}
        for group in self.groups:
            for route in group.routes():
                pattern = tuple(_segments(route.path))
                self._table.setdefault(len(pattern), {}).setdefault(pattern, {})[route.method] = route
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.origins = OriginPolicy(config.server.allowed_origins)
        self.limits.configure(config.limits)
        for group in self.groups:
            group.configure(config)

    def sweep(self) -> None:
        """Forget finished rate windows, so idle clients cost no memory."""
        self.limits.sweep(self.clock.monotonic())

    def _match(self, path: str) -> tuple[dict[str, Route], list[str]] | None:
        parts = _segments(path)
        for pattern, methods in self._table.get(len(parts), {}).items():
            args = []
            for want, got in zip(pattern, parts):
                if want == "*":
                    args.append(got)
                elif want != got:
                    break
            else:
                return methods, args
        return None

    async def handle(self, req: HttpRequest) -> HttpResponse:
        """Answer one request; never raises.

        Refusals become JSON errors and any unexpected exception a logged
        ``500``. CORS headers are added to every answer for an allowed Origin.
        """
        origin = req.header("origin")
        try:
            response = await self._dispatch(req, origin)
        except RelayError as err:
            response = error_response(err)
        except Exception:
            log.exception("internal error answering a %s request", req.method)
            response = error_response(RelayError(ErrorCode.INTERNAL_ERROR))
        if not any(name == "Cache-Control" for name, _ in response.headers):
            response.headers.append(("Cache-Control", "no-store"))
        allow = self.origins.allow_header(origin)
        if allow is not None and origin is not None:
            response.headers.append(("Access-Control-Allow-Origin", allow))
            response.headers.append(("Vary", "Origin"))
        self.metrics.http.labels(status=f"{response.status // 100}xx").inc()
        return response

    async def _dispatch(self, req: HttpRequest, origin: str | None) -> HttpResponse:
        if not self.origins.allows(origin):
            raise RelayError(ErrorCode.ORIGIN_NOT_ALLOWED, f"Origin not allowed: {origin}")
        now = self.clock.monotonic()
        found = self._match(req.path)
        if found is None:
            self.limits.charge(Budget.WRITE, req.client_ip, now)
            raise RelayError(ErrorCode.NOT_FOUND, f"Endpoint not found: {req.path}")
        methods, args = found
        route = methods.get("GET" if req.method == "HEAD" else req.method)
        if req.method in ("HEAD", "OPTIONS"):
            budgets = {r.budget for r in methods.values()}  # a probe's HEAD is a probe too
            own = len(budgets) == 1 and budgets <= {Budget.EXEMPT, Budget.PROBE}
            budget = budgets.pop() if own else Budget.READ
        else:
            budget = route.budget if route is not None else Budget.WRITE
        self.limits.charge(budget, req.client_ip, now)
        if req.method == "OPTIONS":
            return self._preflight(req, _allowed(methods))
        if route is None:
            raise RelayError(ErrorCode.METHOD_NOT_ALLOWED, f"Method {req.method} not allowed on {req.path}",
                             headers=(("Allow", ", ".join(_allowed(methods))),))
        try:
            return await route.handler(req, args)
        except StorageUnavailable as exc:
            raise RelayError(ErrorCode.STORAGE_UNAVAILABLE, f"Storage is unavailable: {exc}") from None

    @staticmethod
    def _preflight(req: HttpRequest, allowed: list[str]) -> HttpResponse:
        headers = [("Access-Control-Allow-Methods", ", ".join(allowed)),
                   ("Access-Control-Allow-Headers",
                    req.header("access-control-request-headers") or "Content-Type, Authorization"),
                   ("Access-Control-Max-Age", "600"), ("Allow", ", ".join(allowed))]
        return HttpResponse(HTTPStatus.NO_CONTENT, b"", headers, content_type="")
