"""The command line's shape: exit codes, flags, subcommands, help, and flags as configuration overrides."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from .. import __version__
from ..config import (
    CONFIG_FILE_ENV,
    ENV_PREFIX,
    SECTIONS,
    Config,
    ConfigError,
    env_name,
    redacted,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = EXIT_USAGE

DEFAULT_RELAY = "ws://localhost:3000"
DEFAULT_CLIENT_TIMEOUT = 10.0

FLAG_KEYS = {"host": ("server", "host"), "port": ("server", "port"), "log_level": ("log", "level"),
             "storage": ("storage", "backend"), "db": ("storage", "path")}
CONFIG_COMMANDS = ("run", "config", "backup", "stats", "migrate", "push-test", "reseal")
"""Commands that read relayd's configuration; the others talk to a relay or need nothing."""
LISTENING_FLAGS = ("host", "port")
"""Flags that only say where the daemon listens: meaningless to the database commands."""
OFFLINE_COMMANDS = ("backup", "stats", "migrate", "reseal")


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
    parser.add_argument("--storage", default=default, help="override [storage] backend (sqlite, redis, postgres or memory)")
    parser.add_argument("--db", metavar="FILE", default=default, help="override [storage] path")
    parser.add_argument("--set", action="append", default=argparse.SUPPRESS if inherit else [],
                        metavar="SECTION.KEY=VALUE", help="override any key; may repeat")


def _client_options(parser: argparse.ArgumentParser, *, timeout_help: str | None = None) -> None:
    parser.add_argument("--relay", metavar="URL", default=DEFAULT_RELAY,
                        help=f"ws:// or wss:// URL of the relay (default {DEFAULT_RELAY})")
    parser.add_argument("--cafile", metavar="FILE",
                        help="PEM certificates to trust for wss:// instead of the system's (a self-signed or "
                             "private CA's certificate)")
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
        f"  {CONFIG_FILE_ENV}                  the configuration file when --config is not given",
        "  the original relay's names work too:",
        *legacy,
        "",
        "default paths:",
        f"  configuration file        none: built-in defaults unless --config FILE (or {CONFIG_FILE_ENV}) is given",
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
        "  relayd instances --relay wss://relay.example.org --token-file status.token",
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
    push_test = sub.add_parser("push-test", parents=[inherited], help="send a test push to a subscription",
                               description="Send one wake-up ({type: wake, queued: 0}) to SUBSCRIPTION with this "
                                           "relay's [push] configuration (VAPID key, FCM and APNs keys) and print "
                                           "the push service's answer; exit 0 when it accepted the push.")
    push_test.add_argument("--subscription", metavar="JSON|FILE", required=True,
                           help="a Web Push PushSubscription JSON, or {\"provider\": \"fcm\"|\"apns\", "
                                "\"token\": ...}, inline or in a file")
    migrate = sub.add_parser("migrate", parents=[inherited], help="copy a relay's data into another backend",
                             description="Copy a relay's data from one backend into another (SQLite, PostgreSQL, "
                                         "Redis, in any direction): the queues (in order, with their queuedAt), "
                                         "stored receipts, keys, ownership locks, key floors, tokens, the "
                                         "messageIds remembered as delivered (a resend is still answered "
                                         "'delivered'), kept message history and push subscriptions. Records are "
                                         "copied as stored: sealed ones (encryption at rest) only into a "
                                         "destination set up with the same key, or an empty one. Redis is read "
                                         "and written under [redis] key_prefix ([redis] cluster applies to a "
                                         "Redis destination; a Cluster source is found by itself). Safe to "
                                         "re-run: nothing is copied twice.")
    migrate.add_argument("--from", dest="source", metavar="SOURCE", required=True,
                         help="sqlite:PATH, a postgresql:// URL or a redis:// (rediss://) URL (read without "
                              "stopping its relay)")
    migrate.add_argument("--to", dest="dest", metavar="DEST", required=True,
                         help="sqlite:PATH, a postgresql:// URL or a redis:// (rediss://) URL")

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
    listen.add_argument("--push", metavar="JSON|FILE", help="after signing in, subscribe this address to pushes: a "
                        "Web Push PushSubscription JSON, or {\"provider\": \"fcm\"|\"apns\", \"token\": ...}, "
                        "inline or in a file")

    status = sub.add_parser("status", help="presence, queue size and key of an address",
                            description="Ask the relay's REST API about ADDRESS.")
    status.add_argument("address", metavar="ADDRESS")
    _client_options(status)

    instances = sub.add_parser("instances", help="connection counts per instance (needs [access] status_token)",
                               description="Print GET /health/instances: the connections and sessions of every "
                                           "live instance on the relay's Redis (or of the one instance).")
    instances.add_argument("--token-file", metavar="FILE", required=True,
                           help="a file holding the relay's [access] status_token")
    _client_options(instances)

    keygen = sub.add_parser("keygen", help="create a signing key (or a storage encryption key)",
                            description="Create a random private key; print it, or write it to --out "
                                        "(mode 0600, never overwriting) and print its address. With "
                                        "--storage-key, write 32 random bytes for [storage] "
                                        "encryption_key_file instead.")
    made = keygen.add_mutually_exclusive_group()
    made.add_argument("--out", metavar="FILE", help="write the key to this new file")
    made.add_argument("--storage-key", metavar="FILE",
                      help="write a storage encryption key to this new file (mode 0600)")
    reseal = sub.add_parser("reseal", parents=[inherited], help="seal stored records with the first storage key",
                            description="Rewrite every stored message and receipt not sealed with the first "
                                        "[storage] encryption_key_file (an older key's, or stored before "
                                        "encryption was on) with it; then older key files may be dropped. Run "
                                        "it with the relay stopped; safe to re-run.")

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
    """Which flag set each key given on the command line (the last one wins, as in the loader), secrets
    redacted: this is printed and logged."""
    flags = {key: f"--{flag.replace('_', '-')} {getattr(args, flag)}" for flag, key in FLAG_KEYS.items()
             if getattr(args, flag) is not None}
    for item in args.set:
        name, _, value = item.partition("=")
        section, _, key = name.partition(".")
        known = section in SECTIONS and key in {f.name for f in dataclasses.fields(SECTIONS[section])}
        flags[(section, key)] = f"--set {name}={redacted(section, key, value) if known else value}"
    return flags


