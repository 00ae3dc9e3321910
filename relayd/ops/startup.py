"""The start-up block: enough for an operator to see that this is the relay they meant to start.

One log line per fact (so journald, files and JSON logs all keep them whole):
version, the URLs served, the configuration sources, storage, sign-in mode,
and a warning when the relay is exposed without TLS in front of it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import urllib.parse
from collections.abc import Iterable

import websockets

from .. import __version__
from ..config import Config
from ..config.redact import redact_url
from .eventloop import loop_name

ALL_INTERFACES = ("0.0.0.0", "::", "")

AUTH_MODES = {
    "open": "open (no proof of address ownership, as the original)",
    "mixed": "mixed (signatures optional; an address that ever signed must always sign)",
    "signed": "signed (every sign-in and key must be signed)",
}


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def listen_urls(addresses: Iterable[tuple[str, int]], tls: bool) -> list[str]:
    """``ws://host:port`` and ``http://host:port`` (``wss``/``https`` with TLS) for each listening address."""
    ws, http = ("wss", "https") if tls else ("ws", "http")
    out = []
    for host, port in addresses:
        out += [f"{ws}://{_host(host)}:{port}", f"{http}://{_host(host)}:{port}"]
    return out


def redis_location(url: str) -> str:
    """``redis://host:port/db`` without user or password."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{_host(host)}{port}{parts.path or '/0'}"


def size_text(n: int) -> str:
    """Bytes in the largest binary unit that keeps a number of at least 1."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):,.1f} {unit}"
    return f"{n} bytes"


def storage_line(config: Config, budget: int, budget_how: str = "") -> str:
    storage = config.storage
    if storage.backend == "sqlite":
        where = f"sqlite {os.path.abspath(storage.path)} (synchronous = {storage.synchronous})"
    elif storage.backend == "redis":
        where = f"redis {redis_location(config.redis.url)}"
    elif storage.backend == "postgres":
        where = f"postgres {redact_url(config.postgres.url) or '(from the PG* environment variables)'}"
    else:
        where = "memory (everything is lost on restart)"
    limit = (f"queued content, receipts, keys and push subscriptions may take {size_text(budget)}" if budget
             else "no budget for queued content, receipts, keys and push subscriptions")
    if config.storage.max_bytes >= 0:
        limit += " ([storage] max_bytes)"
    elif budget_how:
        limit += f" ([storage] max_bytes = -1: {budget_how})"
    return f"storage: {where}; {limit}"


def startup_report(config: Config, sources: list[str], addresses: list[tuple[str, int]], *, crypto: str,
                   budget: int, budget_how: str = "") -> list[tuple[int, str]]:
    """The block's lines with their log levels, in order (called on the running loop, which it names)."""
    tls = bool(config.tls.certfile)
    urls = listen_urls(addresses, tls)
    lines = [
        (logging.INFO, f"relayd {__version__} (Python {platform.python_version()}, websockets "
                       f"{websockets.__version__}, event loop {loop_name(asyncio.get_running_loop())})"),
        (logging.INFO, f"relayd listening on {', '.join(urls)} (WebSocket and REST on one port)"),
    ]
    if config.server.public_url:
        lines.append((logging.INFO, f"public URL (signed sign-ins are bound to it): {config.server.public_url}"))
    extras = []
    if config.server.status_page:
        extras.append("status page at /")
    if config.metrics.enabled:
        extras.append(f"metrics at http://{config.metrics.listen}/metrics" if config.metrics.listen
                      else "metrics at /metrics")
    if extras:
        lines.append((logging.INFO, "serving " + ", ".join(extras)))
    lines.append((logging.INFO, "configuration: " + "; ".join(sources or ["defaults"])))
    lines.append((logging.INFO, storage_line(config, budget, budget_how)))
    lines.append((logging.INFO, f"auth: {AUTH_MODES[config.auth.mode]}; signature verification: {crypto}"))
    exposed = [host for host, _ in addresses if host in ALL_INTERFACES]
    if exposed and not tls and not config.server.trusted_proxies:
        lines.append((logging.WARNING,
                      f"listening on all interfaces ({', '.join(exposed)}) without TLS and without trusted_proxies: "
                      "clients reach it unencrypted; for a public relay put a TLS reverse proxy in front (and "
                      "set [server] trusted_proxies) or set [tls] certfile and keyfile"))
    return lines
