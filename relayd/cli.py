"""Command line: run the relay, show its configuration, administer its database, and talk to a relay.

Exit codes: 0 ok, 1 runtime failure (unreachable relay, failed backup, error
answer, failed check), 2 usage or configuration error (bad flag, extra word,
bad value, refusing to overwrite). Argument errors never fall through to a
default: argparse refuses unknown words, and flags that would be ignored by
the chosen command are refused too.
"""

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
from typing import Any, Awaitable, Callable, Sequence

from . import __version__
from .config import (
    COMMAND_LINE_SOURCE,
    DEFAULT_SOURCE,
    ENV_PREFIX,
    SECTIONS,
    Config,
    ConfigError,
    Sources,
    describe,
    env_name,
    load_config_with_sources,
)
from .ops.logsetup import configure_logging
from .storage.store import Store, StoreOpenError

log = logging.getLogger("relayd")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = EXIT_USAGE

DEFAULT_RELAY = "ws://localhost:3000"
DEFAULT_CLIENT_TIMEOUT = 10.0

FLAG_KEYS = {"host": ("server", "host"), "port": ("server", "port"), "log_level": ("log", "level"),
             "storage": ("storage", "backend"), "db": ("storage", "path")}
CONFIG_COMMANDS = ("run", "config", "backup", "stats")
"""Commands that read relayd's configuration; the others talk to a relay or need nothing."""


class UsageError(Exception):
    """A command line that cannot be carried out as asked (exit 2); the message says why."""


# Parser


def _config_options(parser: argparse.ArgumentParser, *, inherit: bool) -> None:
    """The configuration flags. ``inherit``: on a subcommand, absent flags keep the values given before it."""
    default: Any = argparse.SUPPRESS if inherit else None
    parser.add_argument("--config", "-c", metavar="FILE", default=default, help="INI configuration file")
    parser.add_argument("--host", default=default, help="override [server] host")
    parser.add_argument("--port", default=default, help="override [server] port")
    parser.add_argument("--log-level", default=default, help="override [log] level")
    parser.add_argument("--storage", default=default, help="override [storage] backend (sqlite or memory)")
    parser.add_argument("--db", metavar="FILE", default=default, help="override [storage] path")
    parser.add_argument("--set", action="append", default=argparse.SUPPRESS if inherit else [],
                        metavar="SECTION.KEY=VALUE", help="override any key; may repeat")


def _client_options(parser: argparse.ArgumentParser, *, timeout_help: str | None = None) -> None:
    parser.add_argument("--relay", metavar="URL", default=DEFAULT_RELAY,
                        help=f"ws:// or wss:// URL of the relay (default {DEFAULT_RELAY})")
    parser.add_argument("--timeout", metavar="S", type=_positive_float, default=None,
                        help=timeout_help or f"longest wait for any answer, in seconds "
                                             f"(default {DEFAULT_CLIENT_TIMEOUT:g})")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {text!r}")
    return value


