"""Outgoing WebSocket frames: built once for every recipient, and tracked until the peer's TCP stack has them.

``text_frame`` encodes a text frame once however many sessions it fans out
to. ``SentBytes`` knows, for one connection, the byte offset at which each
tracked message's frame ends; the kernel's count of written bytes the peer
has not acknowledged (``TIOCOUTQ``) then tells which messages reached the
peer and which a dying connection must hand back to be stored again.
"""

from __future__ import annotations

import bisect
import fcntl
import operator
import struct
import termios
from asyncio import WriteTransport
from typing import Protocol

COALESCE_BYTES = 64 * 1024
"""Frames pushed while one received chunk is applied (or in one loop iteration) are written together, or at once
past this size."""
NEVER_WRITTEN = 1 << 62
"""The end offset of a message whose frame was never written: never acknowledged."""
PRUNE_AFTER = 256
"""Tracked deliveries kept before asking the kernel how much the peer acknowledged."""
_OUTQ = struct.Struct("i")
_SHORT, _MEDIUM, _LONG = struct.Struct("!BB"), struct.Struct("!BBH"), struct.Struct("!BBQ")

_END = operator.itemgetter(0)
_last: tuple[str | None, bytes] = (None, b"")


def text_frame(text: str) -> bytes:
    """``text`` as one unmasked WebSocket text frame (RFC 6455 5.2); fan-out reuses the last one built.

    The header is packed here rather than by ``websockets.frames.Frame``,
    whose checks and extension hooks cost more than the routing of a
    message; ``tests/test_websockets_compat.py`` checks both give the same
    bytes.
    """
    global _last
    last = _last
    if last[0] is text:
        return last[1]
    data = text.encode()
    n = len(data)
    if n < 126:
        frame = _SHORT.pack(0x81, n) + data
    elif n < 65536:
        frame = _MEDIUM.pack(0x81, 126, n) + data
    else:
        frame = _LONG.pack(0x81, 127, n) + data
    _last = (text, frame)
    return frame


class Flushable(Protocol):
    """A connection that queues frames and writes them in one go (``RelayConnection``)."""

    def flush(self) -> None: ...


_batch: list[Flushable] | None = None


def begin_batch() -> bool:
    """Start collecting the connections that queue frames while one received chunk is applied.

    Returns True when this call opened the batch (the caller then ends it);
    nested calls join the open one.
    """
    global _batch
    if _batch is not None:
        return False
    _batch = []
    return True


def end_batch() -> None:
    """Write the frames every connection of the batch queued, one write per connection."""
    global _batch
    batch, _batch = _batch, None
    for conn in batch or ():
        conn.flush()


def defer_flush(conn: Flushable) -> bool:
    """Add ``conn`` to the open batch; False when none is open (the caller flushes on the next loop turn)."""
    if _batch is None:
        return False
    _batch.append(conn)
    return True


class SentBytes:
    """What one connection wrote, how much of it the peer acknowledged, and the messages still in between.

    ``transport`` is the connection's asyncio transport. With TLS the record
    layer hides the mapping from frames to bytes: what left the transport's
    buffer counts as acknowledged.
    """

    __slots__ = ("_parcels", "_prune_at", "_seen", "stalled_since", "transport", "written")

    def __init__(self, transport: WriteTransport) -> None:
        self.transport = transport
        self.written = 0
        self.stalled_since: float | None = None
        self._seen = 0
        self._parcels: list[tuple[int, object]] | None = None
        """By end offset, ascending (frames are written in order)."""
        self._prune_at = PRUNE_AFTER

    def track(self, end: int, parcel: object) -> None:
        """``parcel``'s frame ends at byte ``end`` of the connection's output."""
        if self._parcels is None:
            self._parcels = [(end, parcel)]
        else:
            self._parcels.append((end, parcel))

    def wrote(self, n: int) -> None:
        """``n`` more bytes went to the transport (every byte written must be counted: the kernel's count of
        unacknowledged bytes is set against the total); every ``PRUNE_AFTER`` tracked messages, forget acknowledged
        ones (one system call, however slowly the peer acknowledges)."""
        self.written += n
        if self._parcels is not None and len(self._parcels) > self._prune_at:
            self.prune()
            self._prune_at = len(self._parcels) + PRUNE_AFTER

    def acked(self) -> int:
        """Bytes of this connection's output the peer has acknowledged, as far as can be told."""
        transport = self.transport
        sent = self.written - transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        if sock is None or transport.get_extra_info("sslcontext") is not None:
            return sent
        try:
            unacked = _OUTQ.unpack(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            return 0
        return sent - unacked

    def prune(self) -> None:
        """Forget the tracked messages the peer has acknowledged."""
        parcels = self._parcels
        if not parcels:
            return
        del parcels[:bisect.bisect_right(parcels, self.acked(), key=_END)]

    def stalled(self, now: float) -> float:
        """For how long the peer has taken none of the bytes on their way to it (0 while it takes some)."""
        if self._seen >= self.written:
            return 0.0
        acked = self.acked()
        if acked > self._seen:
            self._seen, self.stalled_since = acked, None
            return 0.0
        if self.stalled_since is None:
            self.stalled_since = now
        return now - self.stalled_since

    def release(self) -> list[object]:
        """The tracked messages the peer never acknowledged; tracking ends."""
        parcels, self._parcels = self._parcels, None
        if not parcels:
            return []
        acked = self.acked()
        return [parcel for end, parcel in parcels if end > acked]

    @property
    def settled(self) -> bool:
        """Every byte written was seen acknowledged and no message is tracked: nothing to check or prune."""
        return self._seen >= self.written and not self._parcels

    @property
    def tracking(self) -> bool:
        return bool(self._parcels)
