"""Where relayd's data lives in Redis: key names and hash slots.

Every key starts with the configured prefix. One address's keys share the hash
tag ``{address}``, so they sit in one hash slot and one Lua script may touch
them all, on a single Redis as on a Cluster. What spans addresses (per-slot
statistics and the retention index) is kept per hash slot, under a tag chosen
to hash to that same slot, so the scripts keep it exact; a small set lists the
slots that hold any data. Bearer tokens are found by their hash: each lives in
the slot of that hash (``token_slot_keys``) and in its address's own list.
Needs no Redis client: stdlib CRC16 only.
"""

from __future__ import annotations

import binascii
import functools
import itertools
from dataclasses import dataclass

SLOTS = 16384
CACHED_ADDRESSES = 16384

_slot_tags: dict[int, str] = {}
_candidates = itertools.count()


def key_slot(key: str) -> int:
    """The Redis Cluster hash slot of ``key`` (CRC16 of its hash tag, as the server computes it)."""
    raw = key.encode()
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1:end]
    return binascii.crc_hqx(raw, 0) % SLOTS


def slot_tag(slot: int) -> str:
    """A short tag that hashes to ``slot``; the same on every instance (the first ``~N`` that does). Found by
    trying candidates in order (about 160,000 for all slots), hashed here directly: half the time of going
    through ``key_slot`` (83 against 162 ms for all slots), which a fresh instance spends as it meets new slots."""
    tag = _slot_tags.get(slot)
    while tag is None:
        n = next(_candidates)
        _slot_tags.setdefault(binascii.crc_hqx(b"~%d" % n, 0) % SLOTS, f"~{n}")
        tag = _slot_tags.get(slot)
    return tag


class ScriptKeys(tuple[str, ...]):
    """The keys a script declares, with their RESP form built once (``resp``): an address's keys are the same
    for every write to it, and packing them was most of packing a write (``write_queue.pack``)."""

    resp: bytes

    def __new__(cls, keys: list[str], resp: bytes | None = None) -> "ScriptKeys":
        """``resp``: their RESP form when the caller built it (``AddressKeys``)."""
        self = super().__new__(cls, keys)
        if resp is None:
            text = "".join([f"${len(k)}\r\n{k}\r\n" for k in keys])  # lengths in characters: bytes when ASCII
            resp = text.encode() if text.isascii() else b"".join(
                b"$%d\r\n%s\r\n" % (len(raw), raw) for raw in (k.encode() for k in keys))
        self.resp = resp
        return self

    def first(self, count: int) -> "ScriptKeys":
        """The first ``count`` keys (the same strings), their RESP form cut from this one's."""
        keys = self[:count]
        end = 0
        for key in keys:
            size = len(key) if key.isascii() else len(key.encode())
            end += len(str(size)) + size + 5  # $<size>\r\n<key>\r\n
        return ScriptKeys(list(keys), self.resp[:end])


class AddressKeys:
    """The names of a script's keys, each under its address's own prefix or under its slot's (``names``:
    (of the slot?, name) in the order the script declares them), built for an address with their RESP form
    from one template per length of the two prefixes (rather than key by key)."""

    def __init__(self, names: tuple[tuple[bool, str], ...]) -> None:
        self.names = names
        self._templates: dict[tuple[int, int], str] = {}

    def build(self, own: str, slot: str) -> ScriptKeys:
        keys = [slot + name if of_slot else own + name for of_slot, name in self.names]
        if not (own.isascii() and slot.isascii()):
            return ScriptKeys(keys)
        template = self._templates.get((len(own), len(slot)))
        if template is None:
            template = self._templates[len(own), len(slot)] = "".join(
                f"${len(slot if of_slot else own) + len(name)}\r\n{{{int(of_slot)}}}{name}\r\n"
                for of_slot, name in self.names)
        return ScriptKeys(keys, template.format(own, slot).encode())


ENQUEUE_KEYS = 14
"""The keys ``scripts.ENQUEUE`` declares: ``RecipientKeys`` up to ``delivered`` (it never touches history): a
fifth fewer bytes to send and parse on the busiest write."""
_SCRIPT_KEYS = AddressKeys((*((False, name) for name in ("q", "t", "m", "i", "n", "rq", "rt", "rm")),
                            (True, "expiry"), (True, "stats"),
                            *((False, name) for name in ("mig", "on", "w", "d", "h", "ho", "hu")), (True, "hexpiry")))
"""``RecipientKeys``: an address's own keys, its slot's expiry index and statistics among them."""


@dataclass(frozen=True, slots=True)
class RecipientKeys:
    """The keys one message/receipt script works on, in the order the scripts declare them."""

    queue: str      # ZSET seq -> seq: delivery order
    times: str      # ZSET seq -> queued_at: retention order
    messages: str   # HASH seq -> record
    ids: str        # HASH messageId -> [[sender, seq], ...]: idempotency and ack
    counters: str   # HASH count, bytes, last (message seq), rlast (receipt seq)
    receipt_queue: str  # ZSET seq -> seq
    receipt_times: str  # ZSET seq -> timestamp
    receipts: str   # HASH seq -> [reader, messageId, timestamp]
    expiry: str     # per slot: ZSET address -> oldest queued_at or receipt timestamp
    stats: str      # per slot: HASH recipients, messages, bytes, receipts, keys, ver (bumped by every change
                    # of messages or bytes, so a reader keeps the newest per-slot totals)
    migrated: str   # SET of items copied by ``relayd migrate`` (so a re-run copies nothing twice)
    presence: str   # HASH instance -> session kind, written by relayd.cluster (read here: who to tell)
    watchers: str   # SET of instances that cached the presence (relayd.cluster tells them when it changes)
    delivered: str  # ZSET "lower-cased sender\nmessageId" -> queued_at of what left as delivered (idempotency)
    history: str    # HASH "lower-cased sender\nmessageId" -> "seq live record" of a message kept after delivery
    history_order: str  # ZSET same member -> timestamp (pages, newest first)
    history_until: str  # ZSET same member -> kept until (ms)
    history_expiry: str  # per slot: ZSET address -> earliest kept until of its history

    def all(self) -> list[str]:
        return [self.queue, self.times, self.messages, self.ids, self.counters, self.receipt_queue,
                self.receipt_times, self.receipts, self.expiry, self.stats, self.migrated, self.presence,
                self.watchers, self.delivered, self.history, self.history_order, self.history_until,
                self.history_expiry]


