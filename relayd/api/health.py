"""Routes for operators and load balancers: health, liveness, readiness and metrics (on a per-IP budget of their
own), and the HTML status page at ``/`` with its script and figures (``/status.js``, ``/status.json``)."""

from __future__ import annotations

import datetime
import hmac
import html
from http import HTTPStatus
from typing import Any, Protocol

from .. import __version__
from ..clock import Clock
from ..config import Config
from ..errors import ErrorCode, RelayError
from ..ops.history import ActivityHistory
from ..ops.metrics import RelayMetrics
from ..ops.prometheus import CONTENT_TYPE
from ..storage.store import Store
from .http import Route, json_response
from ..net.http_values import HttpRequest, HttpResponse
from .limits import Budget


class RelayStatus(Protocol):
    """What the health routes report about the running relay."""

    history: ActivityHistory

    def session_count(self) -> int: ...
    def accepting(self) -> bool: ...
    def readiness_problem(self) -> str | None: ...
    async def instances(self) -> dict[str, dict[str, int]]: ...

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
        self.status_refresh_s = config.server.status_refresh_s
        self.auth_mode = config.auth.mode
        self.public_url = config.server.public_url
        self.tls = bool(config.tls.certfile)
        self.status_token = config.access.status_token

    def routes(self) -> list[Route]:
        return [Route("/", "GET", self.status_page, Budget.READ),
                Route("/status.json", "GET", self.status_json, Budget.READ),
                Route("/status.js", "GET", self.status_script, Budget.READ),
                Route("/health", "GET", self.health, Budget.PROBE),
                Route("/health/live", "GET", self.live, Budget.PROBE),
                Route("/health/ready", "GET", self.ready, Budget.PROBE),
                Route("/health/instances", "GET", self.instances, Budget.READ),
                Route("/metrics", "GET", self.metrics_text, Budget.PROBE)]

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
        problem = self.relay.readiness_problem()
        ok = self.store.healthy and self.relay.accepting() and problem is None
        answer = {"status": "ready" if ok else "not_ready", "storage": self._storage(),
                  "accepting": self.relay.accepting()}
        if problem is not None:
            answer["problem"] = problem
        return json_response(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, answer)

    async def instances(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        """Connection counts per instance (on Redis, every live one), for ``Authorization: Bearer
        <[access] status_token>``; off (404) while no token is configured."""
        if not self.status_token:
            raise RelayError(ErrorCode.DISABLED, "Set [access] status_token to open /health/instances")
        scheme, _, token = (req.header("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.status_token.encode()):
            raise RelayError(ErrorCode.UNAUTHORIZED, "This route needs Authorization: Bearer <[access] status_token>",
                             headers=(("WWW-Authenticate", 'Bearer realm="relayd status"'),))
        counts = await self.relay.instances()
        total = {key: sum(c.get(key, 0) for c in counts.values()) for key in ("connections", "sessions")}
        return json_response(HTTPStatus.OK, {"instances": counts, "total": total})

    async def metrics_text(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        if not self.metrics_enabled:
            raise RelayError(ErrorCode.NOT_FOUND, f"Endpoint not found: {req.path}")
        return HttpResponse(HTTPStatus.OK, self.metrics.render().encode(), content_type=CONTENT_TYPE)

    def _figures(self, req: HttpRequest) -> tuple[bool, list[tuple[str, str, str]]]:
        """The page's rows as (id, label, value): what ``/health`` knows, counts only."""
        healthy = self.store.healthy
        m = self.metrics
        refused = (sum(m.refused.by_label().values()) + sum(m.rate_limited.by_label().values())
                   + sum(m.access_denied.by_label().values()))
        return healthy, [
            ("status", "Status", "ok" if healthy else "degraded: storage unavailable"),
            ("uptime", "Uptime", _duration(self.clock.monotonic() - self.started)),
            ("connections", "Connections", f"{self.relay.session_count():,}"),
            ("queued", "Messages queued for offline recipients", f"{self.store.total():,}"),
            ("storage", "Storage", f"{self.store.name}, {'ok' if healthy else 'unavailable'}"),
            ("mode", "Sign-in mode", self.auth_mode),
            ("since", "Messages since start", f"{int(m.routed_live.value):,} delivered live, {int(m.queued.value):,} "
                                              f"stored, {int(refused):,} refused")]

    async def status_page(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        """What ``/health`` knows, for a person with a browser, and charts of the last hour: no external asset,
        no address, one same-origin script that refreshes the figures from ``/status.json``."""
        if not self.status_page_enabled:
            raise RelayError(ErrorCode.NOT_FOUND, f"Endpoint not found: {req.path}")
        healthy, figures = self._figures(req)
        url = self.public_url or f"{'wss' if self.tls else 'ws'}://{req.header('host') or 'localhost'}"
        table = "".join(f'<tr><th>{html.escape(label)}</th><td id="v-{key}">{html.escape(value)}</td></tr>'
                        for key, label, value in figures)
        series = self.relay.history.series(self.clock.monotonic())
        charts = "".join(_chart(key, title, series[key]) for key, title in CHARTS)
        body = STATUS_PAGE.format(version=html.escape(__version__), state="ok" if healthy else "bad",
                                  table=table, url=html.escape(url), charts=charts,
                                  refresh=f"{self.status_refresh_s:g}")
        return HttpResponse(HTTPStatus.OK, body.encode(), [
            ("Content-Security-Policy", STATUS_CSP), ("X-Content-Type-Options", "nosniff")],
            content_type="text/html; charset=utf-8")

    async def status_json(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        """The status page's figures and last-hour series, for its script (and anyone's)."""
        if not self.status_page_enabled:
            raise RelayError(ErrorCode.NOT_FOUND, f"Endpoint not found: {req.path}")
        healthy, figures = self._figures(req)
        series = self.relay.history.series(self.clock.monotonic())
        return json_response(HTTPStatus.OK, {
            "ok": healthy, "figures": {key: value for key, _, value in figures},
            "history": {key: {"values": series[key], "peak": max(series[key]), "points": _points(series[key])}
                        for key, _ in CHARTS},
            "refreshSeconds": self.status_refresh_s})

    async def status_script(self, req: HttpRequest, args: list[str]) -> HttpResponse:
        if not self.status_page_enabled:
            raise RelayError(ErrorCode.NOT_FOUND, f"Endpoint not found: {req.path}")
        return HttpResponse(HTTPStatus.OK, STATUS_SCRIPT.encode(), [
            ("X-Content-Type-Options", "nosniff"), ("Cache-Control", "max-age=300")],
            content_type="text/javascript; charset=utf-8")


def _duration(seconds: float) -> str:
    minutes, _ = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [f"{n} {unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "min")) if n]
    return " ".join(parts) or "under a minute"


CHARTS = (("connections", "Connections"), ("messages", "Messages per minute"), ("refusals", "Refusals per minute"))
CHART_W, CHART_H = 300, 60
STATUS_CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'self'; connect-src 'self'"
"""The page's own script comes from ``/status.js`` (same origin), never inline; it may fetch only this relay."""


def _points(values: list[float]) -> str:
    """An SVG polyline's points for ``values`` (oldest at the left), scaled to the chart's height."""
    peak = max(max(values), 1)
    step = CHART_W / max(len(values) - 1, 1)
    return " ".join(f"{i * step:.1f},{CHART_H - 2 - v / peak * (CHART_H - 4):.1f}" for i, v in enumerate(values))


def _chart(key: str, title: str, values: list[float]) -> str:
    peak = f"{max(values):,.0f}"
    return (f'<figure><figcaption>{html.escape(title)}, last hour <small>(peak <span id="peak-{key}">{peak}</span>)'
            f'</small></figcaption><svg id="chart-{key}" viewBox="0 0 {CHART_W} {CHART_H}" width="{CHART_W}" '
            f'height="{CHART_H}" role="img" aria-label="{html.escape(title)}, one point per minute">'
            f'<polyline fill="none" stroke="#176f2c" stroke-width="1.5" points="{_points(values)}"/></svg></figure>')


STATUS_SCRIPT = """"use strict";
// relayd's status page: refresh the figures and charts from /status.json every data-refresh seconds.
(function () {
  const every = Math.max(0.2, Number(document.body.dataset.refresh) || 5) * 1000;
  async function refresh() {
    try {
      const answer = await fetch("/status.json", {cache: "no-store"});
      const s = await answer.json();
      for (const [key, value] of Object.entries(s.figures)) {
        const cell = document.getElementById("v-" + key);
        if (cell) cell.textContent = value;
      }
      for (const [key, chart] of Object.entries(s.history)) {
        const line = document.querySelector("#chart-" + key + " polyline");
        if (line) line.setAttribute("points", chart.points);
        const peak = document.getElementById("peak-" + key);
        if (peak) peak.textContent = Math.round(chart.peak).toLocaleString("en");
      }
      document.getElementById("figures").className = s.ok ? "ok" : "bad";
      document.getElementById("stale").hidden = true;
      document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
    } catch (e) {
      document.getElementById("stale").hidden = false;
    }
    setTimeout(refresh, every);
  }
  setTimeout(refresh, every);
})();
"""


STATUS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>relayd {version}</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 42em; margin: 2em auto; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.6em; margin-bottom: 0; }} h1 small {{ color: #777; font-weight: normal; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th {{ text-align: left; font-weight: normal; color: #555; padding: .25em 1.5em .25em 0; }}
td {{ font-weight: 600; }} tr:first-child td {{ color: #176f2c; }} .bad tr:first-child td {{ color: #b00020; }}
figure {{ display: inline-block; margin: 0 1.5em 1em 0; }} figcaption {{ color: #555; font-size: .9em; }}
svg {{ background: #f7f7f7; border-bottom: 1px solid #ccc; }} #stale {{ color: #b00020; }}
code {{ background: #f2f2f2; padding: .1em .35em; border-radius: 3px; }}
</style></head>
<body data-refresh="{refresh}">
<h1>relayd <small>{version}</small></h1>
<p>A relay for the Idena P2P messenger: it routes end-to-end-encrypted messages between Idena addresses and holds
them for offline recipients. It never sees plaintext.</p>
<table id="figures" class="{state}">{table}</table>
<p id="stale" hidden>The relay did not answer the last refresh; the figures may be old.</p>
<h2>Last hour</h2>
{charts}
<h2>Connect</h2>
<p>WebSocket and REST share one port: <code>{url}</code>. Check this relay end to end with
<code>relayd check --relay {url}</code>.</p>
<p>For machines: <a href="/health">/health</a>, <a href="/health/ready">/health/ready</a>.</p>
<script src="/status.js"></script>
</body></html>
"""
