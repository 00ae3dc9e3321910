"""How much an asyncio socket transport reads at a time, for every connection relayd reads from.

asyncio's selector transports read into a fresh ``bytes`` of ``max_size``
(256 KiB) each time. glibc serves a block that large with mmap, shrinks it
with mremap to what arrived and unmaps it with munmap when it is freed: three
system calls and fresh page faults per read, until some block over its
threshold (128 KiB) happens to be freed whole, which raises the threshold for
the rest of the process. Which process that happens in depends on its history:
a relay that had served only sign-ins and REST requests paid it on every read
(bench/results/2026-12-08-read-size.txt). A read of ``READ_SIZE`` comes from
the heap. uvloop reads into one buffer of its own, and TLS through its
protocol's, so their transports are left as they are.
"""

from __future__ import annotations

import asyncio

READ_SIZE = 64 * 1024
_MAX_SIZE = "max_size"


def read_from_heap(transport: asyncio.BaseTransport) -> None:
    """Make a selector socket transport read at most ``READ_SIZE`` at a time (a no-op for other transports)."""
    if type(getattr(transport, _MAX_SIZE, None)) is int:
        setattr(transport, _MAX_SIZE, READ_SIZE)
