"""An asyncio client for relayd (and the original relay): the reference for app developers.

``RelayClient`` (in ``connection``) is made of parts, each in its own module:
``transport`` (the WebSocket), ``signin``, ``messaging`` (calls and their
answers), ``inbox`` (unread frames), ``rest`` over ``http_exchange``.
``decoding`` and ``display`` keep a hostile relay's JSON and text in bounds;
``backoff`` shows how to reconnect. Everything public is importable from
``relayd.client``.
"""

from .backoff import backoff_delays, connect_with_backoff
from .connection import RelayClient
from .errors import (
                     AuthRefused,
                     ClientError,
                     ClientTimeout,
                     ConnectionLost,
                     HttpError,
                     KeyVerificationError,
                     ProtocolViolation,
                     RelayUnreachable,
)
from .values import Identity, SignIn, random_public_key, verify_key_record

__all__ = [
    "AuthRefused",
    "ClientError",
    "ClientTimeout",
    "ConnectionLost",
    "HttpError",
    "Identity",
    "KeyVerificationError",
    "ProtocolViolation",
    "RelayClient",
    "RelayUnreachable",
    "SignIn",
    "backoff_delays",
    "connect_with_backoff",
    "random_public_key",
    "verify_key_record",
]
