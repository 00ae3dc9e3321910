"""Where the port listens: ``[server] host`` as a list of hosts, with ``::`` meaning IPv6 and IPv4 together.

asyncio marks every IPv6 listening socket IPv6-only, so ``::`` alone would
refuse IPv4 clients (phones on IPv4 would retry for ever). ``::`` alone is
therefore one dual-stack socket made here; ``::`` among other hosts also
listens on ``0.0.0.0``.
"""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass

from ..config.schema import ALL_IPV4, ALL_IPV6, listen_hosts

log = logging.getLogger("relayd.server")

@dataclass(frozen=True)
class ListenPlan:
    """Either one socket made here (``sock``) or hosts for asyncio to bind (``hosts``), on ``port``."""

    hosts: tuple[str, ...]
    port: int
    sock: socket.socket | None = None


def plan(hosts: tuple[str, ...], port: int) -> ListenPlan:
    """What to listen on; opens the dual-stack socket for ``::`` alone (raises OSError like a bind)."""
    if hosts == (ALL_IPV6,):
        sock = dual_stack_socket(port)
        if sock is not None:
            return ListenPlan(hosts, port, sock)
        log.warning("IPv6 is not available on this machine: [server] host = :: listens on 0.0.0.0 (IPv4) only")
        return ListenPlan((ALL_IPV4,), port)
    return ListenPlan(listen_hosts(hosts), port)


def dual_stack_socket(port: int) -> socket.socket | None:
    """A bound ``[::]:port`` socket that accepts IPv4 too (IPV6_V6ONLY off); None without IPv6."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError as exc:
        if exc.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
            return None
        raise
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((ALL_IPV6, port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRNOTAVAIL:
            return None
        raise
    return sock
