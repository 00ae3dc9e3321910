"""Web Push: the payload encrypted to the device (RFC 8291, ``aes128gcm`` of RFC 8188) and signed for the push
service with VAPID (RFC 8292). The push service sees an opaque body, the relay's public key and its contact.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import ssl
import time
from typing import Any
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from ..storage.store import PushSubscription
from .http import Response, request
from .subscriptions import Endpoint, check_url, resolve
from .tokens import b64url, b64url_decode, es256

RECORD_SIZE = 4096
JWT_LIFETIME_S = 12 * 3600
"""RFC 8292: at most 24 hours; 12 leaves room for a push service's clock."""


class VapidKey:
    """The relay's P-256 application server key: signs VAPID tokens; its public half is the clients'
    ``applicationServerKey``."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, subject: str) -> None:
        self.private_key = private_key
        self.subject = subject
        raw = private_key.public_key().public_bytes(serialization.Encoding.X962,
                                                    serialization.PublicFormat.UncompressedPoint)
        self.public_key = b64url(raw)
        """base64url of the uncompressed point, as ``GET /api/push/vapid-public-key`` answers."""

    @classmethod
    def load_or_create(cls, path: str, subject: str) -> VapidKey:
        """Read a PEM P-256 key from ``path``; make one there (mode 0600) when the file does not exist."""
        file = Path(path)
        if not file.exists():
            file.parent.mkdir(parents=True, exist_ok=True)
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
            partial = file.with_name(f".{file.name}.{os.getpid()}")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(pem)
                os.fsync(out.fileno())
            try:
                os.link(partial, file)  # whoever links first made the key every instance uses
            except FileExistsError:
                pass
            finally:
                os.unlink(partial)
        loaded = serialization.load_pem_private_key(file.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name != "secp256r1":
            raise ValueError(f"{path} is not a P-256 private key")
        return cls(loaded, subject)

    def authorization(self, endpoint: Endpoint, now: float | None = None) -> str:
        """The ``Authorization: vapid t=..., k=...`` header value for a request to ``endpoint``."""
        claims = {"aud": endpoint.origin, "exp": int((now or time.time()) + JWT_LIFETIME_S), "sub": self.subject}
        return f"vapid t={es256(self.private_key, claims)}, k={self.public_key}"


def encrypt(plaintext: bytes, p256dh: str, auth: str, *, salt: bytes | None = None,
            sender_key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    """The ``aes128gcm`` body carrying ``plaintext`` to the subscription's keys (one record, RFC 8291 section 3)."""
    ua_public = b64url_decode(p256dh)
    auth_secret = b64url_decode(auth)
    salt = salt or os.urandom(16)
    sender_key = sender_key or ec.generate_private_key(ec.SECP256R1())
    as_public = sender_key.public_key().public_bytes(serialization.Encoding.X962,
                                                     serialization.PublicFormat.UncompressedPoint)
    ua_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), ua_public)
    ecdh_secret = sender_key.exchange(ec.ECDH(), ua_key)
    ikm = HKDF(hashes.SHA256(), 32, auth_secret, b"WebPush: info\0" + ua_public + as_public).derive(ecdh_secret)
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()  # HKDF-Extract
    cek = HKDFExpand(hashes.SHA256(), 16, b"Content-Encoding: aes128gcm\0").derive(prk)
    nonce = HKDFExpand(hashes.SHA256(), 12, b"Content-Encoding: nonce\0").derive(prk)
    if len(plaintext) + 1 + 16 > RECORD_SIZE:
        raise ValueError("a push payload fits one record")
    record = AESGCM(cek).encrypt(nonce, plaintext + b"\x02", None)
    header = salt + RECORD_SIZE.to_bytes(4, "big") + bytes([len(as_public)]) + as_public
    return header + record


class WebPush:
    """Sends encrypted wake-ups to Web Push endpoints (browsers, UnifiedPush distributors)."""

    name = "webpush"

    def __init__(self, vapid: VapidKey, *, allow_private: bool, ssl_context: ssl.SSLContext, timeout_s: float,
                 max_bytes: int) -> None:
        self.vapid = vapid
        self.allow_private = allow_private
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes

    def gone(self, answer: Response) -> bool:
        """RFC 8030: 404 or 410, the subscription expired or was unsubscribed."""
        return answer.status in (404, 410)

    async def close(self) -> None:
        """Nothing stays open: each push is one request on its own connection."""

    async def send(self, sub: PushSubscription, payload: dict[str, Any], collapse: str) -> Response:
        """The endpoint is checked again, and the request goes to the address that passed the check."""
        endpoint = check_url(sub.target, self.allow_private)
        address = await resolve(endpoint, self.allow_private, self.timeout_s)
        body = encrypt(json.dumps(payload, separators=(",", ":")).encode(), sub.p256dh, sub.auth)
        headers = [("Authorization", self.vapid.authorization(endpoint)), ("Content-Encoding", "aes128gcm"),
                   ("Content-Type", "application/octet-stream"), ("TTL", "86400"), ("Urgency", "high"),
                   ("Topic", collapse)]
        return await request("POST", endpoint, address, headers, body, ssl_context=self.ssl_context,
                             timeout_s=self.timeout_s, max_bytes=self.max_bytes)
