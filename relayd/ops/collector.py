"""When CPython's cyclic garbage collector walks every object, and how to keep that from stalling the loop.

A full collection visits every tracked object, and each open session holds a
few dozen: with tens of thousands of sessions a full pass stops the loop for
hundreds of milliseconds (docs/scaling.md measured 709 ms at 12,000). CPython
starts one whenever the objects that survived into the oldest generation have
grown by a quarter since the last, which a relay gaining or cycling sessions
does all the time.

``Collector`` freezes what a full collection left alive (``gc.freeze``): the
next passes walk only what came since. Frozen objects are still freed when
their last reference goes, so this is safe for everything that dies by
reference counting; a closed connection does (relayd.net.connection breaks its
cycles, and relayd.net.transports the one asyncio's selector transports keep),
but not behind asyncio's TLS, whose transports keep cycles of their own: there a
frozen closed connection would wait for the next thaw, so ``freezing`` is off
(``transports.freezes_safely``). Whatever else turns into cyclic
garbage while frozen is found at the next thaw: every ``thaw_s`` everything is
handed back to the collector, whose next full pass sees it all once. On every
loop, each full pass is timed for /metrics.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

THAW_S = 3600.0
"""How long frozen objects stay out of the collector's sight: one long full pass per hour at most."""


class Collector:
    """See the module docstring. ``tick`` runs on the housekeeping timer (on the loop); the collector's callback
    only times full passes and raises a flag, since it may run in any thread, in the middle of any allocation.
    ``observe`` receives the length of each full pass in seconds (the ``relayd_gc_full_pause_seconds``
    histogram). ``freeze`` and ``unfreeze`` are the interpreter's (one frozen set per process, shared by every
    collector in it: tests pass their own)."""

    def __init__(self, monotonic: Callable[[], float], *, freezing: bool, thaw_s: float = THAW_S,
                 observe: Callable[[float], None] = lambda seconds: None,
                 freeze: Callable[[], None] = gc.freeze, unfreeze: Callable[[], None] = gc.unfreeze) -> None:
        self.monotonic = monotonic
        self.freezing = freezing
        self.freeze = freeze
        self.unfreeze = unfreeze
        self.thaw_s = thaw_s
        self.observe = observe
        self.full_passes = 0
        """Ticks that followed full collections (several between two ticks count once)."""
        self._collected = False
        self._started = 0.0
        self._thawed_at = monotonic()
        self._installed = False

    def install(self) -> None:
        """Freeze what exists now (modules, configuration, the listening server: it lives as long as the process)
        and watch for full collections."""
        self.freeze()
        if not self._installed:
            gc.callbacks.append(self._on_gc)
            self._installed = True

    def uninstall(self) -> None:
        """Stop watching, and hand what was frozen back to the collector (a relay stopped inside a longer-lived
        process, as in the tests, leaves nothing out of its sight)."""
        if self._installed:
            gc.callbacks.remove(self._on_gc)
            self._installed = False
            self.unfreeze()

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.observe(time.perf_counter() - self._started)
            self._collected = True

    def tick(self, now: float) -> None:
        if not self._collected:
            if self.freezing and now - self._thawed_at >= self.thaw_s:
                self._thawed_at = now
                self.unfreeze()
            return
        self._collected = False
        self.full_passes += 1
        if self.freezing:
            self.freeze()
