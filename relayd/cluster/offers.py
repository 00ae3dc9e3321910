"""What other instances offer this one (``relayd.cluster``): messages for recipients with sessions here.

A part of ``FarDelivery``. An unstored offer is taken only when a ready
session here takes it and none of them acks (it must be stored first);
otherwise it is refused and the sender's instance stores it. A refusal holds
the sender's later unstored offers to the same recipient back (see
``REFUSAL_HOLD_S``), so none overtakes the refused one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from ..clock import Clock
from ..protocol.delivery import Ident
from ..frames import message_text
from ..ops.metrics import RelayMetrics
from ..protocol.presence import Routes
from ..storage.store import QueuedMessage

REFUSAL_HOLD_S = 10.0
"""After refusing an offer from a sender for a recipient, later unstored offers of that pair are refused (and
so stored behind the refused one instead of overtaking it) until a stored message of the pair arrives: the
sender's instance offers nothing unstored while its fallback stores are under way, and its channel keeps
order, so every offer sent before it heard of the refusal arrives before that. The hold lapses after this
long in case no stored message follows (its fallback was refused too)."""
RECENT_REFUSALS = 16384


class FarOffers:
    """``offered``, for ``FarDelivery``; the attributes below are the delivery's."""

    routes: Routes
    metrics: RelayMetrics
    clock: Clock
    on_stored: Callable[[str], None]
    _recent: OrderedDict[Ident, str]
    _refused: dict[tuple[str, str], float]
    _remember: Callable[[Ident, str], None]

    def offered(self, msg: QueuedMessage, *, stored: bool) -> tuple[int, bool]:
        """Another instance offers a message for a recipient with sessions here: (sessions that took it, whether
        one of them acks). Unstored, it is refused when a session acks (it must be stored first); a messageId
        already delivered here counts as taken (the sender resent it through another instance)."""
        ident = (msg.sender.lower(), msg.recipient, msg.message_id)
        if not stored and self._recent.get(ident) == "delivered":
            return 1, False
        targets = self.routes.ready_sessions(msg.recipient)
        ack = any(s.ack for s in targets)
        if stored:
            self._refused.pop(ident[:2], None)
        else:
            refused = self._refused.get(ident[:2])
            if refused is not None and self.clock.monotonic() - refused < REFUSAL_HOLD_S:
                return 0, ack
            if ack:
                return self._refuse_offer(ident, ack)
        data = message_text(msg.sender, msg.content, msg.message_id, msg.timestamp, queued=False)
        taken = [s for s in targets if s.push(data, None if s.ack else msg)]
        if taken:
            self.metrics.routed_live.inc()
            self._remember(ident, "delivered")
        elif stored:
            self.on_stored(msg.recipient)
        else:
            return self._refuse_offer(ident, ack)
        return len(taken), any(s.ack for s in taken)

    def _refuse_offer(self, ident: Ident, ack: bool) -> tuple[int, bool]:
        """Refuse an unstored offer, and the same sender's next unstored ones for this recipient (see
        ``REFUSAL_HOLD_S``)."""
        now = self.clock.monotonic()
        if len(self._refused) >= RECENT_REFUSALS:
            self._refused = {k: t for k, t in self._refused.items() if now - t < REFUSAL_HOLD_S}
        self._refused[ident[:2]] = now
        return 0, ack
