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


# Real Redis servers (helpers in redis_support.py). A missing redis-server fails the test with the
# apt-get command to run; it is never skipped.

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One redis-server (no persistence) shared by the session; tests isolate by key prefix."""
    from redis_support import RedisServer
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[Any]:
    """A redis-server of this test's own, which it may stop, restart or break."""
    from redis_support import RedisServer
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[Any]:
    """A redis-server of this test's own with appendonly yes and appendfsync always."""
    from redis_support import RedisServer
    server = RedisServer(tmp_path / "redis-aof", appendonly=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A local three-master Redis Cluster on loopback ports, shared by the session."""
    from redis_support import RedisCluster
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own, so tests sharing one Redis never see each other's keys."""
    import secrets
    return f"t{secrets.token_hex(4)}:"
