"""Read receipts with peers: to the message sender's ready sessions here and on peers, else stored."""

from __future__ import annotations

from typing import Any

from ..protocol.receipts import Receipts
from ..protocol.session import Session
from ..storage.store import StorageUnavailable
from ..tasks import TaskSet
from .peers import PeerLink
from .presence import NO_PEER_SESSIONS


class ClusterReceipts:
    """``read_receipt`` across instances; ``local`` forwards here and stores what nobody took."""

    def __init__(self, local: Receipts, peers: PeerLink, tasks: TaskSet) -> None:
        self.local = local
        self.peers = peers
        self.tasks = tasks

    def read_receipt(self, session: Session, frame: dict[str, Any]) -> None:
        to, read = self.local.read_frame(session, frame)
        self.tasks.spawn(self._route(session, to, read))

    async def _route(self, session: Session, to: str, read: dict[str, Any]) -> None:
        here = self.local.forward(read, to)
        where = self.peers.cached(to)
        if where is None:
            try:
                where = await self.peers.lookup(to)
            except StorageUnavailable:
                where = NO_PEER_SESSIONS
        if here:
            if where.instances:
                self.peers.forward(where, to, read)
            return
        if where.instances and (await self.peers.relay_frame(where, to, read)).count:
            return
        self.local.keep(session, to, read)
