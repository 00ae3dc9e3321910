"""Command line: run the relay, check a config, or administer its database."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sqlite3
import sys
import time
from typing import Any, Callable, Sequence

from . import __version__
from .config import SECTIONS, Config, ConfigError, load_config
from .ops.logsetup import configure_logging
from .storage.store import Store, StoreOpenError

log = logging.getLogger("relayd")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

FLAG_KEYS = {"host": ("server", "host"), "port": ("server", "port"), "log_level": ("log", "level"),
             "storage": ("storage", "backend"), "db": ("storage", "path")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relayd", description="Relay daemon for the Idena P2P messenger.")
    p.add_argument("command", nargs="?", default="run", choices=("run", "backup", "stats", "migrate"),
                   help="run the relay (default); backup FILE: online copy of the database; "
                        "stats: counts from the database; migrate --from sqlite:PATH --to redis://...: "
                        "copy a SQLite relay's queues, receipts, keys and locks into Redis (safe to re-run)")
    p.add_argument("target", nargs="?", metavar="FILE", help="destination of backup")
    p.add_argument("--config", "-c", metavar="FILE", help="INI configuration file")
    p.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    p.add_argument("--host", help="override [server] host")
    p.add_argument("--port", help="override [server] port")
    p.add_argument("--log-level", help="override [log] level")
    p.add_argument("--storage", help="override [storage] backend (sqlite, redis or memory)")
    p.add_argument("--db", help="override [storage] path")
    p.add_argument("--from", dest="source", metavar="sqlite:PATH", help="migrate: the SQLite database to copy")
    p.add_argument("--to", dest="dest", metavar="URL", help="migrate: the Redis URL to copy into "
                                                             "(prefix and cluster from [redis])")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any key; may repeat")
    p.add_argument("--version", action="version", version=f"relayd {__version__}")
    return p


def overrides_from(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    out = [(s, k, getattr(args, flag)) for flag, (s, k) in FLAG_KEYS.items() if getattr(args, flag) is not None]
    for item in args.set:
        name, sep, value = item.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot or section not in SECTIONS:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE with SECTION one of {', '.join(SECTIONS)}")
        out.append((section, key, value))
    return out


MISSING_REDIS_EXTRA = "the Redis backend needs the optional extra: pip install 'relayd[redis]'"


def make_store(config: Config) -> Store:
    """The configured backend, not yet opened; exits 2 when backend = redis lacks its extra."""
    if config.storage.backend == "memory":
        from .storage.memory import MemoryStore
        return MemoryStore()
    if config.storage.backend == "redis":
        return make_redis_store(config)
    from .storage.sqlite import SQLiteStore
    return SQLiteStore(config.storage.path, synchronous=config.storage.synchronous,
                       commit_interval_ms=config.storage.commit_interval_ms)


def make_redis_store(config: Config) -> Any:
    try:
        from .storage.redis import RedisStore
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "redis":
            raise
        print(f"relayd: {MISSING_REDIS_EXTRA}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
    r = config.redis
    return RedisStore(r.url, key_prefix=r.key_prefix, cluster=r.cluster,
                      node_id=config.cluster.resolved_node_id(config.server.port),
                      socket_timeout_s=r.socket_timeout_s, min_replicas=r.min_replicas,
                      wait_timeout_ms=r.wait_timeout_ms)


async def serve(config: Config, load: Callable[[], Config]) -> int:
    from .daemon import Daemon
    daemon = Daemon(config, make_store(config), load)
    try:
        await daemon.start()
    except StoreOpenError as exc:
        log.error("cannot open storage: %s", exc)
        return EXIT_CONFIG
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.server.host, config.server.port, exc.strerror or exc)
        await daemon.server.store.close()
        return EXIT_FAILURE
    await daemon.run()
    return EXIT_OK


def admin(command: str, target: str | None, config: Config) -> int:
    """Offline commands on the SQLite database; safe while relayd runs."""
    if config.storage.backend != "sqlite":
        print(f"relayd {command}: needs [storage] backend = sqlite", file=sys.stderr)
        return EXIT_CONFIG
    from .storage.sqlite import backup_database, read_stats
    try:
        if command == "backup":
            if not target:
                print("relayd backup: missing destination FILE", file=sys.stderr)
                return EXIT_CONFIG
            backup_database(config.storage.path, target)
            print(f"relayd: backed up {config.storage.path} to {target}")
        else:
            print(json.dumps(read_stats(config.storage.path), indent=2, sort_keys=True))
    except (StoreOpenError, OSError, sqlite3.Error) as exc:
        print(f"relayd {command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def migrate_command(args: argparse.Namespace) -> int:
    """``relayd migrate --from sqlite:PATH --to redis://...``: exit 0 done, 1 failed, 2 bad usage."""
    if not args.source or not args.dest:
        print("relayd migrate: needs --from sqlite:PATH and --to redis://HOST:PORT/DB", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load_config(args.config, overrides=[*overrides_from(args), ("redis", "url", args.dest)])
        from .storage.redis import migrate as migration
        path = migration.sqlite_source(args.source)
    except (ConfigError, ValueError) as exc:
        print(f"relayd migrate: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "redis":
            raise
        print(f"relayd migrate: {MISSING_REDIS_EXTRA}", file=sys.stderr)
        return EXIT_CONFIG
    from .storage.store import StorageUnavailable

    async def run() -> dict[str, int]:
        source = migration.open_source(path)
        store = make_redis_store(config)
        try:
            await store.open()
            if not store.healthy:
                raise StorageUnavailable(store.problem or "Redis is unavailable")
            retention = config.queue.message_retention_hours
            cutoff = int(time.time() * 1000 - retention * 3_600_000)
            return await migration.migrate(source, store, cutoff_ms=cutoff,
                                           ledger_ttl=migration.ledger_ttl_ms(retention))
        finally:
            source.close()
            await store.close()
    try:
        counts = asyncio.run(run())
    except (StoreOpenError, StorageUnavailable, OSError, sqlite3.Error) as exc:
        print(f"relayd migrate: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(counts, indent=2))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def load() -> Config:
        return load_config(args.config, overrides=overrides_from(args))

    try:
        config = load()
    except ConfigError as exc:
        print(f"relayd: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(f"relayd: configuration OK ({args.config or 'defaults'})")
        return EXIT_OK
    if args.command == "migrate":
        return migrate_command(args)
    if args.command != "run":
        return admin(args.command, args.target, config)
    configure_logging(config.log.level, config.log.format)
    try:
        return asyncio.run(serve(config, load))
    except KeyboardInterrupt:
        return EXIT_OK
