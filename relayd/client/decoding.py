"""JSON from a relay, parsed with a limit on nesting and a precise reason when it is not valid."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

from .display import shown
from .errors import ProtocolViolation

MAX_JSON_DEPTH = 64
# Parsed JSON takes far more memory than its text when the text is dense with values (``[{},{},...]`` is ~30
# times larger as Python objects). A relay's frames and answers have about one value per 11 bytes at most (a
# listing of one-character messages with short ids, counting every bracket, comma and colon); denser text is
# refused, which bounds what parsing can cost to about ten times the text.
BYTES_PER_VALUE = 8
VALUES_ALWAYS_ALLOWED = 1000
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_DEPTH_STEP = bytes.maketrans(b"[{]}", bytes([1, 1, 255, 255]))  # +1 and -1 as signed bytes
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def _depth(text: str) -> int:
    """The deepest nesting of the brackets in ``text`` (inside strings too)."""
    steps = memoryview(text.encode("utf-8", "surrogatepass").translate(_DEPTH_STEP, _NOT_BRACKET)).cast("b")
    return max(itertools.accumulate(steps), default=0)


def _shape_problem(text: str) -> str | None:
    """Why ``text`` is too deep or too dense to parse, or None.

    Checked before parsing, at C speed: the standard parser would recurse
    once per level (a RecursionError deep in it, or a value too deep for the
    code that uses it) and allocate every value. The counts first include
    what is inside strings; only text that fails them is counted again with
    its strings left out (at most ``max_values`` of them, or it is refused).
    """
    max_values = VALUES_ALWAYS_ALLOWED + len(text) // BYTES_PER_VALUE
    too_many = f"too many values (more than {max_values} in {len(text)} characters)"
    opens = text.count("[") + text.count("{")
    deep = opens > MAX_JSON_DEPTH and _depth(text) > MAX_JSON_DEPTH
    dense = opens + text.count(",") + text.count(":") > max_values
    if not (deep or dense):
        return None
    if (text.count('"') - text.count('\\"')) // 2 > max_values:
        return too_many  # that many strings alone
    structure = _STRING.sub("", text)
    if deep and _depth(structure) > MAX_JSON_DEPTH:
        return f"nesting too deep (more than {MAX_JSON_DEPTH} levels)"
    if dense and sum(structure.count(c) for c in "[{,:") > max_values:
        return too_many
    return None


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
    problem = _shape_problem(text)
    if problem is not None:
        raise ProtocolViolation(f"{prefix}: {problem}")
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
