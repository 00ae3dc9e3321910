"""Bearer tokens for the REST API: opaque, random, each bound to one address until it expires."""

from __future__ import annotations

import secrets

MAX_TOKENS_PER_ADDRESS = 16


class Tokens:
    """Tokens in memory, on the monotonic clock; the oldest of an address goes past 16."""

    def __init__(self) -> None:
        self._tokens: dict[str, tuple[str, float]] = {}
        self._by_address: dict[str, list[str]] = {}

    def issue(self, address: str, ttl_s: float, now: float) -> str:
        """A new token for ``address``, valid until ``now + ttl_s``."""
        token = secrets.token_urlsafe(32)
        self._tokens[token] = (address, now + ttl_s)
        owned = self._by_address.setdefault(address, [])
        owned.append(token)
        if len(owned) > MAX_TOKENS_PER_ADDRESS:
            self._tokens.pop(owned.pop(0), None)
        return token

    def address_of(self, token: str, now: float) -> str | None:
        """The address a live token is bound to; None for unknown or expired tokens."""
        entry = self._tokens.get(token)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def sweep(self, now: float) -> None:
        """Forget expired tokens so memory follows live tokens only."""
        for token, (address, expires) in list(self._tokens.items()):
            if expires <= now:
                del self._tokens[token]
                owned = self._by_address.get(address)
                if owned is not None:
                    owned.remove(token)
                    if not owned:
                        del self._by_address[address]
