"""Which client a request comes from, for limits: the socket peer, or the
right-most untrusted X-Forwarded-For hop when the peer is a trusted proxy."""

from __future__ import annotations

import ipaddress
from typing import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientIpResolver:
    def __init__(self, trusted: Iterable[str]) -> None:
        self.trusted: tuple[Network, ...] = tuple(ipaddress.ip_network(t, strict=False) for t in trusted)

    def is_trusted(self, ip: str) -> bool:
        """Whether ``ip`` is a configured proxy, whose X-Forwarded-For names the client."""
        if not self.trusted:
            return False
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.trusted)

    def resolve(self, peer: str, forwarded_for: str | None) -> str:
        if not forwarded_for or not self.is_trusted(peer):
            return peer
        hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
        for hop in reversed(hops):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return peer
            if not self.is_trusted(hop):
                return hop
        return hops[0] if hops else peer
