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
    redacted,
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
    """Every key in INI form, with its source as a trailing comment (loadable again with --config, once the
    redacted secrets are filled in)."""
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
            value = getattr(getattr(config, section), f.name)
            shown = redacted(section, f.name, value)
            note = ", secret redacted" if shown != value else ""
            lines.append(f"{f.name} = {format_value(shown)}  # {source}{note}")
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
        from ..preflight import preflight
        checked = preflight(config)
        print("relayd: configuration OK; sources:")
        for line in applied_sources(sources, args):
            print(f"  {line}")
        print("checked as a start would, short of opening sockets:")
        for line in checked:
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
        hint = ""
        if isinstance(exc, PermissionError) and 0 < config.server.port < 1024:
            hint = ("; a port below 1024 needs CAP_NET_BIND_SERVICE (under systemd: the drop-in "
                    "deploy/relayd-low-port.conf), or use a port from 1024 up behind a reverse proxy")
        log.error("cannot listen on %s port %s: %s%s", ",".join(config.server.host), config.server.port,
                  exc.strerror or exc, hint)
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
    """``relayd migrate --from SOURCE --to DEST``: exit 0 done, 1 failed, 2 bad usage.

    SOURCE and DEST are each ``sqlite:PATH``, a ``postgresql://`` URL or a ``redis://``/``rediss://`` URL (Redis
    under ``[redis] key_prefix``). Into Redis the copy goes with Redis's own ledger, into the others through the
    store contract.
    """
    from ..storage.snapshot import open_snapshot, parse_source
    try:
        parse_source(args.source)
    except ValueError as exc:
        raise UsageError(f"relayd migrate: {exc}") from None
    if args.dest == args.source:
        raise UsageError("relayd migrate: --from and --to name the same database")
    if args.dest.startswith(("postgresql://", "postgres://", "sqlite:")):
        return _migrate_into_store(args, open_snapshot)
    return _migrate_into_redis(args, open_snapshot)


def _print_counts(run: Callable[[], Any]) -> int:
    from ..storage.store import StorageUnavailable
    try:
        counts = asyncio.run(run())
    except (StoreOpenError, StorageUnavailable, OSError, sqlite3.Error) as exc:
        print(f"relayd migrate: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(counts, indent=2))
    return EXIT_OK


def _cutoff_ms(config: Config) -> int:
    return int(time.time() * 1000 - config.queue.message_retention_hours * 3_600_000)


def _migrate_into_store(args: argparse.Namespace, open_snapshot: Callable[..., Any]) -> int:
    from ..storage.copy import MigrationTarget, copy_into
    from ..storage.store import StorageUnavailable
    if args.dest.startswith("sqlite:"):
        path = args.dest.partition(":")[2]
        if not path:
            raise UsageError("relayd migrate: --to sqlite:PATH needs a path")
        overrides = [("storage", "backend", "sqlite"), ("storage", "path", path)]
    else:
        overrides = [("storage", "backend", "postgres"), ("postgres", "url", args.dest)]
    config = load_config_with_sources(args.config, overrides=[*overrides_from(args), *overrides])[0]
    # records are copied as stored: sealed ones stay sealed under the same key(s), the check record with them
    store = make_store(dataclasses.replace(config, storage=dataclasses.replace(config.storage,
                                                                               encryption_key_file=())))

    async def run() -> dict[str, int]:
        snapshot = await open_snapshot(args.source, key_prefix=config.redis.key_prefix)
        try:
            await store.open()
            try:
                if not store.healthy:
                    raise StorageUnavailable(store.problem or "the destination is unavailable")
                target: MigrationTarget = store  # type: ignore[assignment]  # SQLiteStore or PostgresStore
                return await copy_into(snapshot, target, cutoff_ms=_cutoff_ms(config),
                                       max_tokens_per_address=MAX_TOKENS_PER_ADDRESS)
            finally:
                await store.close()
        finally:
            await snapshot.close()
    return _print_counts(run)


def _migrate_into_redis(args: argparse.Namespace, open_snapshot: Callable[..., Any]) -> int:
    from ..storage.store import StorageUnavailable
    config = load_config_with_sources(args.config, overrides=[*overrides_from(args), ("redis", "url", args.dest)])[0]
    try:
        from ..storage.redis import migrate as migration
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "redis":
            raise
        raise UsageError(f"relayd migrate: {MISSING_REDIS_EXTRA}") from None

    async def run() -> dict[str, int]:
        source = await open_snapshot(args.source, key_prefix=config.redis.key_prefix)
        from ..storage.redis.store import RedisStore
        store = make_redis_store(config)
        assert isinstance(store, RedisStore)
        try:
            await store.open()
            if not store.healthy:
                raise StorageUnavailable(store.problem or "Redis is unavailable")
            retention = config.queue.message_retention_hours
            return await migration.migrate(source, store, cutoff_ms=_cutoff_ms(config),
                                           ledger_ttl=migration.ledger_ttl_ms(retention),
                                           max_tokens_per_address=MAX_TOKENS_PER_ADDRESS)
        finally:
            await source.close()
            await store.close()
    return _print_counts(run)


def cmd_reseal(args: argparse.Namespace) -> int:
    """``relayd reseal``: exit 0 done (counts printed), 1 failed, 2 no key configured."""
    from ..storage.sealed import SealedStore
    from ..storage.store import StorageUnavailable
    config, _ = load_from(args)
    if not config.storage.encryption_key_file:
        raise UsageError("relayd reseal: needs [storage] encryption_key_file (the key to seal with first)")
    store = make_store(config)
    assert isinstance(store, SealedStore)
    try:
        counts = asyncio.run(store.reseal())
    except (StoreOpenError, StorageUnavailable, OSError, sqlite3.Error) as exc:
        print(f"relayd reseal: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(counts, indent=2))
    return EXIT_FAILURE if counts["unreadable"] else EXIT_OK
