"""Every fixture of the suite; the helpers they use live in ``support.py``.

Set ``RELAYDTEST_TIMEOUT_FACTOR`` (default 1) to multiply every timeout and
deadline of the toolkit, e.g. ``RELAYDTEST_TIMEOUT_FACTOR=3`` on a slow CI
machine (see ``support.TIMEOUT_FACTOR``).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import http.server
import logging
import secrets
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support import (HostileRelay, ErrorLog, ManualClock, NotifySocket, ProcessRelays, SealedDatabase,  # noqa: E402
                     SealedRedis, ThreadRelay, WsClient, cluster_env, make_config, pg_cluster_env, scaled, storage_key)

from relayd.clock import SYSTEM_CLOCK, Clock  # noqa: E402
from relayd.identity.signatures import select_backend  # noqa: E402
from relayd.storage.memory import MemoryStore  # noqa: E402
from relayd.storage.sqlite.store import SQLiteStore  # noqa: E402
from relayd.storage.store import Store  # noqa: E402

# In-process relays


@pytest.fixture
def start_relay() -> Iterator[Callable[..., ThreadRelay]]:
    """``start_relay(store=None, clock=None, **sections)``: in-process relays, all stopped after the test."""
    relays: list[ThreadRelay] = []

    def start(store: Any = None, clock: Clock | None = None, **sections: dict[str, Any]) -> ThreadRelay:
        relay = ThreadRelay(make_config(**sections), store, clock or SYSTEM_CLOCK)
        relays.append(relay)
        return relay

    yield start
    for relay in relays:
        relay.stop()


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def start_on(request: pytest.FixtureRequest, start_relay: Callable[..., ThreadRelay],
             tmp_path: Path) -> Callable[..., ThreadRelay]:
    """``start_on(clock=None, **sections)``: a relay on a SQLite file of this test's own, on the session's
    redis-server under a key prefix of its own, or on a database of its own on the session's PostgreSQL (the same
    file, prefix or database for every relay the test starts)."""
    from relayd.storage.backends import make_store

    def start(clock: Any = None, **sections: dict[str, Any]) -> ThreadRelay:
        storage: dict[str, Any] = {"backend": request.param, **sections.pop("storage", {})}
        if request.param == "sqlite":
            storage.setdefault("path", str(tmp_path / "relayd.db"))
        elif request.param == "postgres":
            sections["postgres"] = {"url": request.getfixturevalue("pg_database")}
        else:
            sections["redis"] = {"url": request.getfixturevalue("redis_server").url,
                                 "key_prefix": request.getfixturevalue("redis_prefix")}
        sections["storage"] = storage
        return start_relay(store=make_store(make_config(**sections)), clock=clock, **sections)
    return start


@pytest.fixture
def relay(start_relay: Callable[..., ThreadRelay]) -> ThreadRelay:
    """A relay in the default mode (mixed: a challenge first, signatures optional)."""
    return start_relay()


@pytest.fixture
def open_relay(start_relay: Callable[..., ThreadRelay]) -> ThreadRelay:
    """A relay in ``[auth] mode = open``: the seed protocol, no sign-in challenge."""
    return start_relay(auth={"mode": "open"})


@pytest.fixture
def manual_clock() -> ManualClock:
    """A clock the test moves: ``start_relay(clock=manual_clock)``, then ``manual_clock.advance(s)``."""
    return ManualClock()


@pytest.fixture(params=["default", "open"])
def flow_relay(request: pytest.FixtureRequest, start_relay: Callable[..., ThreadRelay]) -> ThreadRelay:
    """The relay a stock relayd serves, and one in the seed's open mode."""
    return start_relay() if request.param == "default" else start_relay(auth={"mode": "open"})


# One relay for a whole module (the fuzz tests): no limits, no timeouts, no pings.


@pytest.fixture(scope="module")
def fuzz_relay() -> Iterator[ThreadRelay]:
    relay = ThreadRelay(make_config(
        limits={"frames_per_s": 0, "new_queues_per_sender_per_hour": 0, "rate_limit_max_requests": 0,
                "connections_per_ip_per_s": 0, "max_connections_per_ip": 0, "auth_attempts_per_ip_per_min": 0},
        server={"auth_timeout_s": 3600, "ping_interval_s": 0}))  # pings draw from `random`: see bystanders
    yield relay
    relay.stop()


@pytest.fixture(scope="module")
def bystanders(fuzz_relay: ThreadRelay) -> Iterator[dict[str, WsClient]]:
    """Two clients (by address) on ``fuzz_relay``, signed in before any fuzzing, used only after it."""
    clients = {}
    for address in ("0x" + "a1" * 20, "0x" + "a2" * 20):
        clients[address] = fuzz_relay.ws(ping_interval=None)  # pings draw from `random`
        clients[address].auth(address)
    yield clients
    for client in clients.values():
        client.close()


