"""Compact JWTs signed ES256 (VAPID, APNs provider tokens) or RS256 (Google's OAuth2 service-account grant)."""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding; raises ValueError on anything else."""
    if not isinstance(text, str) or not all(c.isalnum() or c in "-_=" for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))


def _signing_input(header: dict[str, Any], claims: dict[str, Any]) -> bytes:
    def part(value: dict[str, Any]) -> str:
        return b64url(json.dumps(value, separators=(",", ":")).encode())
    return f"{part(header)}.{part(claims)}".encode()


def es256(key: ec.EllipticCurvePrivateKey, claims: dict[str, Any], **header: str) -> str:
    """A JWT signed with ECDSA P-256 / SHA-256, the signature as raw r || s (RFC 7518 3.4)."""
    signing_input = _signing_input({"typ": "JWT", "alg": "ES256", **header}, claims)
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return f"{signing_input.decode()}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def rs256(key: rsa.RSAPrivateKey, claims: dict[str, Any], **header: str) -> str:
    """A JWT signed with RSASSA-PKCS1-v1_5 / SHA-256."""
    signing_input = _signing_input({"typ": "JWT", "alg": "RS256", **header}, claims)
    return f"{signing_input.decode()}.{b64url(key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256()))}"
