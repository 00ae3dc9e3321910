"""What a Redis failure means to an operator: one line naming the cause and, where there is one, the setting."""

from __future__ import annotations

from redis import exceptions as rx

_REFUSALS = {
    "READONLY": "Redis refuses writes: it is a read-only replica (READONLY)",
    "OOM": "Redis refuses writes: it is out of memory (maxmemory reached with noeviction, OOM)",
    "MISCONF": "Redis refuses writes: it cannot save its snapshot to disk (MISCONF)",
    "NOREPLICAS": "Redis refuses writes: not enough replicas are connected (NOREPLICAS)",
    "LOADING": "Redis is loading its dataset into memory (LOADING)",
    "BUSY": "Redis is busy running a script (BUSY)",
    "MASTERDOWN": "Redis replica lost its primary (MASTERDOWN)",
    "CLUSTERDOWN": "the Redis Cluster is down (CLUSTERDOWN)",
    "TRYAGAIN": "the Redis Cluster is moving a slot (TRYAGAIN)",
    "WRONGPASS": "Redis refused the credentials in [redis] url (WRONGPASS)",
    "NOAUTH": "Redis needs a password: put it in [redis] url (NOAUTH)",
    "NOPERM": "the Redis user lacks a permission relayd needs (NOPERM)",
}


def describe(exc: BaseException) -> str:
    """A human reason for an operator; never contains message data or the password."""
    text = " ".join(str(exc).split())
    code = text.split(" ", 1)[0].upper() if text else ""
    if code in _REFUSALS:
        return _REFUSALS[code]
    if isinstance(exc, rx.OutOfMemoryError):  # type: ignore[attr-defined]  # not in the types-redis 4.6 stubs
        return _REFUSALS["OOM"]
    if isinstance(exc, rx.ReadOnlyError):
        return _REFUSALS["READONLY"]
    if isinstance(exc, rx.AuthenticationError):
        return "Redis refused the credentials in [redis] url"
    if isinstance(exc, rx.BusyLoadingError):
        return _REFUSALS["LOADING"]
    if isinstance(exc, (rx.TimeoutError, TimeoutError)):
        return "Redis did not answer within [redis] socket_timeout_s"
    if isinstance(exc, (rx.ConnectionError, OSError)):
        return f"Redis is unreachable: {text or type(exc).__name__}"
    return f"Redis error: {type(exc).__name__}: {text[:300]}"