@pytest.fixture
def not_a_relay_url(tmp_path: Path) -> Iterator[str]:
    """``ws://`` URL of a plain HTTP/1.0 file server (an empty directory listing, 404 elsewhere): not a relay."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield f"ws://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


# Child processes


@pytest.fixture
def process_relays() -> Iterator[ProcessRelays]:
    """``process_relays(tmp, **ProcessRelay kwargs)`` starts ``python relayd.py``; every one is stopped afterwards."""
    relays = ProcessRelays()
    yield relays
    relays.stop_all()


@pytest.fixture
def relay_cluster(tmp_path: Path, process_relays: ProcessRelays, redis_prefix: str) -> Callable[..., list[Any]]:
    """``relay_cluster(shared, count=2, **env)``: ``count`` relayd processes (``ProcessRelay``) sharing ``shared``:
    a Redis (a ``RedisServer`` or a ``RedisCluster``, under this test's key prefix) or a PostgreSQL database (its
    URL, ``[postgres] cluster = true``), node ids ``node0``, ...; ``env`` (``RELAYD_...`` variables) goes to every
    one. All are stopped after the test."""
    from redis_support import RedisCluster

    def start(shared: Any, count: int = 2, **env: str) -> list[Any]:
        env = {**getattr(shared, "env", {}), **env}  # a SealedDatabase's or SealedRedis's key file
        if isinstance(shared, str):
            return [process_relays(tmp_path / f"node{i}", env=pg_cluster_env(shared, f"node{i}", **env))
                    for i in range(count)]
        return [process_relays(tmp_path / f"node{i}", env=cluster_env(
            shared.url, redis_prefix, f"node{i}", redis_cluster=isinstance(shared, RedisCluster), **env))
            for i in range(count)]
    return start


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test using ``backplane`` runs on Redis and on PostgreSQL, and also on a sealed Redis and a sealed
    PostgreSQL database when marked ``sealed_backplane``."""
    if "backplane" in metafunc.fixturenames:
        kinds = ["redis", "postgres"]
        if metafunc.definition.get_closest_marker("sealed_backplane"):
            kinds += ["sealed-redis", "sealed-postgres"]
        metafunc.parametrize("backplane", kinds, indirect=True)


