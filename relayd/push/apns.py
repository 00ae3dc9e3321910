"""Apple Push Notification service: a background push over HTTP/2 (``h2`` on asyncio streams), authorised by
an ES256 provider token that is renewed every 40 minutes (Apple accepts one from 20 to 60 minutes old).

``h2`` is the HTTP/2 state machine of the python-hyper project, pure Python with no dependencies but its own
``hpack``/``hyperframe``: the smallest well-kept way to speak HTTP/2 (``httpx[http2]`` is built on it and
would add httpx, httpcore, anyio and sniffio). As Apple asks, pushes share one connection (``http2``), kept
open while pushes keep coming and closed after ``CONNECTION_IDLE_S`` without one: a busy relay pays one TLS
handshake, not one per push.
"""

from __future__ import annotations

import json
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..storage.store import PushSubscription
from .http import Response
from .http2 import Http2Client
from .tokens import es256

TOKEN_LIFETIME_S = 40 * 60
CONNECTION_IDLE_S = 300.0
"""An APNs connection unused this long is closed (the next push opens a new one)."""


def load_key(path: str) -> ec.EllipticCurvePrivateKey:
    """The .p8 authentication key (PEM PKCS#8, P-256); raises ValueError."""
    with open(path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC private key")
    return key


class Apns:
    """Sends background pushes to one app (``topic``)."""

    name = "apns"

    def __init__(self, key: ec.EllipticCurvePrivateKey, key_id: str, team_id: str, topic: str, base_url: str, *,
                 ssl_context: ssl.SSLContext, timeout_s: float, max_bytes: int) -> None:
        self.key = key
        self.key_id = key_id
        self.team_id = team_id
        self.topic = topic
        url = urlsplit(base_url)
        self.host = url.hostname or ""
        self.port = url.port or 443
        self.client = Http2Client(self.host, self.port, ssl_context, idle_s=CONNECTION_IDLE_S)
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self._token = ""
        self._token_at = 0.0

    def provider_token(self) -> str:
        now = time.time()
        if not self._token or now - self._token_at > TOKEN_LIFETIME_S:
            self._token = es256(self.key, {"iss": self.team_id, "iat": int(now)}, kid=self.key_id)
            self._token_at = now
        return self._token

    def gone(self, answer: Response) -> bool:
        """410 ``Unregistered``: the token is no longer active for the topic. (A 404 is a bad path, and a 400
        ``BadDeviceToken`` may be a token of the other environment: neither says the device is gone.)"""
        return answer.status == 410

    async def send(self, sub: PushSubscription, payload: dict[str, Any], collapse: str) -> Response:
        body = json.dumps({"aps": {"content-available": 1}, **payload}, separators=(",", ":")).encode()
        authority = self.host if self.port == 443 else f"{self.host}:{self.port}"
        headers = [(":method", "POST"), (":scheme", "https"), (":path", f"/3/device/{sub.target}"),
                   (":authority", authority), ("authorization", f"bearer {self.provider_token()}"),
                   ("apns-topic", self.topic), ("apns-push-type", "background"), ("apns-priority", "5"),
                   ("apns-collapse-id", collapse), ("apns-expiration", str(int(time.time()) + 86400)),
                   ("content-type", "application/json"), ("content-length", str(len(body)))]
        return await self.client.request(headers, body, timeout_s=self.timeout_s, max_bytes=self.max_bytes)

    async def close(self) -> None:
        await self.client.close()
