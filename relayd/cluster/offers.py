"""What peers offer this instance: messages for recipients with sessions here, and the rules that keep a
sender's messages in order across instances.

The ordering rules, each tested in ``tests/test_cluster_ordering.py``:

1. An unstored offer is taken only when a ready session here takes it and
   none of them acks (an ack session must get stored messages only);
   otherwise it is refused and the sender's instance stores it.
2. Refusal hold: after refusing an unstored offer from a sender for a
   recipient, later unstored offers of that pair are refused too (and so
   stored behind the refused one instead of overtaking it) until a stored
   message of the pair arrives, or ``REFUSAL_HOLD_S`` passed. The sender's
   instance offers nothing unstored while its fallback stores are under way,
   and the bus keeps one instance's messages in order.
3. Watermark: every offer names the seq of the sender's previous stored
   message to the recipient (``after``). If that message has not reached the
   sessions here (its hint may be lost), the offer is not pushed: an unstored
   one is refused (stored behind it), and for a stored one the queue is read
   again first (``refresh``), which delivers both in seq order, and the
   answer follows the read. The same holds while a read of the queue is
   under way for any reason (after a blip or a lapse, messages whose notices
   were lost may be waiting, of any sender, one that just moved here too).
4. A message delivered here counts as taken when offered again: by its
   messageId, whatever brought it here (an offer, a read of the queue, a
   session's flush), for a resend through another instance or the stored
   fallback of an unstored offer taken here whose answer came too late; and
   stored, by its seq (a read of the queue here may have pushed it before its
   offer).
5. A lost unstored offer holds the pair's later ones back: each sending
   instance numbers its unstored offers per pair, and an offer whose number
   does not follow the last one seen from that instance (one went missing
   on the way: a cut inbox, a publish that reached nobody) is refused with a
   hold, as in rule 2, so it is stored behind the missing one's fallback.
6. A stale unstored offer is refused: one that arrives more than half of
   ``[cluster] reply_timeout_ms`` after its message reached the sender's
   instance (by the instances' wall clocks) may already count as not taken
   there, and its sender may have sent later messages by other ways since.
   Instances whose clocks disagree by more than that only lose the live path
   between them (their messages go through storage).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable

from ..clock import Clock, wall_ms
from ..ops.metrics import RelayMetrics
from ..protocol.delivery import Delivery, any_ack
from ..protocol.seams import Routes
from ..protocol.senders import ident_of
from ..storage.store import QueuedMessage
from .refresh import Refresh

REFUSAL_HOLD_S = 10.0
"""How long a refusal holds a pair's later unstored offers back when no stored message of the pair follows
(its fallback was refused too)."""
RECENT_REFUSALS = 16384


class Offers:
    """Applies peers' offers to the sessions here (see the module docstring)."""

    def __init__(self, routes: Routes, local: Delivery, refresh: Refresh, metrics: RelayMetrics,
                 clock: Clock, *, max_offer_age_ms: int) -> None:
        self.routes = routes
        self.max_offer_age_ms = max_offer_age_ms
        self.local = local
        self.refresh = refresh
        self.metrics = metrics
        self.clock = clock
        self.on_stored: Callable[[str], None] = lambda recipient: None
        """Told the recipient of a stored offer no session here took (a session being prepared must flush)."""
        self._refused: dict[tuple[str, str], float] = {}
        self._numbers: OrderedDict[tuple[str, str, str], int] = OrderedDict()

    def offered(self, msg: QueuedMessage, *, stored: bool, after: int, keep: bool = True, origin: str = "",
                number: int = 0) -> tuple[int, bool] | Awaitable[tuple[int, bool]]:
        """(sessions here that took it, whether one of them acks), or an awaitable of it when the queue must be
        read first (rule 3). ``keep``: a stored message stays stored when only plain sessions here take it (an
        ack session takes it elsewhere)."""
        ident = ident_of(msg)
        pair = ident[0], ident[1]
        if self.local.answers.get(ident) == "delivered":
            if stored:
                self.local.remove_soon(msg)  # its live copy was taken here
            return 1, False
        targets = self.routes.ready_sessions(msg.recipient)
        ack = any_ack(targets)
        if stored:
            self._refused.pop(pair, None)
        else:
            gap = number > 0 and not self._follows(origin, pair, number)
            refused = self._refused.get(pair)
            if gap or (refused is not None and self.clock.monotonic() - refused < REFUSAL_HOLD_S):
                return self._refuse(pair, ack) if gap else (0, ack)
            if ack or not targets or wall_ms(self.clock) - msg.queued_at > self.max_offer_age_ms:
                return self._refuse(pair, ack)
        if stored and targets and self.refresh.caught_up(msg.recipient, msg.seq):
            return len(targets), ack  # a read of the queue here pushed it already
        if targets and (self.refresh.reading(msg.recipient) or not self.refresh.caught_up(msg.recipient, after)):
            if stored:  # read the queue first: it delivers the missing one and this one, in order
                return self._after_read(msg, ident, after)
            self.refresh.request(msg.recipient, seen=after)
            return self._refuse(pair, ack)
        if not stored:
            taken = self.local.push_live(targets, msg)
            if not taken:
                return self._refuse(pair, ack)
            self.local.answers.remember(ident, "delivered")
            return taken, False
        sessions = self.local.push_stored(targets, msg)
        if not sessions:
            self.on_stored(msg.recipient)
            return 0, ack
        self.metrics.routed_live.inc()
        self.refresh.pushed(msg.recipient, msg.seq)
        self.local.answers.remember(ident, "delivered")
        if not keep and not any(s.ack for s in sessions):
            self.local.remove_soon(msg)  # here, where its bytes come back if they never reach the peer
        return len(sessions), any(s.ack for s in sessions)

    async def _after_read(self, msg: QueuedMessage, ident: tuple[str, str, str], after: int) -> tuple[int, bool]:
        """A stored offer after a message that has not reached the sessions here: read the queue (bounded by
        the store's deadline), which pushes both in seq order; taken if the read pushed it."""
        await self.refresh.read(msg.recipient, seen=after)
        targets = self.routes.ready_sessions(msg.recipient)
        ack = any(s.ack for s in targets)
        if targets and self.refresh.caught_up(msg.recipient, msg.seq):
            self.local.answers.remember(ident, "delivered")
            return len(targets), ack
        return 0, ack

    def _follows(self, origin: str, pair: tuple[str, str], number: int) -> bool:
        """Record unstored offer ``number`` of ``pair`` from ``origin``; whether it follows the last one seen
        (none seen: only the first does, since an earlier one may have been lost)."""
        key = (origin, pair[0], pair[1])
        last = self._numbers.pop(key, 0)
        self._numbers[key] = number
        if len(self._numbers) > RECENT_REFUSALS:
            self._numbers.popitem(last=False)
        return number == last + 1

    def _refuse(self, pair: tuple[str, str], ack: bool) -> tuple[int, bool]:
        """Refuse an unstored offer, and the same sender's next unstored ones for this recipient (rule 2)."""
        now = self.clock.monotonic()
        if len(self._refused) >= RECENT_REFUSALS:
            self._refused = {k: t for k, t in self._refused.items() if now - t < REFUSAL_HOLD_S}
        self._refused[pair] = now
        return 0, ack