class Layout:
    """Key names under one prefix."""

    def __init__(self, prefix: str) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError("key prefix must be non-empty and free of braces")
        self.prefix = prefix
        self.slots = f"{prefix}slots"
        """SET of slot numbers that hold per-slot data (bounded by 16384)."""
        self.slots_keys = ScriptKeys([self.slots])
        """``slots`` as ``scripts.ADD_SLOTS`` declares it, once per call."""
        # Every write names its address's keys and slot: recently used ones are kept, not rebuilt.
        self.slot_of = functools.lru_cache(maxsize=CACHED_ADDRESSES)(self.slot_of)  # type: ignore[method-assign]
        self.recipient = functools.lru_cache(maxsize=CACHED_ADDRESSES)(self.recipient)  # type: ignore[method-assign]
        self.script_keys = functools.lru_cache(maxsize=CACHED_ADDRESSES)(self.script_keys)  # type: ignore[method-assign]
        self.enqueue_keys = functools.lru_cache(maxsize=CACHED_ADDRESSES)(self.enqueue_keys)  # type: ignore[method-assign]

    def _own(self, address: str, name: str) -> str:
        return f"{self.prefix}{{{address}}}:{name}"

    def slot_of(self, address: str) -> int:
        return key_slot(self._own(address, "q"))

    def slot_keys(self, slot: int) -> tuple[str, str]:
        """(expiry index, statistics) of one hash slot."""
        tag = slot_tag(slot)
        return f"{self.prefix}{{{tag}}}:expiry", f"{self.prefix}{{{tag}}}:stats"

    def recipient(self, address: str) -> RecipientKeys:
        return RecipientKeys(*self.script_keys(address))

    def script_keys(self, address: str) -> ScriptKeys:
        """``recipient(address).all()``, as the message and receipt scripts declare them, packed once (built
        here: a first write to an address built them field by field for about a tenth of its CPU)."""
        slot = slot_tag(self.slot_of(address))
        return _SCRIPT_KEYS.build(f"{self.prefix}{{{address}}}:", f"{self.prefix}{{{slot}}}:")

    def enqueue_keys(self, address: str) -> ScriptKeys:
        """The first ``ENQUEUE_KEYS`` of ``script_keys(address)``, packed once (the same strings: both are
        cached)."""
        return self.script_keys(address).first(ENQUEUE_KEYS)

    def history_expiry(self, slot: int) -> str:
        """Per slot: ZSET address -> the earliest time one of its kept messages expires."""
        return f"{self.prefix}{{{slot_tag(slot)}}}:hexpiry"

    def key(self, address: str) -> tuple[str, str, str, str]:
        """(public key record, slot statistics, migration ledger, key floor) of one address."""
        return (self._own(address, "key"), self.slot_keys(self.slot_of(address))[1], self._own(address, "mig"),
                self._own(address, "kf"))

    def unsigned_keys(self, slot: int) -> str:
        """ZSET key record name -> when it was last uploaded or looked up (ms), of the slot's unsigned keys."""
        return f"{self.prefix}{{{slot_tag(slot)}}}:ukeys"

    def address_of_key(self, name: str) -> str:
        """The address of a key record's name (``key``'s first element)."""
        return name[len(self.prefix) + 1:-len("}:key")]

    def tokens_of(self, address: str) -> str:
        """ZSET token hash -> expiry (ms) of one address: the per-address cap keeps it short."""
        return self._own(address, "tok")

    def token_slot(self, token_hash: str) -> int:
        return key_slot(token_hash)

    def token_slot_keys(self, slot: int) -> tuple[str, str]:
        """(HASH token hash -> "address expires_ms", ZSET token hash -> expires_ms) of one hash slot."""
        tag = slot_tag(slot)
        return f"{self.prefix}{{{tag}}}:tok", f"{self.prefix}{{{tag}}}:tokx"

    def push(self, address: str) -> tuple[str, str, str, str, str]:
        """(HASH id -> subscription record, ZSET id -> created_at, expires_at) of one address, then (slot
        statistics, the slot's push expiry index): the keys every push script declares, in that order."""
        slot = self.slot_of(address)
        return (self._own(address, "push"), self._own(address, "pushc"), self._own(address, "pushx"),
                self.slot_keys(slot)[1], self.push_expiry(slot))

    def push_expiry(self, slot: int) -> str:
        """ZSET address -> expires_at (ms), of the slot's addresses with push subscriptions."""
        return f"{self.prefix}{{{slot_tag(slot)}}}:pushx"

    def lock(self, address: str) -> str:
        return self._own(address, "lock")

    def probe(self, node_id: str) -> str:
        """A short-lived key the health probe writes, so refused writes show up without traffic."""
        return f"{self.prefix}probe:{node_id}"
