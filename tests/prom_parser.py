"""Strict parser for the Prometheus text exposition format 0.0.4.

Meant for tests: it rejects everything Prometheus rejects, and on purpose
also a few things Prometheus tolerates but relayd never emits (blank lines,
runs of whitespace, comments not starting with "# ", HELP/TYPE after a
family's samples, a family's lines split across the output, histogram
buckets out of order).
"""

from __future__ import annotations

import math
import re

__all__ = ["ParseError", "parse"]

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_NAME_RE = re.compile(_NAME)
_FULL_NAME_RE = re.compile(_NAME + r"\Z")
_LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_FLOAT_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\Z")
_INT_RE = re.compile(r"-?\d+\Z")
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
_SUFFIXES = {
    "counter": ("",),
    "gauge": ("",),
    "untyped": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}
_HELP_ESCAPES = {"\\": "\\", "n": "\n"}
_LABEL_ESCAPES = {"\\": "\\", "n": "\n", '"': '"'}


class ParseError(ValueError):
    pass


def _value(text: str, where: str) -> float:
    if text == "NaN":
        return math.nan
    if text == "+Inf":
        return math.inf
    if text == "-Inf":
        return -math.inf
    if not _FLOAT_RE.match(text):
        raise ParseError(f"{where}: bad value {text!r}")
    return float(text)


def _unescape(text: str, allowed: dict[str, str], where: str) -> str:
    out = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            nxt = text[i + 1 : i + 2]
            if nxt not in allowed:
                raise ParseError(f"{where}: bad escape \\{nxt}")
            out.append(allowed[nxt])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _labels(line: str, pos: int, where: str) -> tuple[dict[str, str], int]:
    """Parse ``{a="b",...}`` starting at line[pos] == '{'; return (labels, end)."""
    labels: dict[str, str] = {}
    pos += 1
    while not line.startswith("}", pos):
        m = _LABEL_NAME_RE.match(line, pos)
        if not m:
            raise ParseError(f"{where}: bad label name at column {pos}")
        name = m.group()
        if name in labels:
            raise ParseError(f"{where}: duplicate label {name!r}")
        if name.startswith("__"):
            raise ParseError(f"{where}: reserved label name {name!r}")
        pos = m.end()
        if not line.startswith('="', pos):
            raise ParseError(f"{where}: expected =\" after label {name!r}")
        pos += 2
        start = pos
        while True:
            if pos >= len(line):
                raise ParseError(f"{where}: unterminated label value")
            if line[pos] == "\\":
                pos += 2
            elif line[pos] == '"':
                break
            else:
                pos += 1
        labels[name] = _unescape(line[start:pos], _LABEL_ESCAPES, where)
        pos += 1
        if line.startswith(",", pos):
            pos += 1
        elif not line.startswith("}", pos):
            raise ParseError(f"{where}: expected , or }} after label {name!r}")
    return labels, pos + 1


