"""The process around one relay: signals, reloads, systemd notifications, TLS, the metrics listener."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from http import HTTPStatus
from typing import Any, Callable

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from .config import Config, ConfigError, merge_reload
from .errors import ErrorCode, RelayError
from .net.admission import raise_descriptor_limit
from .net.http_values import HttpResponse, error_response
from .net import transports
from .net.http_connection import to_response
from .ops.allocator import tune_allocator
from .ops.certificate import CertificateError, certificate_not_after
from .ops.collector import Collector
from .ops.logsetup import configure_logging
from .ops.prometheus import CONTENT_TYPE
from .ops.sdnotify import Notifier
from .ops.startup import startup_report
from .server import RelayServer
from .storage.store import Store

log = logging.getLogger("relayd.daemon")

STATUS_INTERVAL_S = 10.0
ACCEPT_ERROR_INTERVAL_S = 60.0


class AcceptErrors:
    """The loop's exception handler: accept() failures (out of descriptors or memory) are logged once a minute
    with a count, instead of one traceback per failed accept; anything else goes to asyncio's default handler."""

    def __init__(self) -> None:
        self.failures = 0
        self.last_logged = float("-inf")

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "accept" not in str(context.get("message", "")):
            loop.default_exception_handler(context)
            return
        self.failures += 1
        now = loop.time()
        if now - self.last_logged >= ACCEPT_ERROR_INTERVAL_S:
            exc = context.get("exception")
            log.error("cannot accept connections (%s): %d failures since the last report; the listening socket "
                      "retries by itself", exc or context.get("message"), self.failures)
            self.failures, self.last_logged = 0, now


def make_ssl_context(config: Config) -> ssl.SSLContext | None:
    if not config.tls.certfile:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.tls.certfile, config.tls.keyfile)
    return ctx


class Daemon:
    """Runs a RelayServer until SIGTERM/SIGINT; SIGHUP reloads what can change safely."""

    def __init__(self, config: Config, store: Store, load: Callable[[], Config], sources: list[str]) -> None:
        """``load`` re-reads the configuration on SIGHUP; ``sources`` names what set it, for the start-up log."""
        self.config = config
        self.load = load
        self.sources = sources
        self.descriptors = raise_descriptor_limit()
        tune_allocator()
        self.server = RelayServer(config, store)
        self.notifier = Notifier.from_env()
        self.ssl_context = make_ssl_context(config)
        self._watch_certificate(config.tls.certfile if self.ssl_context is not None else "")
        self._metrics_server: Server | None = None
        self.collector: Collector | None = None
        """Set once the loop runs: whether it may freeze depends on the loop (``relayd.ops.collector``)."""
        self._done = asyncio.Event()
        self._tasks: set[asyncio.Task[bool]] = set()
        self._next_status = 0.0
        self._next_watchdog = 0.0

    async def start(self) -> None:
        housekeeping = self.server.housekeeping
        interval = self.notifier.watchdog_interval_s
        if interval is not None:
            housekeeping.max_tick = min(housekeeping.max_tick, interval / 2)
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(AcceptErrors())
        await self.server.start(ssl_context=self.ssl_context)
        self.collector = Collector(loop.time, freezing=transports.freezes_safely(loop, self.ssl_context is not None),
                                   observe=self.server.metrics.gc_full_pause.observe)
        self.collector.install()
        housekeeping.tick_callbacks.append(self.collector.tick)
        for level, line in startup_report(self.config, self.sources, self.server.addresses,
                                          crypto=self.server.crypto,
                                          budget=self.server.router.delivery.limits.max_total_bytes,
                                          budget_how=self.server.budget_how):
            log.log(level, "%s", line)
        if self.config.metrics.enabled and self.config.metrics.listen:
            host, _, port = self.config.metrics.listen.rpartition(":")
            self._metrics_server = await serve(self._refuse_websocket, host.strip("[]"), int(port),
                                               process_request=self._serve_metrics)
            log.info("metrics on http://%s/metrics", self.config.metrics.listen)
        housekeeping.tick_callbacks.append(self._tick)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._done.set)
        loop.add_signal_handler(signal.SIGHUP, self._spawn_reload)
        self.notifier.ready(self._status())

    async def run(self) -> None:
        await self._done.wait()
        self.notifier.stopping("shutting down")
        if self._metrics_server is not None:
            self._metrics_server.close()
        await self.server.stop()
        if self.collector is not None:
            self.collector.uninstall()
        self.notifier.close()

    def _status(self) -> str:
        server = self.server
        return (f"{server.session_count()} sessions, {len(server.gateway.sessions)} connections, "
                f"{server.store.total()} queued, storage {'ok' if server.store.healthy else 'UNAVAILABLE'}")

    def _tick(self, now: float) -> None:
        """Called by the housekeeping timer, so a stalled loop stops the watchdog."""
        interval = self.notifier.watchdog_interval_s
        if interval is not None and now >= self._next_watchdog:
            self.notifier.watchdog()
            self._next_watchdog = now + interval
        if self.notifier.enabled and now >= self._next_status:
            self.notifier.status(self._status())
            self._next_status = now + STATUS_INTERVAL_S

    # SIGHUP

    def _spawn_reload(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> bool:
        """Apply a new configuration's reloadable keys; keep the old one if it is broken."""
        self.notifier.reloading("reloading configuration")
        try:
            new = self.load()
            context = make_ssl_context(new) if new.tls.certfile else None
        except (ConfigError, OSError, ssl.SSLError) as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
            self.notifier.ready(self._status())
            return False
        except Exception:  # whatever went wrong, systemd must hear READY=1 again
            log.exception("reload refused, keeping the running configuration")
            self.notifier.ready(self._status())
            return False
        merged, applied, refused = merge_reload(self.config, new)
        for key in refused:
            log.warning("reload: %s changed but needs a restart; keeping the running value", key)
        if self.ssl_context is not None and context is not None:
            self.ssl_context.load_cert_chain(merged.tls.certfile, merged.tls.keyfile)
            self._watch_certificate(merged.tls.certfile)
        elif context is not None:
            log.warning("reload: TLS cannot be switched on without a restart")
        self.config = merged
        configure_logging(merged.log.level, merged.log.format)
        self.server.configure(merged)
        log.info("configuration reloaded: %s", f"applied {', '.join(applied)}" if applied else "nothing changed")
        self.notifier.ready(self._status())
        return True

    def _watch_certificate(self, certfile: str) -> None:
        """Publish the served certificate's expiry (a renewal is loaded on SIGHUP, so it is read again then)."""
        expiry: float | None = None
        if certfile:
            try:
                expiry = certificate_not_after(certfile)
            except (OSError, CertificateError) as exc:
                log.warning("cannot read when the TLS certificate expires, so the metric is absent: %s", exc)
        self.server.metrics.certificate_expiry.set_function(lambda: expiry)

    # The separate metrics listener

    def _serve_metrics(self, conn: ServerConnection, request: Request) -> Response:
        if request.path.partition("?")[0] == "/metrics":
            body = HttpResponse(HTTPStatus.OK, self.server.metrics.render().encode(), content_type=CONTENT_TYPE)
        else:
            body = error_response(RelayError(ErrorCode.NOT_FOUND, f"Endpoint not found: {request.path}"))
        return to_response(body, request.method == "HEAD")

    async def _refuse_websocket(self, conn: ServerConnection) -> None:
        """Never called: ``_serve_metrics`` answers every request before any upgrade."""
