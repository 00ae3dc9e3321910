"""Bearer tokens for the REST API: opaque and random; the store keeps only their hash, with address and expiry."""

from __future__ import annotations

import hashlib
import secrets


def new_token() -> str:
    """A fresh bearer token (256 random bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the store keeps of a token, so that a copy of the database opens no REST route."""
    return hashlib.sha256(token.encode()).hexdigest()