def _epilog() -> str:
    legacy = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.metadata["env"]:
                legacy.append(f"  {f.metadata['env']:<26}[{section}] {f.name}")
    default_db = Config().storage.path
    return "\n".join([
        "environment variables (override the file, overridden by flags):",
        f"  {ENV_PREFIX}<SECTION>_<KEY>      any key, e.g. {env_name('server', 'port')}=3002, "
        f"{env_name('storage', 'path')}=/var/lib/relayd/relayd.db",
        "  the original relay's names work too:",
        *legacy,
        "",
        "default paths:",
        "  configuration file        none: built-in defaults unless --config FILE is given",
        f"  database                  {default_db} (relative to the working directory; [storage] path)",
        "",
        "examples:",
        "  relayd --config /etc/relayd/relayd.conf            run the relay",
        "  relayd --check-config --config relayd.conf         validate and list the sources that applied",
        "  relayd config --config relayd.conf                 the effective configuration and each value's source",
        "  relayd example-config > relayd.conf                every key with its default and help",
        "  relayd backup /var/backups/relayd.db               online copy of the database",
        "  relayd stats --db /var/backups/relayd.db           counts from a database, read-only",
        "  relayd keygen --out alice.key                      a signing key for the client commands",
        "  relayd check --relay wss://relay.example.org       end-to-end smoke test of a deployment",
        "  relayd send --relay ws://localhost:3000 --from alice.key --to 0xADDRESS 'hello'",
        "  relayd listen --relay ws://localhost:3000 --as alice.key --ack --count 1 --timeout 60",
        "  relayd status 0xADDRESS --relay ws://localhost:3000",
    ])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relayd", description="Relay daemon for the Idena P2P messenger, "
                                "and a client to check one. Without a command, runs the relay.",
                                epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _config_options(p, inherit=False)
    p.add_argument("--check-config", action="store_true",
                   help="validate the configuration, list its sources and exit (with run)")
    p.add_argument("-V", "--version", action="version", version=f"relayd {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    inherited = argparse.ArgumentParser(add_help=False)
    _config_options(inherited, inherit=True)

    run = sub.add_parser("run", parents=[inherited], help="run the relay (the default)",
                         description="Run the relay in the foreground until SIGTERM or SIGINT.")
    run.add_argument("--check-config", action="store_true", default=argparse.SUPPRESS,
                     help="validate the configuration, list its sources and exit")
    sub.add_parser("config", parents=[inherited], help="print the effective configuration with each value's source",
                   description="Print the effective configuration as INI, each value followed by its source.")
    sub.add_parser("example-config", help="print the example configuration (every key, default and help)",
                   description="Print relayd.conf.example: every key with its default and help.")
    backup = sub.add_parser("backup", parents=[inherited], help="online copy of the SQLite database",
                            description="Copy a consistent snapshot of the database to FILE; safe while "
                                        "relayd runs. Refuses an existing FILE unless --force.")
    backup.add_argument("file", metavar="FILE", help="destination")
    backup.add_argument("--force", action="store_true", help="replace FILE if it exists")
    sub.add_parser("stats", parents=[inherited], help="counts from the database (read-only)",
                   description="Counts from the database ([storage] path, or --db FILE), opened read-only; "
                               "a database not in use (e.g. a backup) gets no -wal/-shm files.")

    send = sub.add_parser("send", help="send one message and print the relay's answer",
                          description="Sign in as --from, send TEXT to --to and print the answer frame "
                                      "(delivered, queued or error; exit 1 on error).")
    _client_options(send)
    send.add_argument("--from", dest="sender", metavar="KEYFILE|ADDRESS", required=True,
                      help="a key file (signed sign-in) or an address (plain sign-in)")
    send.add_argument("--to", metavar="ADDRESS", required=True, help="recipient address")
    send.add_argument("--message-id", metavar="ID", help="messageId (default: a new UUID)")
    send.add_argument("text", metavar="TEXT", help="the message content, sent as is (quote it)")

    listen = sub.add_parser("listen", help="print incoming frames as JSON lines",
                            description="Sign in as --as and print every incoming frame as one JSON line.")
    _client_options(listen, timeout_help="stop after this many seconds (default: run until interrupted)")
    listen.add_argument("--as", dest="identity", metavar="KEYFILE|ADDRESS", required=True,
                        help="a key file (signed sign-in) or an address (plain sign-in)")
    listen.add_argument("--ack", action="store_true", help="use acknowledged delivery and ack what is printed")
    listen.add_argument("--count", type=_positive_int, metavar="N", help="stop after N messages")

    status = sub.add_parser("status", help="presence, queue size and key of an address",
                            description="Ask the relay's REST API about ADDRESS.")
    status.add_argument("address", metavar="ADDRESS")
    _client_options(status)

    keygen = sub.add_parser("keygen", help="create a signing key",
                            description="Create a random private key; print it, or write it to --out "
                                        "(mode 0600, never overwriting) and print its address.")
    keygen.add_argument("--out", metavar="FILE", help="write the key to this new file")

    check = sub.add_parser("check", help="end-to-end smoke test of a relay",
                           description="Two throwaway identities exchange a live and a queued message, a read "
                                       "receipt and a key; one line per step with its time. Exit 0 only if "
                                       "every step passed.")
    _client_options(check, timeout_help=f"longest wait within each step (default {DEFAULT_CLIENT_TIMEOUT:g})")
    check.add_argument("--plain", action="store_true",
                       help="sign in and publish keys unsigned, as today's app does (signed by default)")
    return p


def given_config_flags(args: argparse.Namespace) -> list[str]:
    """The configuration flags present on the command line, spelled as flags."""
    given = [f"--{name.replace('_', '-')}" for name in ("config", *FLAG_KEYS)
             if getattr(args, name, None) is not None]
    return given + ["--set"] * bool(getattr(args, "set", []))


def overrides_from(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    out = [(s, k, getattr(args, flag)) for flag, (s, k) in FLAG_KEYS.items() if getattr(args, flag) is not None]
    for item in args.set:
        name, sep, value = item.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot or section not in SECTIONS:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE with SECTION one of {', '.join(SECTIONS)}")
        out.append((section, key, value))
    return out


def flag_of(args: argparse.Namespace) -> dict[tuple[str, str], str]:
    """Which flag set each key given on the command line (the last one wins, as in the loader)."""
    flags = {key: f"--{flag.replace('_', '-')} {getattr(args, flag)}" for flag, key in FLAG_KEYS.items()
             if getattr(args, flag) is not None}
    for item in args.set:
        name = item.partition("=")[0]
        section, _, key = name.partition(".")
        flags[(section, key)] = f"--set {item}"
    return flags


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
    if args.check_config:
        print("relayd: configuration OK; sources:")
        for line in applied_sources(sources, args):
            print(f"  {line}")
        return EXIT_OK
    configure_logging(config.log.level, config.log.format)
    try:
        return asyncio.run(serve(config, lambda: load_from(args)[0]))
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    config, sources = load_from(args)
    print(render_config(config, sources, args))
    return EXIT_OK


def cmd_example_config(args: argparse.Namespace) -> int:
    print(describe())
    return EXIT_OK


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


# Database commands


def _sqlite_path(config: Config, command: str) -> str:
    if config.storage.backend != "sqlite":
        raise UsageError(f"relayd {command}: needs [storage] backend = sqlite (it is {config.storage.backend})")
    return config.storage.path


def cmd_backup(args: argparse.Namespace) -> int:
    """Back up into a temporary file beside FILE, then move it into place: FILE is never left half written."""
    from .storage.sqlite_file import backup_database
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
    from .storage.sqlite_file import read_stats
    config, _ = load_from(args)
    path = _sqlite_path(config, "stats")
    try:
        stats = read_stats(path)
    except (StoreOpenError, OSError) as exc:
        print(f"relayd stats: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(stats, indent=2, sort_keys=True))
    return EXIT_OK


# Client commands


def _identity(spec: str, flag: str) -> Any:
    from .client import Identity
    from .identity.signing import KeyFileError
    try:
        return Identity.parse(spec)
    except (ValueError, KeyFileError) as exc:
        raise UsageError(f"{flag}: {exc}") from None


def _client(args: argparse.Namespace, identity: Any = None, **kw: Any) -> Any:
    from .client import RelayClient
    try:
        return RelayClient(args.relay, identity, timeout=kw.pop("timeout", None) or args.timeout
                           or DEFAULT_CLIENT_TIMEOUT, **kw)
    except ValueError as exc:
        raise UsageError(f"--relay: {exc}") from None


def _address(value: str, flag: str) -> str:
    from .addresses import is_address
    if not is_address(value):
        raise UsageError(f"{flag}: not an Idena address (0x followed by 40 hex digits): {value!r}")
    return value.lower()


def _run_client(command: str, coro: Awaitable[int]) -> int:
    from .client import ClientError

    async def guarded() -> int:
        try:
            return await coro
        except ClientError as exc:
            print(f"relayd {command}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    try:
        return asyncio.run(guarded())
    except KeyboardInterrupt:
        return EXIT_OK


def _print_json(frame: Any) -> None:
    print(json.dumps(frame, ensure_ascii=False), flush=True)


def cmd_send(args: argparse.Namespace) -> int:
    to = _address(args.to, "--to")
    client = _client(args, _identity(args.sender, "--from"))

    async def send() -> int:
        async with client:
            answer = await client.send(to, args.text, message_id=args.message_id)
        _print_json(answer)
        return EXIT_FAILURE if answer.get("type") == "error" else EXIT_OK
    return _run_client("send", send())


def cmd_listen(args: argparse.Namespace) -> int:
    from .client import ClientTimeout
    client = _client(args, _identity(args.identity, "--as"), ack=args.ack, timeout=DEFAULT_CLIENT_TIMEOUT)

    async def listen() -> int:
        messages = 0
        loop = asyncio.get_running_loop()
        deadline = None if args.timeout is None else loop.time() + args.timeout
        sign_in = await client.connect()
        print(f"relayd listen: signed in as {sign_in.address} ({'verified' if sign_in.verified else 'unverified'})",
              file=sys.stderr, flush=True)
        frames = aiter(client)
        try:
            while args.count is None or messages < args.count:
                if deadline is None:
                    frame = await anext(frames, None)
                    if frame is None:
                        print(f"relayd listen: the relay closed the connection (code {client.close_code})",
                              file=sys.stderr)
                        return EXIT_FAILURE
                else:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        frame = await client.recv(remaining)
                    except ClientTimeout:
                        break
                _print_json(frame)
                if frame.get("type") == "message":
                    messages += 1
                    if args.ack and isinstance(frame.get("messageId"), str):
                        await client.ack([frame["messageId"]])
        finally:
            await client.close()
        if args.count is not None and messages < args.count:
            print(f"relayd listen: timeout after {args.timeout:g} s with {messages} of {args.count} messages",
                  file=sys.stderr)
            return EXIT_FAILURE
        return EXIT_OK
    return _run_client("listen", listen())


def cmd_status(args: argparse.Namespace) -> int:
    address = _address(args.address, "ADDRESS")
    client = _client(args)

    async def status() -> int:
        presence = await client.status(address)
        key = await client.get_key(address)
        _print_json({"address": address, "online": presence.get("online"),
                     "queueSize": await client.queue_size(address),
                     "key": None if key is None else {k: key.get(k) for k in
                                                      ("publicKey", "verified", "updatedAt", "keyType", "issuedAt")
                                                      if k in key}})
        return EXIT_OK
    return _run_client("status", status())


def cmd_keygen(args: argparse.Namespace) -> int:
    from .identity.signing import KeyFileError, SigningKey, write_key_file
    key = SigningKey.generate()
    if args.out is None:
        _print_json({"address": key.address, "privateKey": key.hex()})
        return EXIT_OK
    if os.path.lexists(args.out):
        raise UsageError(f"relayd keygen: {args.out} already exists; not overwriting a key file")
    try:
        write_key_file(args.out, key)
    except KeyFileError as exc:
        print(f"relayd keygen: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    _print_json({"address": key.address, "keyFile": args.out})
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    client = _client(args)  # validates --relay before anything runs
    return _run_client("check", RelayCheck(client.url, args.timeout or DEFAULT_CLIENT_TIMEOUT,
                                           plain=args.plain).run())


class RelayCheck:
    """``relayd check``: an end-to-end smoke test, one printed line per step.

    Each step is a coroutine returning a short detail for its line; any
    exception fails it with its message. A step whose prerequisites did not
    pass is skipped rather than run into the same failure again.
    """

    def __init__(self, url: str, timeout: float, *, plain: bool = False,
                 out: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
        from .client import Identity, RelayClient
        self.url = url
        self.timeout = timeout
        self.plain = plain
        self.out = out
        self.marks = _marks()
        make = (lambda: Identity(Identity.generate().address)) if plain else Identity.generate
        self.a_id, self.b_id = make(), make()
        self.a = RelayClient(url, self.a_id, timeout=timeout)
        self.b = RelayClient(url, self.b_id, timeout=timeout)
        self.results: dict[str, bool] = {}

    async def run(self) -> int:
        steps: list[tuple[str, str, Callable[[], Awaitable[str]], tuple[str, ...]]] = [
            ("health", "relay answers GET /health", self.health, ()),
            ("a", "sign in A", lambda: self.sign_in(self.a), ("health",)),
            ("b", "sign in B", lambda: self.sign_in(self.b), ("health",)),
            ("key", "key round trip A -> relay -> B", self.key_round_trip, ("a", "b")),
            ("live", "live message A -> B", self.live_message, ("a", "b")),
            ("read", "read receipt B -> A", self.read_receipt, ("live",)),
            ("queued", "queued message A -> offline B", self.queued_message, ("a", "b")),
            ("cleanup", "clean up (delete A's key)", self.clean_up, ("key",)),
        ]
        self.out(f"relayd check {self.url} ({'plain' if self.plain else 'signed'} identities "
                 f"A={self.a_id.address}, B={self.b_id.address})")
        try:
            for name, title, step, needs in steps:
                missing = [n for n in needs if not self.results.get(n)]
                if missing:
                    self.results[name] = False
                    self.out(f"{self.marks[2]} {title:<34} {'':>8}  skipped: needs "
                             + ", ".join(t for n, t, _, _ in steps if n in missing))
                    continue
                started = time.perf_counter()
                try:
                    detail = await step()
                    ok = True
                except Exception as exc:  # every failure is reported on the step's line
                    detail, ok = _reason(exc), False
                ms = (time.perf_counter() - started) * 1000
                self.results[name] = ok
                self.out(f"{self.marks[0 if ok else 1]} {title:<34} {ms:>5.0f} ms  {detail}")
        finally:
            await self.a.close()
            await self.b.close()
        passed = sum(self.results.values())
        self.out(f"relayd check: {passed} of {len(steps)} steps passed")
        return EXIT_OK if passed == len(steps) else EXIT_FAILURE

    async def health(self) -> str:
        reply = await self.a.health()
        if not isinstance(reply, dict) or "status" not in reply:
            raise ValueError(f"GET /health answered {str(reply)[:200]} without a status: not a relay?")
        if reply["status"] != "ok":
            raise ValueError(f"the relay reports status {reply['status']!r}: {json.dumps(reply)[:300]}")
        storage = reply.get("storage") or {}
        return f"status ok, version {reply.get('version', '?')}, storage {storage.get('backend', '?')}"

    async def sign_in(self, client: Any) -> str:
        result = await client.connect()
        if self.plain:
            return "plain sign-in accepted (unverified)"
        if result.verified:
            return "signed challenge accepted (verified, token issued)"
        return "accepted unverified: the relay sent no challenge (open mode)"

    async def key_round_trip(self) -> str:
        from .client import random_public_key
        key = random_public_key()
        # Sign the key only where sessions are verified: an open relay evicts A's (unverified) session
        # once A's address has a signed key.
        signed = bool(self.a.sign_in and self.a.sign_in.verified)
        await self.a.put_key(key, signed=signed)
        record = await self.b.get_key(self.a_id.address, verify=signed)
        if record is None:
            raise ValueError("the key just published is not found (404)")
        if record.get("publicKey") != key:
            raise ValueError(f"B got publicKey {record.get('publicKey')!r}, A published {key!r}")
        if signed:
            return "signed, published, fetched, signature verified locally"
        return "unsigned, published, fetched" + ("" if self.plain else " (the relay verifies no sign-in: open mode)")

    async def live_message(self) -> str:
        answer = await self.a.send(self.b_id.address, "relayd-check-live")
        if answer.get("type") != "delivered":
            raise ValueError(f"expected delivered, got {json.dumps(answer)}")
        mid = answer["messageId"]
        frame = await self.b.recv_matching(lambda f: f.get("type") == "message" and f.get("messageId") == mid,
                                           "the live message at B")
        if frame.get("from") != self.a_id.address or frame.get("content") != "relayd-check-live":
            raise ValueError(f"B received a different message: {json.dumps(frame)}")
        self.live_id = mid
        return "delivered and received"

    async def read_receipt(self) -> str:
        await self.b.read_receipt(self.a_id.address, self.live_id)
        await self.a.recv_matching(lambda f: f.get("type") == "read" and f.get("messageId") == self.live_id,
                                   "the read receipt at A")
        return "received"

    async def queued_message(self) -> str:
        await self.b.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while (await self.a.status(self.b_id.address)).get("online"):
            if loop.time() > deadline:
                raise TimeoutError(f"timeout waiting for B to be reported offline after {self.timeout:g} s")
            await asyncio.sleep(0.05)
        answer = await self.a.send(self.b_id.address, "relayd-check-queued")
        if answer.get("type") != "queued":
            raise ValueError(f"expected queued, got {json.dumps(answer)}")
        mid = answer["messageId"]
        from .client import RelayClient
        self.b = RelayClient(self.url, self.b_id, ack=True, timeout=self.timeout)
        await self.b.connect()
        frame = await self.b.recv_matching(lambda f: f.get("type") == "message" and f.get("messageId") == mid,
                                           "the queued message at B after reconnecting")
        if frame.get("queued") is not True:
            raise ValueError(f"the stored message came without queued: true: {json.dumps(frame)}")
        await self.b.ack([mid])
        await self.b.recv_matching(lambda f: f.get("type") == "queue_empty", "queue_empty at B")
        return "queued, delivered on reconnect, acknowledged"

    async def clean_up(self) -> str:
        from .client import HttpError
        try:
            reply = await self.a.delete_key()
        except HttpError as exc:
            if self.plain and exc.status == 401:
                return "kept: deleting a key needs the token of a signed sign-in on this relay"
            raise
        if reply.get("success") is not True:
            raise ValueError(f"the key was not deleted: {json.dumps(reply)}")
        return "deleted"


def _reason(exc: Exception) -> str:
    from .client import ClientError
    if isinstance(exc, (ClientError, ValueError, TimeoutError)) and str(exc):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _marks() -> tuple[str, str, str]:
    """Pass, fail and skip marks, in ASCII when stdout cannot encode the symbols."""
    try:
        "✔✘–".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "+", "x", "-"
    return "✔", "✘", "–"


# Entry point

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "config": cmd_config, "example-config": cmd_example_config, "backup": cmd_backup,
    "stats": cmd_stats, "send": cmd_send, "listen": cmd_listen, "status": cmd_status, "keygen": cmd_keygen,
    "check": cmd_check,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command or "run"
    if command not in CONFIG_COMMANDS:
        misplaced = given_config_flags(args)
        if misplaced:
            parser.error(f"{', '.join(misplaced)}: configure the relay daemon and do not apply to "
                         f"`relayd {command}`")
    if args.check_config and command != "run":
        parser.error(f"--check-config goes with run only, not with `relayd {command}` "
                     f"(`relayd config` prints the configuration)")
    try:
        return COMMANDS[command](args)
    except ConfigError as exc:
        print(f"relayd: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
