"""How the bus's envelopes look on the wire: compact JSON arrays, and the older objects, both read.

Compact (this version): ``[sender, message, ...]``, each message an array
``[kind, field, ...]`` with the kind's fields in the order of ``FIELDS``
(trailing absent ones left out, absent ones in between ``null``); a message
of a kind not in ``FIELDS`` travels as an object. Older instances send and
read only objects, ``{"f": sender, "b": [messages]}``: an instance sends
objects to a peer until it has heard from that peer that it reads arrays
(a compact envelope, or an object with ``"v": 2``, which older instances
ignore), so instances of both versions work together during a rolling
upgrade. Replies travel batched (``res``: ``rid, n, a`` triples) only to an
instance whose requests carry numeric rids (``bus``); older ones get one
``re`` each.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

Message = dict[str, Any]

COMPACT = 2
"""The ``v`` an instance that reads compact envelopes puts in the objects it sends."""

FIELDS: dict[str, tuple[str, ...]] = {
    "offer": ("to", "m", "s", "w", "rid", "o", "keep"),
    "re": ("rid", "n", "a"),
    "res": ("r",),
    "push": ("to", "m", "s"),
    "pull": ("to", "since", "seqs"),
    "frame": ("to", "f", "rid"),
    "drain": ("to", "rid"),
    "evict": ("to",),
    "key": ("to",),
    "inv": ("a", "rid"),
    "ping": (),
}
"""Each kind's fields, in the order a compact message carries them (``peers`` and ``bus`` name them)."""

_KNOWN = {kind: frozenset(("k", *fields)) for kind, fields in FIELDS.items()}
_dumps = json.JSONEncoder(separators=(",", ":")).encode


class Malformed(ValueError):
    """An envelope that is neither form."""


def _pack(message: Message) -> list[Any] | Message:
    kind: Any = message.get("k")
    fields = FIELDS.get(kind) if type(kind) is str else None
    if fields is None or not message.keys() <= _KNOWN[kind]:
        return message
    packed = [kind, *map(message.get, fields)]
    if packed[-1] is None:
        while len(packed) > 1 and packed[-1] is None:
            packed.pop()
    return packed


def _unpack(packed: Any) -> Message | None:
    if type(packed) is not list:
        return packed if isinstance(packed, dict) else None
    kind = packed[0] if packed else None
    fields = FIELDS.get(kind) if type(kind) is str else None
    if fields is None:
        return None
    message: Message = dict(zip(fields, packed[1:]))  # absent ones (null) are left out, as an object has them
    if None in message.values():
        message = {name: value for name, value in message.items() if value is not None}
    message["k"] = kind
    return message


def encode(sender: str, messages: Iterable[Message], *, compact: bool) -> str:
    """One envelope: compact for a peer known to read it, else an object that says this instance does."""
    if compact:
        return _dumps([sender, *map(_pack, messages)])
    return _dumps({"f": sender, "b": list(messages), "v": COMPACT})


def decode(data: str | bytes) -> tuple[str, list[Message], bool]:
    """(sender, its messages, whether the sender reads compact envelopes). Raises Malformed."""
    try:
        envelope = json.loads(data)
    except ValueError:
        raise Malformed("not JSON") from None
    if isinstance(envelope, list) and envelope and isinstance(envelope[0], str):
        return envelope[0], [m for m in map(_unpack, envelope[1:]) if m is not None], True
    if isinstance(envelope, dict) and "f" in envelope and isinstance(envelope.get("b"), list):
        return (str(envelope["f"]), [m for m in envelope["b"] if isinstance(m, dict)],
                envelope.get("v") == COMPACT)
    raise Malformed("neither a compact nor an object envelope")
