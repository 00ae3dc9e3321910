"""The process around one relay: signals, reloads, systemd, TLS, metrics listener."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from typing import Callable

from .config import Config, ConfigError, reloadable_changes
from .ops.logsetup import configure_logging
from .ops.sdnotify import Notifier
from .server import RelayServer
from .storage.store import Store

log = logging.getLogger("relayd.daemon")

STATUS_INTERVAL_S = 10.0


def make_ssl_context(config: Config) -> ssl.SSLContext | None:
    if not config.tls.certfile:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.tls.certfile, config.tls.keyfile)
    return ctx


class Daemon:
    """Runs a RelayServer until SIGTERM/SIGINT; SIGHUP reloads what can change safely."""

    def __init__(self, config: Config, store: Store, load: Callable[[], Config]) -> None:
        self.config = config
        self.load = load
        self.server = RelayServer(config, store)
        self.notifier = Notifier.from_env()
        self.ssl_context = make_ssl_context(config)
        self._metrics_server: asyncio.Server | None = None
        self._done = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        interval = self.notifier.watchdog_interval_s
        if interval is not None:
            self.server.max_tick = min(self.server.max_tick, interval / 2)
        await self.server.start(ssl_context=self.ssl_context)
        if self.config.metrics.enabled and self.config.metrics.listen:
            host, _, port = self.config.metrics.listen.rpartition(":")
            self._metrics_server = await asyncio.start_server(self._serve_metrics, host.strip("[]"), int(port))
            log.info("metrics on http://%s/metrics", self.config.metrics.listen)
        self.server.on_tick(self._tick)
        loop = asyncio.get_running_loop()
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
        self.notifier.close()

    def _status(self) -> str:
        return (f"{self.server.session_count()} sessions, {len(self.server.connections())} connections, "
                f"{self.server.store.total()} queued, storage {'ok' if self.server.store.healthy else 'UNAVAILABLE'}")

    # Called by the server's housekeeping timer, so a stalled loop stops the watchdog.

    _next_status = 0.0
    _next_watchdog = 0.0

    def _tick(self, now: float) -> None:
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
        applied, refused = reloadable_changes(self.config, new)
        for key in refused:
            log.warning("reload: %s changed but needs a restart; keeping the running value", key)
        merged = self.config
        for key in applied:
            section, name = key[1:].split("] ")
            merged = merged.replace(section, **{name: getattr(getattr(new, section), name)})
        if self.ssl_context is not None and context is not None:
            self.ssl_context.load_cert_chain(merged.tls.certfile, merged.tls.keyfile)
        elif context is not None:
            log.warning("reload: TLS cannot be switched on without a restart")
        self.config = merged
        configure_logging(merged.log.level, merged.log.format)
        self.server.configure(merged)
        log.info("configuration reloaded (%d change%s applied)", len(applied), "" if len(applied) == 1 else "s")
        self.notifier.ready(self._status())
        return True

    # Separate metrics listener

    async def _serve_metrics(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass
            parts = request_line.split()
            if len(parts) >= 2 and parts[0] == b"GET" and parts[1].split(b"?")[0] == b"/metrics":
                from .ops.prometheus import CONTENT_TYPE
                body, status, ctype = self.server.metrics.render().encode(), "200 OK", CONTENT_TYPE
            else:
                body, status, ctype = b'{"error":"Endpoint not found","code":"not_found"}', "404 Not Found", \
                    "application/json"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
