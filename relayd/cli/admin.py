"""Commands on this machine's relay: run it, show its configuration, back up and count its database."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import sqlite3
import sys
import tempfile
import time
from typing import Any, Callable

from ..config import (
    COMMAND_LINE_SOURCE,
    DEFAULT_SOURCE,
    SECTIONS,
    Config,
    Sources,
    describe,
    load_config_with_sources,
)
from ..identity.auth import MAX_TOKENS_PER_ADDRESS
from ..ops.eventloop import loop_factory
from ..ops.logsetup import configure_logging
from ..storage.backends import MISSING_REDIS_EXTRA, make_redis_store, make_store
from ..storage.store import StoreOpenError
from .options import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    UsageError,
    flag_of,
    overrides_from,
)

log = logging.getLogger("relayd")


# Configuration commands


def load_from(args: argparse.Namespace) -> tuple[Config, Sources]:
    return load_config_with_sources(args.config, overrides=overrides_from(args))


def format_value(value: Any) -> str:
    """A value as the INI loader reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def render_config(config: Config, sources: Sources, args: argparse.Namespace) -> str:
    """Every key in INI form, with its source as a trailing comment (loadable again with --config)."""
    flags = flag_of(args)
    lines = ["# relayd: effective configuration. Sources, later wins: default < file < environment < command line."]
    for section in SECTIONS:
        lines += ["", f"[{section}]"]
        for f in dataclasses.fields(SECTIONS[section]):
            source = sources[section][f.name]
            if source == COMMAND_LINE_SOURCE:
                source = f"{source} {flags.get((section, f.name), '')}".rstrip()
            elif source not in (DEFAULT_SOURCE,) and not source.startswith("environment "):
                source = f"file {source}"
            lines.append(f"{f.name} = {format_value(getattr(getattr(config, section), f.name))}  # {source}")
    return "\n".join(lines)


def applied_sources(sources: Sources, args: argparse.Namespace) -> list[str]:
    """The sources that set at least one value, in precedence order, one line each."""
    used = {source for keys in sources.values() for source in keys.values()}
    lines = []
    if DEFAULT_SOURCE in used:
        lines.append("defaults (for every key not set below)")
    if args.config:
        lines.append(f"file {args.config}")
    env = sorted(s.removeprefix("environment ") for s in used if s.startswith("environment "))
    if env:
        lines.append(f"environment {', '.join(env)}")
    flags = flag_of(args)
    if flags:
        lines.append(f"command line {', '.join(flags.values())}")
    return lines


def cmd_run(args: argparse.Namespace) -> int:
    config, sources = load_from(args)
    factory = loop_factory(config.server.event_loop)
    if args.check_config:
        print("relayd: configuration OK; sources:")
        for line in applied_sources(sources, args):
            print(f"  {line}")
        return EXIT_OK
    configure_logging(config.log.level, config.log.format)
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(serve(config, lambda: load_from(args)[0], applied_sources(sources, args)))
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    config, sources = load_from(args)
    print(render_config(config, sources, args))
    return EXIT_OK


def cmd_example_config(args: argparse.Namespace) -> int:
    print(describe())
    return EXIT_OK


async def serve(config: Config, load: Callable[[], Config], sources: list[str]) -> int:
    from ..daemon import Daemon
    daemon = Daemon(config, make_store(config), load, sources)
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


# Database commands


def _sqlite_path(config: Config, command: str) -> str:
    if config.storage.backend != "sqlite":
        raise UsageError(f"relayd {command}: needs [storage] backend = sqlite (it is {config.storage.backend})")
    return config.storage.path


def cmd_backup(args: argparse.Namespace) -> int:
    """Back up into a temporary file beside FILE, then move it into place: FILE is never left half written."""
    from ..storage.sqlite.file import backup_database
    config, _ = load_from(args)
    source = _sqlite_path(config, "backup")
    dest = args.file
    if os.path.isdir(dest):
        raise UsageError(f"relayd backup: destination {dest} is a directory; give a file name")
    if os.path.exists(dest) and os.path.exists(source) and os.path.samefile(source, dest):
        raise UsageError(f"relayd backup: destination {dest} is the database {source} itself")
    if os.path.lexists(dest) and not args.force:
        raise UsageError(f"relayd backup: {dest} already exists; use --force to replace it")
    if not os.path.isfile(source):
        print(f"relayd backup: no database at {source} (nothing to back up to {dest})", file=sys.stderr)
        return EXIT_FAILURE
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest) or ".", prefix=f".{os.path.basename(dest)}.",
                                   suffix=".partial")
        os.close(fd)
        backup_database(source, tmp)
        if args.force:
            os.replace(tmp, dest)
        else:
            os.link(tmp, dest)  # fails if dest appeared meanwhile: never replaces without --force
    except FileExistsError:
        raise UsageError(f"relayd backup: {dest} already exists; use --force to replace it") from None
    except (StoreOpenError, OSError, sqlite3.Error) as exc:
        reason = getattr(exc, "strerror", None) or exc
        print(f"relayd backup: cannot back up {source} to {dest}: {reason}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
    print(f"relayd: backed up {source} to {dest}")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    from ..storage.sqlite.file import read_stats
    config, _ = load_from(args)
    path = _sqlite_path(config, "stats")
    try:
        stats = read_stats(path)
    except (StoreOpenError, OSError) as exc:
        print(f"relayd stats: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(stats, indent=2, sort_keys=True))
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    """``relayd migrate --from sqlite:PATH --to redis://...``: exit 0 done, 1 failed, 2 bad usage."""
    from ..storage.store import StorageUnavailable
    config = load_config_with_sources(args.config, overrides=[*overrides_from(args), ("redis", "url", args.dest)])[0]
    try:
        from ..storage.redis import migrate as migration
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "redis":
            raise
        raise UsageError(f"relayd migrate: {MISSING_REDIS_EXTRA}") from None
    try:
        path = migration.sqlite_source(args.source)
    except ValueError as exc:
        raise UsageError(f"relayd migrate: {exc}") from None

    async def run() -> dict[str, int]:
        source = migration.open_source(path)
        from ..storage.redis.store import RedisStore
        store = make_redis_store(config)
        assert isinstance(store, RedisStore)
        try:
            await store.open()
            if not store.healthy:
                raise StorageUnavailable(store.problem or "Redis is unavailable")
            retention = config.queue.message_retention_hours
            cutoff = int(time.time() * 1000 - retention * 3_600_000)
            return await migration.migrate(source, store, cutoff_ms=cutoff,
                                           ledger_ttl=migration.ledger_ttl_ms(retention),
                                           max_tokens_per_address=MAX_TOKENS_PER_ADDRESS)
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
