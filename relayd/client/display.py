"""Text from a relay made safe to show: cut to a length and with every control character escaped.

A relay is not trusted: its error messages, close reasons and frames may be
megabytes long or carry terminal escape sequences. Everything of the relay's
that goes into an error message passes through ``shown``; the CLI passes
whole lines through ``terminal_line`` before printing them.
"""

from __future__ import annotations

import json
import re

SHOWN_CHARS = 200
LINE_CHARS = 1000

# C0 and C1 controls (ESC, CSI, BEL, ...), DEL, lone surrogates (unprintable as UTF-8), and the invisible
# format characters that reorder or hide text (bidi overrides, zero-width marks, line/paragraph separators).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escaped(text: str) -> str:
    """``text`` on one line with control and invisible format characters written as ``\\x1b``, ``\\u202e``."""
    return _UNSAFE.sub(_escape, text)


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``value`` (bytes are decoded leniently) cut to ``limit`` characters and escaped.

    A cut says how much was left out, so a reader knows the text was longer.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value[:limit * 4])  # a character is at most 4 bytes of UTF-8
        text = raw.decode("utf-8", "replace")
        total = len(value)
        more = f"... ({total} bytes in all)" if len(text) > limit or total > len(raw) else ""
    else:
        text = value if isinstance(value, str) else str(value)
        total = len(text)
        more = f"... ({total} characters in all)" if total > limit else ""
    return escaped(text[:limit]) + more


def terminal_line(line: str, limit: int = LINE_CHARS) -> str:
    """One line of output safe for a terminal: escaped, and cut at ``limit`` characters."""
    return shown(line, limit)


def json_line(value: object) -> str:
    """``value`` as one line of JSON that is safe for a terminal and still the same JSON.

    ``json.dumps`` escapes C0 controls; C1 controls, invisible format
    characters and lone surrogates stay raw with ``ensure_ascii=False`` and
    are written as ``\\uXXXX`` here (they can only occur inside strings).
    """
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, ensure_ascii=False))
