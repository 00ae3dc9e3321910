"""HTTP requests and responses as plain values, so the REST API is a function between them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
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
    def from_target(cls, method: str, target: str, headers: Headers, body: bytes, client_ip: str) -> "HttpRequest":
        path, _, qs = target.partition("?")
        return cls(method.upper(), path, headers, body, client_ip, parse_qs(qs, keep_blank_values=True))

    def header(self, name: str) -> str | None:
        return header_value(self.headers, name)


@dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = JSON_TYPE


def json_response(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> HttpResponse:
    return HttpResponse(status, encode(payload).encode(), headers or [])


def error_response(err: RelayError) -> HttpResponse:
    """The REST answer for a refusal: its status, ``{"error", "code"}`` and its headers (Retry-After, Allow...)."""
    return json_response(err.status, err.body(), list(err.headers))
