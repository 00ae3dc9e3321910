"""HTTP/1.1 request framing on the shared port: bodies that websockets' handshake parser does not read.

websockets parses the request line and headers of every request, but
refuses ``Content-Length`` other than 0 and any ``Transfer-Encoding``. The
``BodyReader`` sits under its parser: while the head is parsed it hides those
headers from it, and at the blank line that ends the head it reads a bounded
body (fixed length or chunked), so REST POSTs work on the same port.
"""

from __future__ import annotations

import re
from typing import Generator

from websockets.streams import StreamReader

from ..errors import ErrorCode

MAX_CHUNK_LINE = 128
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class RequestHead:
    """What BodyReader learnt from one request head; dropped once it is answered."""

    __slots__ = ("max_body", "length", "chunked", "body", "error", "upgrade", "done")

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.length: int | None = None
        self.chunked = False
        self.body = b""
        self.error: ErrorCode | None = None
        self.upgrade = False
        self.done = False

    def note_length(self, raw: bytes) -> None:
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0 or (self.length is not None and self.length != length):
            self.error = ErrorCode.BAD_REQUEST
        self.length = length


class BodyReader(StreamReader):
    """A StreamReader that consumes an HTTP request body after the headers.

    websockets' request parser refuses any ``Content-Length`` but 0 and any
    ``Transfer-Encoding``. While the head is parsed, this reader hides those
    headers from it and, at the blank line that ends the head, reads a
    bounded body (fixed length or chunked) so REST POSTs work on the same
    port. ``head.error`` records a body that must be refused.
    """

    def __init__(self, max_body: int) -> None:
        super().__init__()
        self.head: RequestHead | None = RequestHead(max_body)
        self.swallow = False

    def release(self) -> RequestHead:
        """Hand over the parsed head, so an open WebSocket does not keep it."""
        head, self.head = self.head, None
        assert head is not None and head.done
        return head

    def read_line(self, m: int, too_long_exc_type: type[Exception] = RuntimeError
                  ) -> Generator[None, None, bytearray]:
        line = yield from super().read_line(m, too_long_exc_type)
        head = self.head
        if head is None or head.done:
            return line
        while True:
            name, sep, value = bytes(line).partition(b":")
            lname = name.strip().lower()
            if sep and lname == b"content-length":
                head.note_length(value.strip())
            elif sep and lname == b"transfer-encoding":
                if value.strip().lower() == b"chunked":
                    head.chunked = True
                else:
                    head.error = ErrorCode.LENGTH_REQUIRED
            else:
                if sep and lname == b"upgrade" and value.strip().lower() == b"websocket":
                    head.upgrade = True
                break
            line = yield from super().read_line(m, too_long_exc_type)
        if line in (b"\r\n", b"\n"):
            head.done = True
            if head.error is None:
                yield from self._read_body(head)
            self.swallow = head.error is not None or not head.upgrade
        return line

    def read_exact(self, n: int) -> Generator[None, None, bytearray]:
        """After a REST request (one per connection) or a refused body, swallow
        whatever follows instead of parsing it as WebSocket frames."""
        if self.swallow:
            while True:
                self.discard()
                yield
        return (yield from super().read_exact(n))

    def _read_body(self, head: RequestHead) -> Generator[None, None, None]:
        if head.chunked and head.length is not None:
            head.error = ErrorCode.BAD_REQUEST
        elif head.chunked:
            parts, total = [], 0
            while True:
                size_line = yield from super().read_line(MAX_CHUNK_LINE, RuntimeError)
                digits = bytes(size_line).split(b";")[0].strip()
                if not _CHUNK_SIZE.fullmatch(digits):
                    head.error = ErrorCode.BAD_REQUEST
                    return
                size = int(digits, 16)
                total += size
                if total > head.max_body:
                    head.error = ErrorCode.PAYLOAD_TOO_LARGE
                    return
                if size == 0:
                    break
                chunk = yield from super().read_exact(size + 2)
                parts.append(bytes(chunk[:-2]))
            while (yield from super().read_line(MAX_CHUNK_LINE, RuntimeError)) not in (b"\r\n", b"\n"):
                pass
            head.body = b"".join(parts)
        elif head.length:
            if head.length > head.max_body:
                head.error = ErrorCode.PAYLOAD_TOO_LARGE
                return
            head.body = bytes((yield from super().read_exact(head.length)))
