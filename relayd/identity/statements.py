"""The exact texts clients sign, and the key format a signed statement may carry.

The relay rebuilds these texts from its own records, never from the client's
words, so a signature can only ever prove what the relay meant.
"""

from __future__ import annotations

import base64
import binascii


def auth_statement(relay: str, address: str, nonce: str, issued: int) -> str:
    """The text a client signs to open a session (LF-separated, no trailing newline)."""
    return f"Idena relay auth v1\nrelay: {relay}\naddress: {address}\nnonce: {nonce}\nissued: {issued}"


def key_statement(address: str, key_type: str, public_key: str, issued: int) -> str:
    """The text a client signs to publish its encryption key."""
    return (f"Idena relay key v1\naddress: {address}\nkey_type: {key_type}\n"
            f"public_key: {public_key}\nissued: {issued}")


def canonical_x25519(public_key: str) -> bool:
    """True for canonical standard base64 of exactly 32 bytes (one spelling per key)."""
    try:
        raw = base64.b64decode(public_key, validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw) == 32 and base64.b64encode(raw).decode() == public_key
