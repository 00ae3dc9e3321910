"""What a client may register for pushes, and which endpoint URLs relayd will ever send to.

A Web Push endpoint is an untrusted URL: relayd must not become a way to reach its own network. Only
``https:`` URLs are accepted and, unless ``[push] allow_private_endpoints``, only on public addresses: checked
when subscribing and again, on the addresses DNS answers, right before each send (the request then goes to
the address that was checked, so a name that re-resolves to 127.0.0.1 gets nowhere).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
import string
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import ErrorCode, RelayError
from .tokens import b64url, b64url_decode

PROVIDERS = ("webpush", "fcm", "apns")
MAX_ENDPOINT_CHARS = 2048
MAX_TOKEN_CHARS = 4096
_FCM_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "-_:.")
_HEX = frozenset(string.hexdigits)


@dataclass(frozen=True, slots=True)
class SubscriptionRequest:
    """A parsed ``push_subscribe`` frame: the provider, its target (endpoint URL or token) and Web Push keys."""

    provider: str
    target: str
    p256dh: str = ""
    auth: str = ""


def _invalid(message: str) -> RelayError:
    return RelayError(ErrorCode.INVALID_SUBSCRIPTION, message)


def parse_request(frame: dict[str, Any]) -> SubscriptionRequest:
    """Parse ``push_subscribe``: a W3C ``PushSubscription`` JSON, or ``provider`` fcm/apns with a ``token``."""
    provider = frame.get("provider", "webpush")
    if provider not in PROVIDERS:
        raise _invalid(f"provider must be one of {', '.join(PROVIDERS)}")
    if provider != "webpush":
        token = frame.get("token")
        if not isinstance(token, str) or not token:
            raise RelayError(ErrorCode.MISSING_FIELD, "Missing field: token")
        if len(token) > MAX_TOKEN_CHARS:
            raise _invalid("token is too long")
        if provider == "apns" and not (16 <= len(token) <= 400 and set(token) <= _HEX):
            raise _invalid("An APNs device token is hexadecimal")
        if provider == "fcm" and not set(token) <= _FCM_TOKEN_CHARS:
            raise _invalid("An FCM registration token has letters, digits and -_:. only")
        return SubscriptionRequest(provider, token.lower() if provider == "apns" else token)
    sub = frame.get("subscription")
    if not isinstance(sub, dict):
        raise RelayError(ErrorCode.MISSING_FIELD, "Missing field: subscription (a PushSubscription JSON object)")
    endpoint, keys = sub.get("endpoint"), sub.get("keys")
    if not isinstance(endpoint, str) or not endpoint:
        raise _invalid("subscription.endpoint must be a URL")
    if not isinstance(keys, dict):
        raise _invalid("subscription.keys must hold p256dh and auth")
    p256dh, auth = keys.get("p256dh"), keys.get("auth")
    try:
        point = b64url_decode(p256dh) if isinstance(p256dh, str) else b""
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        if len(point) != 65:
            raise ValueError("compressed")
    except ValueError:
        raise _invalid("subscription.keys.p256dh must be an uncompressed P-256 point in base64url") from None
    try:
        secret = b64url_decode(auth) if isinstance(auth, str) else b""
    except ValueError:
        secret = b""
    if len(secret) != 16:
        raise _invalid("subscription.keys.auth must be 16 bytes in base64url")
    return SubscriptionRequest("webpush", endpoint, b64url(point), b64url(secret))


def subscription_id(address: str, provider: str, target: str) -> str:
    """The same device subscribing again gets the same id (and replaces its subscription)."""
    return b64url(hashlib.sha256(f"{address}\0{provider}\0{target}".encode()).digest()[:16])


def is_public(ip: str) -> bool:
    """Whether ``ip`` is a globally routable unicast address (not loopback, private, link-local, CGNAT,
    metadata, multicast or reserved; an IPv4-mapped IPv6 address counts as its IPv4 address)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A checked endpoint URL, split for the HTTP client."""

    scheme: str
    host: str
    port: int
    path: str

    @property
    def origin(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}" + ("" if self.port == default else f":{self.port}")


def check_url(url: str, allow_private: bool) -> Endpoint:
    """The endpoint of ``url``, or ``endpoint_not_allowed``: https only (http too with ``allow_private``), no
    credentials, an IP literal must be public unless ``allow_private``."""
    if len(url) > MAX_ENDPOINT_CHARS:
        raise RelayError(ErrorCode.ENDPOINT_NOT_ALLOWED, "The endpoint URL is too long")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise RelayError(ErrorCode.ENDPOINT_NOT_ALLOWED, "The endpoint is not a valid URL") from None
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in schemes:
        raise RelayError(ErrorCode.ENDPOINT_NOT_ALLOWED, "The endpoint must be an https: URL")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise RelayError(ErrorCode.ENDPOINT_NOT_ALLOWED, "The endpoint must name a host and no credentials")
    if any(c in url for c in " \r\n\t\\"):
        raise RelayError(ErrorCode.ENDPOINT_NOT_ALLOWED, "The endpoint URL has characters URLs never have")
    host = parts.hostname
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None and not allow_private and not is_public(host):
        raise RelayError(ErrorCode.ENDPOINT_NOT_ALLOWED, "The endpoint's address is not public")
    name = host.rstrip(".")
    if literal is None and not allow_private and (name == "localhost" or name.endswith((".localhost", ".local",
                                                                                          ".internal"))):
        raise RelayError(ErrorCode.ENDPOINT_NOT_ALLOWED, "The endpoint's host is not public")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Endpoint(parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path)


async def resolve(endpoint: Endpoint, allow_private: bool, timeout_s: float) -> str:
    """The address to connect to: the first DNS answer, once every answer is public (unless ``allow_private``).

    Raises ``RelayError(endpoint_not_allowed)`` when a name resolves to a non-public address, and ``OSError``
    when it does not resolve."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        infos = await loop.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise OSError(f"{endpoint.host} has no address")
    if not allow_private and not all(is_public(a) for a in addresses):
        raise RelayError(ErrorCode.ENDPOINT_NOT_ALLOWED, "The endpoint's name resolves to a non-public address")
    return addresses[0]
