"""The Origin allow-list shared by CORS and WebSocket handshakes."""

from __future__ import annotations

import re
from typing import Iterable


class OriginPolicy:
    """``*`` allows any origin; ``http://localhost:*`` allows any port of that host."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allowed = tuple(allowed)
        self.any = "*" in self.allowed
        patterns = []
        for origin in self.allowed:
            if origin == "*":
                continue
            pattern = re.escape(origin.rstrip("/").lower()).replace(r"\*", r"[^/]*")
            patterns.append(pattern)
        self._pattern = re.compile("|".join(patterns)) if patterns else None

    def allows(self, origin: str | None) -> bool:
        """Requests without Origin (native apps, curl) are always let in."""
        if origin is None or self.any:
            return True
        return self._pattern is not None and self._pattern.fullmatch(origin.lower()) is not None

    def allow_header(self, origin: str | None) -> str | None:
        if origin is None:
            return "*" if self.any else None
        return ("*" if self.any else origin) if self.allows(origin) else None
