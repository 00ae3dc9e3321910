"""What relayd needs from asyncio's own transports beyond their public API: one cycle cut when a connection ends.

asyncio's selector transports keep their read callback as a bound method of
themselves (``_SelectorSocketTransport._read_ready_cb``), so a closed one
stays in a reference cycle until the garbage collector's next full pass;
uvloop's transports hold no such cycle. Cut at ``connection_lost`` (nothing
reads after it), a closed plain connection is freed by reference counting on
either loop, which lets ``relayd.ops.collector`` freeze live objects on
asyncio too. A TLS transport (asyncio's ``sslproto``) keeps cycles of its
own; ``freezes_safely`` says so. Tripwire:
``tests/test_memory_bounds.py::test_a_closed_connection_is_freed_without_the_garbage_collector``.
"""

from __future__ import annotations

import asyncio

_READ_CALLBACK = "_read_ready_cb"


def release(transport: asyncio.BaseTransport) -> None:
    """Drop a closed selector transport's bound method of itself (a no-op for other transports)."""
    if getattr(transport, _READ_CALLBACK, None) is not None:
        setattr(transport, _READ_CALLBACK, None)


def freezes_safely(loop: asyncio.AbstractEventLoop, tls: bool) -> bool:
    """Whether a closed connection's transport is freed without the collector on ``loop``: uvloop's always,
    asyncio's selector transports once ``release``d, but not behind TLS."""
    if type(loop).__module__.startswith("uvloop"):
        return True
    return not tls and isinstance(loop, asyncio.SelectorEventLoop)
