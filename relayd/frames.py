"""Wire frames: JSON text in, validated values out, and compact JSON back.

No sockets here. The router calls these helpers so that every malformed
frame gets the same precise ``error`` answer.
"""

from __future__ import annotations

import json
import json.scanner
from typing import Any

from .addresses import normalize_address
from .errors import ErrorCode, RelayError

encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_string = json.encoder.encode_basestring  # the C escaper ``encode`` uses for str
_decoder = json.JSONDecoder()
_scan = json.scanner.make_scanner(_decoder)  # type: ignore[arg-type]  # typeshed types the context as a scanner


def _decode(text: str) -> Any:
    """``json.loads``: straight to its scanner for the usual frame (one value, no whitespace around it), which
    skips two Python layers and two regex matches on every frame; anything else goes the whole way, for its
    checks and error messages."""
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        return _decoder.decode(text)
    return value if end == len(text) else _decoder.decode(text)


def message_text(sender: str, content: str, message_id: str, timestamp: int, *, queued: bool) -> str:
    """The ``message`` frame a recipient gets, live or stored; the same text ``encode`` makes of it, faster.

    It is built on the hot path of every routed message, where ``encode``'s
    per-call set-up costs as much as the escaping itself.
    """
    return (f'{{"type":"message","from":{_string(sender)},"content":{_string(content)},'
            f'"messageId":{_string(message_id)},"timestamp":{int(timestamp)},'
            f'"queued":{"true" if queued else "false"}}}')


def answer_text(answer: str, message_id: str, to: str, timestamp: int) -> str:
    """A sender's ``delivered`` or ``queued`` frame, as ``message_text`` builds the message."""
    return (f'{{"type":{_string(answer)},"messageId":{_string(message_id)},"to":{_string(to)},'
            f'"timestamp":{int(timestamp)}}}')

MAX_MESSAGE_ID = 256


def utf8_len(text: str) -> int:
    """Byte length of ``text`` in UTF-8; free for the usual ASCII (base64) content."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def loads(raw: str | bytes) -> Any:
    """Parse JSON that relayd may later re-encode as UTF-8; ValueError otherwise.

    JSON can spell lone UTF-16 surrogates (``\\ud800``) that no UTF-8 text
    holds; such a value would fail only later, on the way out, so it is
    refused here.
    """
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw).decode("utf-8")
    try:
        value = _decode(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if "\\u" in raw:
        try:
            encode(value).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("JSON holds a lone UTF-16 surrogate") from None
    return value


def decode(raw: str | bytes) -> dict[str, Any]:
    """Parse one frame; raise ``invalid_json`` or ``invalid_frame``."""
    try:
        frame = loads(raw)
    except UnicodeDecodeError:
        raise RelayError(ErrorCode.INVALID_JSON, "Frame is not UTF-8 text") from None
    except ValueError:
        raise RelayError(ErrorCode.INVALID_JSON, "Frame is not valid JSON") from None
    if not isinstance(frame, dict):
        raise RelayError(ErrorCode.INVALID_FRAME, "Frame must be a JSON object")
    return frame


def message_id_of(frame: dict[str, Any]) -> Any:
    """The frame's messageId, echoed in errors only when it is a plain scalar."""
    mid = frame.get("messageId")
    return mid if isinstance(mid, (str, int)) and not isinstance(mid, bool) else None


def field_str(frame: dict[str, Any], name: str, *, max_len: int | None = None, message_id: Any = None,
              required: bool = True, allow_empty: bool = False) -> str | None:
    value = frame.get(name)
    if value is None:
        if required:
            raise RelayError(ErrorCode.MISSING_FIELD, f"Missing field: {name}", message_id=message_id)
        return None
    if not isinstance(value, str):
        raise RelayError(ErrorCode.INVALID_FIELD, f"Field {name} must be a string", message_id=message_id)
    if not value and not allow_empty:
        raise RelayError(ErrorCode.INVALID_FIELD, f"Field {name} must not be empty", message_id=message_id)
    if max_len is not None and utf8_len(value) > max_len:
        code = ErrorCode.MESSAGE_TOO_LARGE if name == "content" else ErrorCode.INVALID_FIELD
        raise RelayError(code, f"Field {name} is longer than {max_len} bytes", message_id=message_id)
    return value


def field_bool(frame: dict[str, Any], name: str, *, default: bool | None = None, message_id: Any = None) -> bool:
    value = frame.get(name, default)
    if value is None:
        raise RelayError(ErrorCode.MISSING_FIELD, f"Missing field: {name}", message_id=message_id)
    if not isinstance(value, bool):
        raise RelayError(ErrorCode.INVALID_FIELD, f"Field {name} must be true or false", message_id=message_id)
    return value


def field_timestamp(frame: dict[str, Any], name: str, *, message_id: Any = None) -> int | None:
    """An optional integer of milliseconds; the app drops messages with any other shape."""
    value = frame.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise RelayError(ErrorCode.INVALID_FIELD, f"Field {name} must be an integer of milliseconds",
                         message_id=message_id)
    if isinstance(value, float):
        if not value.is_integer():
            raise RelayError(ErrorCode.INVALID_FIELD, f"Field {name} must be an integer of milliseconds",
                             message_id=message_id)
        value = int(value)
    if not 0 <= value < 1 << 53:
        raise RelayError(ErrorCode.INVALID_FIELD, f"Field {name} is out of range", message_id=message_id)
    return value


def field_address(frame: dict[str, Any], name: str, *, message_id: Any = None) -> str:
    return normalize_address(frame.get(name), field=name, message_id=message_id)


def field_message_id(frame: dict[str, Any], *, name: str = "messageId") -> str:
    """messageIds are strings (uuid v4 from the app); the seed's script uses msg_<time>_<rand>."""
    value = frame.get(name)
    if value is None:
        raise RelayError(ErrorCode.MISSING_FIELD, f"Missing field: {name}")
    if not isinstance(value, str) or not value:
        raise RelayError(ErrorCode.INVALID_FIELD, f"Field {name} must be a non-empty string",
                         message_id=message_id_of(frame))
    if len(value) > MAX_MESSAGE_ID:
        raise RelayError(ErrorCode.INVALID_FIELD, f"Field {name} is longer than {MAX_MESSAGE_ID}")
    return value
