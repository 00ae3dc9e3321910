"""The operator's deny list (``[access] deny``): client IPs, networks and Idena addresses the relay refuses.

Shared by the port (IPs: every request and upgrade, before anything else)
and sign-in (addresses: WebSocket sign-ins and key writes). Reloadable with
SIGHUP: sessions that the new list denies are closed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .addresses import is_address
from .errors import ErrorCode, RelayError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_entry(entry: str) -> Network | str:
    """One entry: an IP network (a bare IP is a /32 or /128) or a lower-cased address; ValueError otherwise."""
    if is_address(entry):
        return entry.lower()
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        raise ValueError(f"{entry!r} is not an IP address, a network (CIDR) or an Idena address") from None


class DenyList:
    """Answers "is this client IP / this address denied?" with a set lookup per distinct prefix length, so a
    long list costs no more per request than a few networks."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.networks: list[Network] = []
        self.addresses: set[str] = set()
        self._prefixes: dict[int, dict[int, set[int]]] = {4: {}, 6: {}}
        """IP version -> prefix length -> the networks' leading bits."""
        for entry in entries:
            parsed = parse_entry(entry)
            if isinstance(parsed, str):
                self.addresses.add(parsed)
            else:
                self.networks.append(parsed)
                shift = parsed.max_prefixlen - parsed.prefixlen
                self._prefixes[parsed.version].setdefault(parsed.prefixlen, set()).add(
                    int(parsed.network_address) >> shift)

    def __bool__(self) -> bool:
        return bool(self.networks or self.addresses)

    def denies_ip(self, ip: str) -> bool:
        if not self.networks:
            return False
        try:
            parsed = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
            parsed = parsed.ipv4_mapped  # an IPv4 client on a dual-stack socket
        value, bits = int(parsed), parsed.max_prefixlen
        return any(value >> (bits - length) in leading
                   for length, leading in self._prefixes[parsed.version].items())

    def denies_address(self, address: str) -> bool:
        return address.lower() in self.addresses


def denied(what: str) -> RelayError:
    """The refusal a denied client gets: HTTP 403, or a WebSocket error frame and close 4003."""
    return RelayError(ErrorCode.ACCESS_DENIED, f"Access denied: this relay's operator refuses this {what}")
