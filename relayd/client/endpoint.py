"""Where the relay is: the ws:// or wss:// URL parsed once, for the WebSocket and the REST API alike."""

from __future__ import annotations

import ssl as ssl_module
import urllib.parse
from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    """The relay's host and port; REST goes to http:// or https:// of the same host and port."""

    url: str
    host: str
    port: int
    tls: bool
    ssl: ssl_module.SSLContext | None = None

    @classmethod
    def parse(cls, url: str, ssl: ssl_module.SSLContext | None = None) -> "Endpoint":
        """Raises ValueError for anything but ``ws://HOST[:PORT]`` or ``wss://HOST[:PORT]``."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"relay URL must be ws://HOST[:PORT] or wss://HOST[:PORT], got {url!r}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"relay URL has an invalid port: {url!r}") from None
        tls = parts.scheme == "wss"
        return cls(url, parts.hostname, port or (443 if tls else 80), tls, ssl)

    @property
    def where(self) -> str:
        """``host:port`` for messages."""
        return f"{self.host}:{self.port}"

    @property
    def http_base(self) -> str:
        netloc = urllib.parse.urlsplit(self.url).netloc
        return urllib.parse.urlunsplit(("https" if self.tls else "http", netloc, "", "", ""))

    def ssl_context(self) -> ssl_module.SSLContext | None:
        """The TLS context to use (the system's default unless one was given), or None for ws://."""
        if not self.tls:
            return None
        return self.ssl or ssl_module.create_default_context()

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"
