"""JSON from a relay, parsed with a limit on nesting and a precise reason when it is not valid."""

from __future__ import annotations

import json
import re
from typing import Any

from .display import shown
from .errors import ProtocolViolation

MAX_JSON_DEPTH = 64
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)


def _too_deep(text: str) -> bool:
    """Whether ``text`` opens more than ``MAX_JSON_DEPTH`` arrays or objects inside each other.

    Counted before parsing: the standard parser would recurse once per level
    (a RecursionError deep inside it, or a parsed value too deep for the code
    that uses it). Brackets inside strings do not count.
    """
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return False
    depth = 0
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif token in "]}":
            depth -= 1
    return False


def parse_json(raw: str | bytes, what: str = "the relay") -> Any:
    """The value of ``raw``; raises ProtocolViolation("invalid JSON from the relay: <reason>")."""
    prefix = f"invalid JSON from {what}"
    if isinstance(raw, (bytes, bytearray)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolViolation(f"{prefix}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    else:
        text = raw
    if _too_deep(text):
        raise ProtocolViolation(f"{prefix}: nesting too deep (more than {MAX_JSON_DEPTH} levels)")
    try:
        return json.loads(text)
    except RecursionError:
        raise ProtocolViolation(f"{prefix}: nesting too deep") from None
    except json.JSONDecodeError as exc:
        raise ProtocolViolation(f"{prefix}: {exc.msg} at line {exc.lineno} column {exc.colno}: "
                                f"{shown(text, 100)}") from None
    except ValueError as exc:  # e.g. an integer longer than int() converts
        raise ProtocolViolation(f"{prefix}: {shown(exc, 100)}") from None


def parse_object(raw: str | bytes, what: str = "the relay") -> dict[str, Any]:
    """``parse_json`` that must give a JSON object (every frame of the protocol is one)."""
    value = parse_json(raw, what)
    if not isinstance(value, dict):
        raise ProtocolViolation(f"{what} sent JSON that is not an object: {shown(raw, 100)}")
    return value
