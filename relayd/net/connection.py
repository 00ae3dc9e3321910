"""One websockets connection as relayd uses it: REST bodies in, frames out without awaiting.

``RelayConnection`` is the session's ``Outbox``. It and ``http_framing`` are
the only code that reaches into websockets internals (the protocol's reader
and parser); ``tests/test_websockets_compat.py`` fails loudly, naming the
version, if a websockets release breaks them.
"""

from __future__ import annotations

import email.utils
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Awaitable

from websockets.asyncio.server import Server, ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.protocol import State

from .http_api import HttpResponse
from .http_framing import BodyReader

log = logging.getLogger("relayd.server")


@dataclass(slots=True)
class ConnectionLimits:
    """Per-connection limits, shared by every connection so that a reload reaches open ones too."""

    max_body: int
    max_outbound: int


class RelayConnection(ServerConnection):
    """A connection that can read REST bodies and write frames without awaiting."""

    def __init__(self, protocol: Any, server: Server, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(protocol, server, **kwargs)
        self.limits = limits
        self.client_ip = "unknown"
        protocol.reader = BodyReader(limits.max_body)
        protocol.parser = protocol.parse()
        next(protocol.parser)

    def push(self, data: str) -> bool:
        """Queue one text frame; False when closed or when the peer stopped reading.

        A peer whose unread backlog passes ``max_outbound`` is cut off, so a
        client that never reads cannot grow the server's memory.
        """
        if self.protocol.state is not State.OPEN:
            return False
        if self.transport.get_write_buffer_size() > self.limits.max_outbound:
            log.debug("closing a connection whose peer stopped reading")
            self.transport.abort()
            return False
        self.protocol.send_text(data.encode())
        self.send_data()
        return True

    def congested(self) -> Awaitable[None] | None:
        """While the transport is paused above the write limit, the awaitable that resumes."""
        return self.drain() if self.paused else None

    def close_soon(self, code: int, reason: str) -> None:
        self.loop.create_task(self.close(code, reason))


def is_upgrade(request: Request) -> bool:
    return any(v.strip().lower() == "websocket" for v in request.headers.get_all("Upgrade"))


def to_response(resp: HttpResponse, head: bool) -> Response:
    """The websockets ``Response`` for a REST answer (no body for HEAD); one request per connection."""
    headers = Headers([("Date", email.utils.formatdate(usegmt=True)), ("Connection", "close")])
    if resp.content_type:
        headers["Content-Type"] = resp.content_type
    headers["Content-Length"] = str(len(resp.body))
    for name, value in resp.headers:
        headers[name] = value
    status = HTTPStatus(resp.status)
    return Response(status.value, status.phrase, headers, b"" if head else resp.body)
