"""Command line: run the relay, check a config, or administer its database."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sqlite3
import sys
from typing import Callable, Sequence

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
    p.add_argument("command", nargs="?", default="run", choices=("run", "backup", "stats"),
                   help="run the relay (default); backup FILE: online copy of the database; "
                        "stats: counts from the database")
    p.add_argument("target", nargs="?", metavar="FILE", help="destination of backup")
    p.add_argument("--config", "-c", metavar="FILE", help="INI configuration file")
    p.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    p.add_argument("--host", help="override [server] host")
    p.add_argument("--port", help="override [server] port")
    p.add_argument("--log-level", help="override [log] level")
    p.add_argument("--storage", help="override [storage] backend (sqlite or memory)")
    p.add_argument("--db", help="override [storage] path")
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


def make_store(config: Config) -> Store:
    if config.storage.backend == "memory":
        from .storage.memory import MemoryStore
        return MemoryStore()
    from .storage.sqlite import SQLiteStore
    return SQLiteStore(config.storage.path, synchronous=config.storage.synchronous,
                       commit_interval_ms=config.storage.commit_interval_ms)


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
    from .storage.sqlite_file import backup_database, read_stats
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
    if args.command != "run":
        return admin(args.command, args.target, config)
    configure_logging(config.log.level, config.log.format)
    try:
        return asyncio.run(serve(config, load))
    except KeyboardInterrupt:
        return EXIT_OK
