"""Apple Push Notification service: a background push over HTTP/2 (``h2`` on asyncio streams), authorised by
an ES256 provider token that is renewed every 40 minutes (Apple accepts one from 20 to 60 minutes old).

``h2`` is the HTTP/2 state machine of the python-hyper project, pure Python with no dependencies but its own
``hpack``/``hyperframe``: the smallest well-kept way to speak HTTP/2 (``httpx[http2]`` is built on it and
would add httpx, httpcore, anyio and sniffio). One connection per push: pushes are rare per device (one per
``[push] min_interval_s``); a long-lived connection would save a TLS handshake per push.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.events
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..storage.store import PushSubscription
from .http import Response
from .tokens import es256

TOKEN_LIFETIME_S = 40 * 60


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
        self.ssl_context = ssl_context
        self.ssl_context.set_alpn_protocols(["h2"])
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

    async def send(self, sub: PushSubscription, payload: dict[str, Any], collapse: str) -> Response:
        body = json.dumps({"aps": {"content-available": 1}, **payload}, separators=(",", ":")).encode()
        authority = self.host if self.port == 443 else f"{self.host}:{self.port}"
        headers = [(":method", "POST"), (":scheme", "https"), (":path", f"/3/device/{sub.target}"),
                   (":authority", authority), ("authorization", f"bearer {self.provider_token()}"),
                   ("apns-topic", self.topic), ("apns-push-type", "background"), ("apns-priority", "5"),
                   ("apns-collapse-id", collapse), ("apns-expiration", str(int(time.time()) + 86400)),
                   ("content-type", "application/json"), ("content-length", str(len(body)))]
        async with asyncio.timeout(self.timeout_s):
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl_context,
                                                           server_hostname=self.host)
            try:
                if writer.get_extra_info("ssl_object").selected_alpn_protocol() != "h2":
                    raise OSError("the APNs server did not agree to HTTP/2")
                return await self._exchange(reader, writer, headers, body)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        headers: list[tuple[str, str]], body: bytes) -> Response:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, headers)
        conn.send_data(stream, body, end_stream=True)
        writer.write(conn.data_to_send())
        response = Response(0)
        data = bytearray()
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                raise OSError("the APNs server closed the connection before answering")
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    for name, value in event.headers or []:
                        response.headers[str(name)] = str(value)
                    response.status = int(response.headers.get(":status", "0"))
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                    data += event.data[:max(0, self.max_bytes - len(data))]
                    conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                    raise OSError(f"the APNs server reset the stream ({event.error_code})")
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    response.body = bytes(data)
                    return response
                elif isinstance(event, h2.events.ConnectionTerminated):
                    raise OSError("the APNs server ended the connection")
            writer.write(conn.data_to_send())
            await writer.drain()