@pytest.fixture
def backplane(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """What a cluster test's instances share, for ``relay_cluster``: the session's redis-server, a PostgreSQL
    database of this test's own, or either of them with instances that seal what they store (encryption at rest,
    a key file of this test's own: a ``SealedRedis``, a ``SealedDatabase``)."""
    if request.param == "redis":
        return request.getfixturevalue("redis_server")
    if request.param == "sealed-redis":
        pytest.importorskip("cryptography", reason="encryption at rest needs pip install 'relayd[encryption]'")
        return SealedRedis(request.getfixturevalue("redis_server"), storage_key(tmp_path))
    url = request.getfixturevalue("pg_database")
    if request.param == "sealed-postgres":
        pytest.importorskip("cryptography", reason="encryption at rest needs pip install 'relayd[encryption]'")
        return SealedDatabase(url, storage_key(tmp_path))
    return url


@pytest.fixture
def hostile_relay() -> Iterator[Callable[[str], HostileRelay]]:
    relays: list[HostileRelay] = []

    def start(scenario: str) -> HostileRelay:
        relays.append(HostileRelay(scenario))
        return relays[-1]
    yield start
    for relay in relays:
        relay.stop()


# Logging


@pytest.fixture
def quiet_loggers() -> Iterator[None]:
    """Silence relayd's, websockets' and asyncio's loggers while a test provokes a server-side exception.

    On CPython 3.11, formatting a traceback (which the relay thread's logging
    does) runs ast.parse, which is not thread-safe against pytest building a
    failure report in the main thread at the same moment ("AST constructor
    recursion depth mismatch" INTERNALERROR). A level above CRITICAL on the
    parents keeps every child logger from formatting anything.
    """
    loggers = [logging.getLogger(name) for name in ("relayd", "websockets", "asyncio")]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    yield
    for logger, level in zip(loggers, saved):
        logger.setLevel(level)


@pytest.fixture
def error_log() -> Iterator[ErrorLog]:
    """ERROR records of relayd and websockets while the test runs (a crashed handler logs one)."""
    handler = ErrorLog()
    loggers = [logging.getLogger("relayd"), logging.getLogger("websockets")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo what ``configure_logging`` did to the root and relayd loggers."""
    root = logging.getLogger()
    relayd = logging.getLogger("relayd")
    handlers, root_level, relayd_level = list(root.handlers), root.level, relayd.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(root_level)
    relayd.setLevel(relayd_level)


# systemd's notify socket


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    """A notify socket at a path (in a short temporary directory when tmp_path is too long for sun_path)."""
    path = tmp_path / "notify.sock"
    short_dir = None
    if len(str(path)) > 100:  # sun_path holds 108 bytes
        short_dir = tempfile.mkdtemp(prefix="rdn")
        path = Path(short_dir) / "notify.sock"
    ns = NotifySocket(str(path), str(path))
    yield ns
    ns.close()
    if short_dir:
        shutil.rmtree(short_dir, ignore_errors=True)


@pytest.fixture
def notify_abstract() -> Iterator[NotifySocket]:
    """A notify socket in Linux's abstract namespace (NOTIFY_SOCKET=@name)."""
    name = f"relayd-test-{secrets.token_hex(8)}"
    ns = NotifySocket("\0" + name, "@" + name)
    yield ns
    ns.close()


# Backends


@pytest.fixture(params=["pure", "auto"])
def crypto_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Signature checks with both backend selection modes (pure Python, and the best one installed)."""
    yield select_backend(request.param)
    select_backend("pure")


@pytest.fixture
def no_optional_backends(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Neither coincurve nor pycryptodome nor hashlib's Keccak is importable; the test may install fakes."""
    monkeypatch.setattr(hashlib, "algorithms_available", set())
    for name in ("coincurve", "Crypto", "Cryptodome"):
        for loaded in [m for m in sys.modules if m.startswith(name + ".")]:  # imported by an earlier test
            monkeypatch.setitem(sys.modules, loaded, None)
        monkeypatch.setitem(sys.modules, name, None)
    yield monkeypatch
    select_backend("pure")


StoreBody = Callable[[Store], Any]


STORE_BACKENDS = ["memory", "sqlite", "redis", "redis-cluster", "postgres", "sealed-sqlite", "sealed-redis",
                  "sealed-postgres"]
"""Every backend must pass the store contract (Redis on one server and on a local three-master Cluster), and so
must the encryption-at-rest layer over SQLite, Redis and PostgreSQL."""


def make_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """A new, unopened store of one backend; Redis ones get a key prefix of their own."""
    if kind.startswith("sealed-"):
        from relayd.storage.sealed import SealedStore
        from relayd.storage.sealing import generate_key_file, load_keys
        key = tmp_path / "storage.key"
        if not key.exists():
            generate_key_file(str(key))
        return SealedStore(make_store(kind.removeprefix("sealed-"), request, tmp_path), load_keys([str(key)]))
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SQLiteStore(str(tmp_path / "relay.db"), commit_interval_ms=0.5)
    if kind == "postgres":
        from relayd.storage.postgres import PostgresStore
        return PostgresStore(request.getfixturevalue("pg_database"), pool_size=4)
    from relayd.storage.redis import RedisStore
    server = request.getfixturevalue("redis_cluster" if kind == "redis-cluster" else "redis_server")
    return RedisStore(server.url, key_prefix=request.getfixturevalue("redis_prefix"), cluster=kind == "redis-cluster")


@pytest.fixture(params=STORE_BACKENDS)
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[StoreBody], Any]:
    """``store_backend(body)`` runs the async ``body(store)`` against a freshly opened store, then closes it.

    ``store_backend.kind`` names the backend.
    """
    def run(body: StoreBody) -> Any:
        async def main() -> Any:
            store = make_store(request.param, request, tmp_path)
            async with asyncio.timeout(scaled(60)):  # a hang fails the test
                await store.open()
                try:
                    return await body(store)
                finally:
                    await store.close()
        return asyncio.run(main())
    run.kind = request.param  # type: ignore[attr-defined]
    return run


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


# Real PostgreSQL servers (helpers in pg_support.py), skipped only when the server binaries are missing.

@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """One PostgreSQL server (fsync off) shared by the session; tests isolate by database."""
    from pg_support import INSTALL_HINT, PgServer, pg_bindir
    if pg_bindir() is None:
        pytest.skip(INSTALL_HINT)
    server = PgServer(fsync=False)
    yield server
    server.destroy()


@pytest.fixture
def pg_database(pg_server: Any) -> str:
    """The URL of a new database of this test's own on the shared server."""
    return str(pg_server.new_database())


@pytest.fixture
def fresh_pg() -> Iterator[Any]:
    """A PostgreSQL server of this test's own (fsync on), which it may stop, restart or kill."""
    from pg_support import INSTALL_HINT, PgServer, pg_bindir
    if pg_bindir() is None:
        pytest.skip(INSTALL_HINT)
    server = PgServer()
    yield server
    server.destroy()


@pytest.fixture
def redis_prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of this test's own, so tests sharing one Redis never see each other's keys."""
    import secrets
    return f"t{secrets.token_hex(4)}:"
