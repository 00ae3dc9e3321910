"""Idena addresses: ``0x`` + 40 hex digits, compared case-insensitively."""

from __future__ import annotations

import re
from typing import Any

from .errors import ErrorCode, RelayError

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


def is_address(value: Any) -> bool:
    return isinstance(value, str) and _ADDRESS.fullmatch(value) is not None


def normalize_address(value: Any, *, field: str = "address", message_id: Any = None) -> str:
    """Return the lower-cased address or raise ``invalid_address``.

    EIP-55 mixed case is accepted; relayd always reports the lower-case form.
    """
    if value is None:
        raise RelayError(ErrorCode.MISSING_FIELD, f"Missing field: {field}", message_id=message_id)
    if not is_address(value):
        raise RelayError(
            ErrorCode.INVALID_ADDRESS,
            f"Invalid Idena address format in {field}: expected 0x followed by 40 hex digits",
            message_id=message_id,
        )
    return value.lower()
