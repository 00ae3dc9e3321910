"""HTTP requests and responses as plain values: what the transport hands a request handler and writes back.

The port frames bytes into an ``HttpRequest`` and turns the handler's
``HttpResponse`` back into bytes (``http_connection.to_response``); the REST
API (``relayd.api``) is a function between the two and builds its answers
with the helpers in ``relayd.api.http``. Refusals the transport answers by
itself (admission, Origin, malformed requests) use ``error_response``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs

from websockets.datastructures import Headers

from ..errors import RelayError
from ..frames import encode

JSON_TYPE = "application/json; charset=utf-8"


def header_value(headers: Headers, name: str) -> str | None:
    """One header's value; repeated fields joined with ", " (RFC 9110 5.3), so no lookup is ambiguous."""
    values = headers.get_all(name)
    if not values:
        return None
    return values[0] if len(values) == 1 else ", ".join(values)


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    headers: Headers
    body: bytes = b""
    client_ip: str = "127.0.0.1"
    query: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_target(cls, method: str, target: str, headers: Headers, body: bytes, client_ip: str) -> HttpRequest:
        path, _, qs = target.partition("?")
        return cls(method.upper(), path, headers, body, client_ip, parse_qs(qs, keep_blank_values=True) if qs else {})

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = JSON_TYPE


def error_response(err: RelayError) -> HttpResponse:
    """The answer for a refusal: its status, ``{"error", "code"}`` and its headers (Retry-After, Allow...)."""
    return HttpResponse(err.status, encode(err.body()).encode(), list(err.headers))