def parse(text: str) -> dict[str, dict]:
    """Parse an exposition; raise ParseError on anything malformed.

    Returns {family: {"type": str, "help": str | None,
    "samples": [(sample name, labels dict, float value)]}}.
    """
    if text and not text.endswith("\n"):
        raise ParseError("exposition must end with a newline")
    families: dict[str, dict] = {}
    seen: set[tuple[str, tuple]] = set()
    closed: set[str] = set()
    current: str | None = None

    for lineno, line in enumerate(text.split("\n")[:-1], 1):
        where = f"line {lineno}"
        if not line.strip():
            raise ParseError(f"{where}: blank line")
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) < 3 or parts[1] not in ("HELP", "TYPE"):
                if not line.startswith("# "):
                    raise ParseError(f"{where}: malformed comment {line!r}")
                continue
            kind, name = parts[1], parts[2]
            if not _FULL_NAME_RE.match(name):
                raise ParseError(f"{where}: bad metric name {name!r}")
            if name != current:
                if name in closed:
                    raise ParseError(f"{where}: family {name!r} is split across the exposition")
                if current is not None:
                    closed.add(current)
                current = name
            fam = families.setdefault(name, {"type": None, "help": None, "samples": []})
            if fam["samples"]:
                raise ParseError(f"{where}: {kind} for {name!r} after its samples")
            if kind == "HELP":
                if fam["help"] is not None:
                    raise ParseError(f"{where}: duplicate HELP for {name!r}")
                fam["help"] = _unescape(parts[3] if len(parts) == 4 else "", _HELP_ESCAPES, where)
            else:
                if fam["type"] is not None:
                    raise ParseError(f"{where}: duplicate TYPE for {name!r}")
                if len(parts) != 4 or parts[3] not in _TYPES:
                    raise ParseError(f"{where}: bad TYPE line {line!r}")
                fam["type"] = parts[3]
            continue

        m = _NAME_RE.match(line)
        if not m:
            raise ParseError(f"{where}: bad sample line {line!r}")
        name, pos = m.group(), m.end()
        labels: dict[str, str] = {}
        if line.startswith("{", pos):
            labels, pos = _labels(line, pos, where)
        if not line.startswith(" ", pos):
            raise ParseError(f"{where}: expected one space before the value in {line!r}")
        rest = line[pos + 1 :].split(" ")
        if len(rest) > 2 or "" in rest:
            raise ParseError(f"{where}: expected 'value [timestamp]' in {line!r}")
        value = _value(rest[0], where)
        if len(rest) == 2 and not _INT_RE.match(rest[1]):
            raise ParseError(f"{where}: bad timestamp {rest[1]!r}")

        fam = families.get(current) if current is not None else None
        if fam is None or fam["type"] is None or name not in {current + s for s in _SUFFIXES[fam["type"]]}:
            raise ParseError(f"{where}: sample {name!r} without a preceding TYPE for its family")
        key = (name, tuple(sorted(labels.items())))
        if key in seen:
            raise ParseError(f"{where}: duplicate sample {name}{labels}")
        seen.add(key)
        if fam["type"] == "counter" and not value >= 0:
            raise ParseError(f"{where}: counter {name!r} has value {rest[0]}")
        if fam["type"] == "histogram" and ("le" in labels) != name.endswith("_bucket"):
            raise ParseError(f"{where}: 'le' must be on exactly the _bucket samples")
        fam["samples"].append((name, labels, value))

    for name, fam in families.items():
        if fam["type"] is None:
            raise ParseError(f"family {name!r} has HELP but no TYPE")
        if fam["type"] == "histogram":
            _check_histogram(name, fam["samples"])
    return families


def _check_histogram(family: str, samples: list) -> None:
    groups: dict[tuple, dict] = {}
    for name, labels, value in samples:
        rest = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        g = groups.setdefault(rest, {"buckets": [], "sum": None, "count": None})
        if name.endswith("_bucket"):
            le = _value(labels["le"], family)
            if le != le:
                raise ParseError(f"{family}: le is NaN")
            g["buckets"].append((le, value))
        elif name.endswith("_sum"):
            g["sum"] = value
        else:
            g["count"] = value
    for rest, g in groups.items():
        where = f"{family}{dict(rest)}"
        buckets = g["buckets"]
        if not buckets or buckets[-1][0] != math.inf:
            raise ParseError(f"{where}: missing +Inf bucket")
        if any(not n >= 0 for _, n in buckets):
            raise ParseError(f"{where}: negative bucket count")
        for (le_a, n_a), (le_b, n_b) in zip(buckets, buckets[1:]):
            if not le_a < le_b:
                raise ParseError(f"{where}: bucket bounds not increasing ({le_a} then {le_b})")
            if not n_a <= n_b:
                raise ParseError(f"{where}: buckets not cumulative ({n_a} then {n_b})")
        if g["count"] is None or g["sum"] is None:
            raise ParseError(f"{where}: missing _count or _sum")
        if g["count"] != buckets[-1][1]:
            raise ParseError(f"{where}: _count {g['count']} != +Inf bucket {buckets[-1][1]}")
