"""How relayd's values are written in Redis, and the per-slot totals of what is stored."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar

from ..store import KeyRecord, QueuedMessage

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
KEY_OPTIONAL = ("key_type", "issued_at", "format", "signature")

compact_json = json.JSONEncoder(separators=(",", ":")).encode
"""``json.dumps(value, separators=(",", ":"))`` without building an encoder at every call (once per message)."""

json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii
"""A string as ``compact_json`` writes it (ASCII, escaped)."""

PresenceEntries = dict[str, str]
"""An address's presence as ``relayd.cluster`` records it: instance -> kind of its sessions there."""


def chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def now_ms() -> int:
    return int(time.time() * 1000)


def pairs(flat: Sequence[Any]) -> PresenceEntries:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def encode_message(msg: QueuedMessage, size: int) -> str:
    """The record of a queued message: its meta as ``compact_json`` writes it, spelled out for the usual types
    (a quarter of the CPU: ``JSONEncoder.encode`` sets up its C encoder again at every call)."""
    timestamp, queued_at = msg.timestamp, msg.queued_at
    if type(size) is int and type(timestamp) is int and type(queued_at) is int:
        return (f"[{json_string(msg.sender)},{json_string(msg.message_id)},{size},{timestamp},{queued_at}]\n"
                f"{msg.content}")
    meta = compact_json([msg.sender, msg.message_id, size, timestamp, queued_at])
    return f"{meta}\n{msg.content}"


def decode_message(recipient: str, seq: str, record: str) -> QueuedMessage:
    meta, _, content = record.partition("\n")
    sender, message_id, _size, timestamp, queued_at = json.loads(meta)
    return QueuedMessage(recipient, sender, message_id, content, timestamp, queued_at, int(seq))


def decode_key(address: str, fields: dict[str, str]) -> KeyRecord:
    issued = fields.get("issued_at")
    return KeyRecord(address, fields["public_key"], int(fields["created_at"]), int(fields["updated_at"]),
                     fields.get("key_type"), int(issued) if issued is not None else None,
                     fields.get("format"), fields.get("signature"))


def by_recipient(items: Iterable[T], recipient: Callable[[T], K]) -> dict[K, list[T]]:
    """Items grouped by recipient (or any other key), each group in the given order."""
    groups: dict[K, list[T]] = {}
    for item in items:
        groups.setdefault(recipient(item), []).append(item)
    return groups


class SlotTotals:
    """Messages and content bytes per hash slot, and their sums, never older than what was last seen.

    Every change of a slot's totals bumps its ``ver`` in Redis; a value is
    taken only when its version is newer than the one held, so a slow
    periodic read never overwrites what a later write of this instance
    returned. After a failure (Redis may have restarted with other data) the
    next full read is taken as it is.
    """

    def __init__(self) -> None:
        self._slots: dict[int, tuple[int, int, int]] = {}
        self.messages = 0
        self.bytes = 0
        self.trust_next_read = False

    def apply(self, slot: int, totals: Sequence[Any], *, force: bool = False) -> None:
        if len(totals) < 3:
            return
        messages, nbytes, ver = int(totals[0] or 0), int(totals[1] or 0), int(totals[2] or 0)
        old = self._slots.get(slot)
        if old is not None and ver <= old[2] and not force:
            return
        self._slots[slot] = (messages, nbytes, ver)
        self.messages += messages - (old[0] if old else 0)
        self.bytes += nbytes - (old[1] if old else 0)
