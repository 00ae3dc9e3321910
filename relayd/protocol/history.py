"""Message history frames: a verified session pages through the messages its address received, and deletes them.

``{"type": "history", "limit": N, "before": <ms>, "with": "<address>"}``
answers ``{"type": "history", "messages": [<message frames as delivered, with
"queued": true: they come from the store>], "more": bool}``, newest first (``before`` and ``with`` optional: only
messages with an earlier ``timestamp``, only from that sender), at most
``PAGE_BYTES`` of them. A page never ends between two messages of the same
timestamp (a run longer than ``limit`` is one page, up to ``MAX_LIMIT`` and
``PAGE_BYTES``), so ``before`` = the last one's timestamp pages on without
skipping any.
``{"type": "history_delete", "messageIds": [...]}`` or ``{"type":
"history_delete", "all": true}`` answers ``{"type": "history_delete",
"deleted": N}``. Off (``disabled``) unless ``[history] days > 0``; a session
that did not sign in with a signature gets ``not_verified``: an address's
history is only as private as its sign-in.
"""

from __future__ import annotations

from typing import Any

from ..config import Config
from ..errors import ErrorCode, RelayError
from ..frames import field_address, field_bool, field_timestamp, message_text
from ..storage.store import HistoryStore, Store, StorageUnavailable
from .delivery import storage_error
from .session import Session

MAX_LIMIT = 500
"""Messages in one page at most (a page of large messages is still bounded by the frame size the client takes)."""
DEFAULT_LIMIT = 100
MAX_DELETE_IDS = 1000
PAGE_BYTES = 1 << 20
"""A page ends once its frames reach this many bytes (it holds at least one message; ``more`` is then true), so
a page fits the 1 MiB frames most WebSocket clients take."""


class History:
    """Answers ``history`` and ``history_delete`` frames from the store's kept messages."""

    def __init__(self, config: Config, store: Store) -> None:
        self.store = store
        self.days = 0
        self.configure(config)

    def configure(self, config: Config) -> None:
        """Apply ``[history] days`` (SIGHUP may change it: what is kept stays until it expires)."""
        self.days = config.history.days

    def _kept(self, session: Session) -> HistoryStore:
        if not self.days:
            raise RelayError(ErrorCode.DISABLED, "Message history is off on this relay ([history] days = 0)")
        if not session.verified:
            raise RelayError(ErrorCode.NOT_VERIFIED)
        if not isinstance(self.store, HistoryStore):  # start-up refuses days > 0 on such a backend
            raise RelayError(ErrorCode.DISABLED, f"The {self.store.name} backend keeps no history")
        return self.store

    async def page(self, session: Session, frame: dict[str, Any]) -> None:
        kept = self._kept(session)
        limit = frame.get("limit", DEFAULT_LIMIT)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise RelayError(ErrorCode.INVALID_FIELD, f"Field limit must be an integer from 1 to {MAX_LIMIT}")
        before = field_timestamp(frame, "before")
        sender = field_address(frame, "with") if frame.get("with") is not None else None
        assert session.address is not None
        try:
            found = await kept.history(session.address, limit + 1, before, sender)
            messages = found.messages
            if len(messages) > limit and messages[0].timestamp == messages[limit].timestamp:
                # a run of equal timestamps longer than the page: the page is the whole run (bounded)
                found = await kept.history(session.address, MAX_LIMIT + 1, before, sender)
                messages = found.messages
                limit = sum(1 for m in messages[:MAX_LIMIT] if m.timestamp == messages[0].timestamp)
        except StorageUnavailable as exc:
            raise storage_error(exc) from None
        frames: list[str] = []
        size = 0
        for m in messages[:limit]:
            text = message_text(m.sender, m.content, m.message_id, m.timestamp, queued=True)
            if frames and size + len(text) > PAGE_BYTES:
                break
            frames.append(text)
            size += len(text) + 1
        shown = len(frames)
        more = found.more or len(messages) > shown
        if more:  # never end a page inside a run of equal timestamps: the next page starts "before" the last one
            while shown > 1 and messages[shown - 1].timestamp == messages[shown].timestamp:
                shown -= 1
        session.push(f'{{"type":"history","messages":[{",".join(frames[:shown])}],'
                     f'"more":{"true" if more else "false"}}}')

    async def delete(self, session: Session, frame: dict[str, Any]) -> None:
        kept = self._kept(session)
        everything = field_bool(frame, "all", default=False)
        ids = frame.get("messageIds")
        if everything == (ids is not None):
            raise RelayError(ErrorCode.INVALID_FIELD, "Give either messageIds or \"all\": true")
        if ids is not None and (not isinstance(ids, list) or not 1 <= len(ids) <= MAX_DELETE_IDS
                                or not all(isinstance(i, str) and 0 < len(i) <= 256 for i in ids)):
            raise RelayError(ErrorCode.INVALID_FIELD, f"Field messageIds must be a list of 1 to {MAX_DELETE_IDS} "
                                                      "non-empty strings of at most 256 characters")
        assert session.address is not None
        try:
            wanted = None if ids is None else list(dict.fromkeys(ids))
            deleted = await kept.delete_history(session.address, wanted)
        except StorageUnavailable as exc:
            raise storage_error(exc) from None
        session.send({"type": "history_delete", "deleted": deleted})
