from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay_harness import ThreadRelay, make_config  # noqa: E402


@pytest.fixture
def start_relay() -> Iterator[Callable[..., ThreadRelay]]:
    """Start in-process relays with config overrides; all are stopped after the test."""
    relays: list[ThreadRelay] = []

    def start(store: Any = None, **sections: dict[str, Any]) -> ThreadRelay:
        relay = ThreadRelay(make_config(**sections), store)
        relays.append(relay)
        return relay

    yield start
    for relay in relays:
        relay.stop()


@pytest.fixture
def relay(start_relay: Callable[..., ThreadRelay]) -> ThreadRelay:
    return start_relay()
