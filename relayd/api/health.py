"""Routes for operators and load balancers: health, liveness, readiness and metrics (never rate-limited), and
the HTML status page at ``/``."""

from __future__ import annotations

import datetime
import html
from http import HTTPStatus
from typing import Any, Protocol

from .. import __version__
from ..clock import Clock
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..ops.metrics import RelayMetrics
from ..ops.prometheus import CONTENT_TYPE
from ..storage.store import Store
from .http import Route, json_response
from ..net.http_values import HttpRequest, HttpResponse
from .limits import Budget


class RelayStatus(Protocol):
    """What the health routes report about the running relay."""

    def session_count(self) -> int: ...
    def accepting(self) -> bool: ...
    def storage_budget(self) -> int:
        """The bytes ``Store.stored_bytes`` may reach (0: no budget)."""
        ...


class HealthRoutes:
    def __init__(self, config: Config, store: Store, metrics: RelayMetrics, relay: RelayStatus, clock: Clock) -> None:
        self.store = store
        self.metrics = metrics
        self.relay = relay
        self.clock = clock
        self.started = clock.monotonic()
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.metrics_enabled = config.metrics.enabled and not config.metrics.listen
        self.status_page_enabled = config.server.status_page
        self.auth_mode = config.auth.mode
        self.public_url = config.server.public_url
        self.tls = bool(config.tls.certfile)

    def routes(self) -> list[Route]:
        return [Route("/", "GET", self.status_page, Budget.READ),
                Route("/health", "GET", self.health, Budget.EXEMPT),
                Route("/health/live", "GET", self.live, Budget.EXEMPT),
                Route("/health/ready", "GET", self.ready, Budget.EXEMPT),
                Route("/metrics", "GET", self.metrics_text, Budget.EXEMPT)]

    def _storage(self) -> dict[str, Any]:
        state = {"backend": self.store.name, "status": "ok" if self.store.healthy else "unavailable"}
        if self.store.problem:
            state["problem"] = self.store.problem
        return state

    async def health(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        healthy = self.store.healthy
        return json_response(HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE, {
            "status": "ok" if healthy else "degraded",
            "timestamp": datetime.datetime.fromtimestamp(self.clock.wall(), datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "uptime": round(self.clock.monotonic() - self.started, 3),
            "connections": self.relay.session_count(),
            "queuedMessages": self.store.total(),
            "version": __version__,
            "storage": self._storage(),
        })

    async def live(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        return json_response(HTTPStatus.OK, {"status": "ok"})

    async def ready(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        ok = self.store.healthy and self.relay.accepting()
        return json_response(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE,
                             {"status": "ready" if ok else "not_ready", "storage": self._storage(),
                              "accepting": self.relay.accepting()})

    async def metrics_text(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        if not self.metrics_enabled:
            raise RelayError(ErrorCode.NOT_FOUND, f"Endpoint not found: {req.path}")
        return HttpResponse(HTTPStatus.OK, self.metrics.render().encode(), content_type=CONTENT_TYPE)

    async def status_page(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        """What ``/health`` knows, for a person with a browser: no script, no external asset, no address."""
        if not self.status_page_enabled:
            raise RelayError(ErrorCode.NOT_FOUND, f"Endpoint not found: {req.path}")
        healthy = self.store.healthy
        m = self.metrics
        url = self.public_url or f"{'wss' if self.tls else 'ws'}://{req.header('host') or 'localhost'}"
        rows = [("Status", "ok" if healthy else "degraded: storage unavailable"),
                ("Uptime", _duration(self.clock.monotonic() - self.started)),
                ("Connections", f"{self.relay.session_count():,}"),
                ("Messages queued for offline recipients", f"{self.store.total():,}"),
                ("Storage", f"{self.store.name}, {'ok' if healthy else 'unavailable'}"),
                ("Sign-in mode", self.auth_mode),
                ("Messages since start", f"{int(m.routed_live.value):,} delivered live, {int(m.queued.value):,} "
                                         f"stored, {int(sum(m.refused.by_label().values())):,} refused")]
        table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        body = STATUS_PAGE.format(version=html.escape(__version__), state="ok" if healthy else "bad",
                                  table=table, url=html.escape(url))
        return HttpResponse(HTTPStatus.OK, body.encode(), [
            ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
            ("X-Content-Type-Options", "nosniff")], content_type="text/html; charset=utf-8")


def _duration(seconds: float) -> str:
    minutes, _ = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{n} {unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "min")) if n]
    return " ".join(parts) or "under a minute"


STATUS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>relayd {version}</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 42em; margin: 2em auto; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.6em; margin-bottom: 0; }} h1 small {{ color: #777; font-weight: normal; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th {{ text-align: left; font-weight: normal; color: #555; padding: .25em 1.5em .25em 0; }}
td {{ font-weight: 600; }} tr:first-child td {{ color: #176f2c; }} .bad tr:first-child td {{ color: #b00020; }}
code {{ background: #f2f2f2; padding: .1em .35em; border-radius: 3px; }}
</style></head>
<body>
<h1>relayd <small>{version}</small></h1>
<p>A relay for the Idena P2P messenger: it routes end-to-end-encrypted messages between Idena addresses and holds
them for offline recipients. It never sees plaintext.</p>
<table class="{state}">{table}</table>
<h2>Connect</h2>
<p>WebSocket and REST share one port: <code>{url}</code>. Check this relay end to end with
<code>relayd check --relay {url}</code>.</p>
<p>For machines: <a href="/health">/health</a>, <a href="/health/ready">/health/ready</a>.</p>
</body></html>
"""
