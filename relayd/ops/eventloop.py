"""Which event loop runs the relay: uvloop when it is installed (the ``fast`` extra), asyncio's own otherwise.

uvloop is libuv under asyncio's interface, the same event machinery as the Node original: it cuts the CPU per
message and per connection (bench/results). The default install stays pure: without uvloop nothing changes.
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Callable

from ..config import ConfigError
from ..extras import install_hint

__all__ = ["loop_factory", "loop_name"]

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(setting: str) -> LoopFactory | None:
    """The factory for ``[server] event_loop`` (``None``: asyncio's default loop); ``uvloop`` when it is missing
    is a configuration error that says how to install it."""
    if setting == "asyncio":
        return None
    if importlib.util.find_spec("uvloop") is None:
        if setting == "uvloop":
            raise ConfigError(f"[server] event_loop = uvloop, but uvloop is not installed: {install_hint('fast')}")
        return None
    import uvloop
    factory: LoopFactory = uvloop.new_event_loop
    return factory


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop 0.23.0`` or ``asyncio``, for the start-up block."""
    if type(loop).__module__.startswith("uvloop"):
        import uvloop
        return f"uvloop {uvloop.__version__}"
    return "asyncio"
