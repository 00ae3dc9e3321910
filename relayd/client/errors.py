"""Every failure of the client: one ``ClientError`` family whose messages say what went wrong."""

from __future__ import annotations

import json
import ssl

from .display import shown


class ClientError(Exception):
    """Base of every error this client raises; the message is meant for a human."""


class RelayUnreachable(ClientError):
    """No WebSocket or HTTP conversation: refused, unresolvable, TLS failure, or not a WebSocket server.

    ``status`` is the HTTP status when the server answered the upgrade with one.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def close_detail(code: int | None, reason: str) -> str:
    """`` (code 1001 going away)``, `` (code 1001)`` without a reason, or nothing without a close frame."""
    if not code:
        return ""
    return f" (code {code} {shown(reason)})" if reason else f" (code {code})"


def unreachable(where: str, exc: OSError, doing: str) -> RelayUnreachable:
    """Why the relay at ``where`` could not be reached while ``doing`` something ("cannot connect to X")."""
    if isinstance(exc, ConnectionRefusedError):
        return RelayUnreachable(f"connection refused by {where} (nothing listening?)")
    if isinstance(exc, ssl.SSLError):
        hint = ""
        if exc.reason == "WRONG_VERSION_NUMBER":
            hint = ("; the server does not speak TLS on that port: use ws:// (relayd without [tls] certfile), "
                    "or wss:// through a reverse proxy or with [tls] set")
        return RelayUnreachable(f"TLS with {where} failed: {exc.reason or exc}{hint}")
    return RelayUnreachable(f"{doing}: {exc.strerror or exc}")


class ClientTimeout(ClientError, TimeoutError):
    """Nothing came within the timeout; the message says what was awaited."""


class ConnectionLost(ClientError):
    """The WebSocket closed; ``code``/``reason`` are the close frame's, when one came."""

    def __init__(self, message: str, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class AuthRefused(ClientError):
    """The relay refused the sign-in with an ``error`` frame (``code``: auth_failed, auth_required, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"sign-in refused: {shown(code, 50)}: {shown(message)}")
        self.code = code
        self.relay_message = message


class ProtocolViolation(ClientError):
    """The peer sent something a relay never sends: not JSON, JSON nested too deep, a frame or answer over the
    client's size limits, an unexpected frame, a malformed challenge."""


class HttpError(ClientError):
    """A REST answer with status >= 400; ``code`` is the relay's error code when the body has one."""

    def __init__(self, method: str, path: str, status: int, body: bytes) -> None:
        self.status = status
        self.body = body
        self.code: str | None = None
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, dict) and isinstance(parsed.get("code"), str):
            self.code = parsed["code"]
        super().__init__(f"{method} {path}: HTTP {status}: {shown(body.strip()) or '(empty body)'}")


class KeyVerificationError(ClientError):
    """A public-key record whose statement or signature does not prove it came from its address."""
