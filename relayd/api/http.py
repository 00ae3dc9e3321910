"""What the REST API's routes share: the route table's entries and the JSON helpers that build answers.

The request and response values themselves belong to the transport (``relayd.net.http_values``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Awaitable, Callable

from ..addresses import normalize_address
from ..errors import ErrorCode, RelayError
from ..frames import encode, loads
from ..net.http_values import HttpRequest, HttpResponse
from .limits import Budget

MAX_BATCH = 1000


Handler = Callable[[HttpRequest, list[str]], Awaitable[HttpResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    """One method on one path pattern (a ``*`` segment matches any one segment) and the budget it spends."""

    path: str
    method: str
    handler: Handler
    budget: Budget


def json_response(status: int, payload: Any, headers: list[tuple[str, str]] | None = None) -> HttpResponse:
    return HttpResponse(status, encode(payload).encode(), headers or [])


def cached_json_response(req: HttpRequest, payload: Any, cache_control: str) -> HttpResponse:
    """A ``200`` with an ``ETag`` of its body, or ``304`` when ``If-None-Match`` already names it.

    The ETag is a digest of the exact body, so any change to the answer
    (a new key, a new ``updatedAt``) changes it. ``If-None-Match`` is
    compared weakly (RFC 9110 13.1.2), ``*`` matching any current answer.
    """
    body = encode(payload).encode()
    etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
    headers = [("ETag", etag), ("Cache-Control", cache_control)]
    wanted = req.header("if-none-match")
    if wanted is not None:
        tags = {t.strip().removeprefix("W/") for t in wanted.split(",")}
        if etag in tags or "*" in tags:
            return HttpResponse(HTTPStatus.NOT_MODIFIED, b"", headers, content_type="")
    return HttpResponse(HTTPStatus.OK, body, headers)


def json_body(req: HttpRequest) -> dict[str, Any]:
    """The request's JSON object (``{}`` for an empty body); ``invalid_json`` or ``bad_request`` otherwise."""
    if not req.body.strip():
        return {}
    try:
        body = loads(req.body)
    except ValueError:
        raise RelayError(ErrorCode.INVALID_JSON, "Request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RelayError(ErrorCode.BAD_REQUEST, "Request body must be a JSON object")
    return body


def address_batch(body: dict[str, Any]) -> list[str]:
    """The lower-cased ``addresses`` of a batch body: 1 to ``MAX_BATCH`` valid addresses."""
    addresses = body.get("addresses")
    if not isinstance(addresses, list) or not addresses:
        raise RelayError(ErrorCode.BAD_REQUEST, "addresses must be a non-empty array")
    if len(addresses) > MAX_BATCH:
        raise RelayError(ErrorCode.BAD_REQUEST, f"addresses may hold at most {MAX_BATCH} entries")
    out = []
    for a in addresses:
        try:
            out.append(normalize_address(a))
        except RelayError:
            raise RelayError(ErrorCode.INVALID_ADDRESS, f"Invalid address format: {str(a)[:64]}") from None
    return out
