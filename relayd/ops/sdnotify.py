"""systemd notify protocol (sd_notify(3)) without libsystemd.

Only the standard library is used so the daemon runs the same under
systemd, in a container, or from a shell; outside systemd every call is a
cheap no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger("relayd.sdnotify")


def _monotonic_usec() -> int:
    # systemd compares MONOTONIC_USEC against its own CLOCK_MONOTONIC, so
    # time.monotonic() (which may be another clock on some platforms) won't do.
    clock = getattr(time, "CLOCK_MONOTONIC", None)
    if clock is not None:
        return time.clock_gettime_ns(clock) // 1000
    return time.monotonic_ns() // 1000


def _socket_address(value: str | None) -> str | None:
    """Map NOTIFY_SOCKET to an AF_UNIX address; None if unusable."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    log.warning("ignoring unsupported NOTIFY_SOCKET %r", value)
    return None


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC if it is meant for this process, per sd_watchdog_enabled(3)."""
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC %r", raw)
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            log.warning("ignoring watchdog: malformed WATCHDOG_PID %r", pid)
            return None
    return usec


class Notifier:
    """Sends state changes to the service manager over its datagram socket.

    Failures are logged once and otherwise swallowed: a lost notification
    must never take the relay down.
    """

    __slots__ = ("_address", "_watchdog_usec", "_sock", "_warned")

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec if address else None
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        if not hasattr(socket, "AF_UNIX"):
            return cls()
        return cls(_socket_address(environ.get("NOTIFY_SOCKET")), _watchdog_usec(environ))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half the timeout, as sd_watchdog_enabled(3) advises."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def send(self, text: str) -> bool:
        """Send one raw datagram; True if the kernel accepted it."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(text.encode("utf-8"), self._address)
            return True
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("sd_notify to %r failed: %s", self._address, exc)
            else:
                log.debug("sd_notify to %r failed: %s", self._address, exc)
            return False

    def notify(self, **fields: object) -> bool:
        """Send KEY=value assignments; keys are upper-cased, newlines in values flattened."""
        if self._address is None:
            return False
        lines = []
        for key, value in fields.items():
            if value is True:
                value = 1
            text = str(value).replace("\n", " ")
            lines.append(f"{key.upper()}={text}")
        return self.send("\n".join(lines))

    def ready(self, status: str | None = None) -> bool:
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        return self.notify(STATUS=text)

    def reloading(self, status: str | None = None) -> bool:
        """Announce a reload; the caller must send ready() once it is done."""
        if self._address is None:
            return False
        fields: dict[str, object] = {"RELOADING": 1, "MONOTONIC_USEC": _monotonic_usec()}
        if status is not None:
            fields["STATUS"] = status
        return self.notify(**fields)

    def stopping(self, status: str | None = None) -> bool:
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def watchdog(self) -> bool:
        """Ping the watchdog; a no-op unless the watchdog is armed for this process."""
        if self._watchdog_usec is None:
            return False
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __repr__(self) -> str:
        return f"Notifier(address={self._address!r}, watchdog_usec={self._watchdog_usec!r})"
