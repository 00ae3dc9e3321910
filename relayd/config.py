"""Configuration: defaults, then the INI file, then the environment, then flags.

Each section is a frozen dataclass; a field's metadata holds its help text,
bounds and the seed's legacy environment name where one exists. Every value
is validated at start-up and every error names the key it is about.
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

ENV_PREFIX = "RELAYD_"


class ConfigError(Exception):
    """A configuration problem; the message names the key."""


def opt(default: Any, help: str, *, env: str | None = None, min: float | None = None,
        max: float | None = None, choices: tuple[str, ...] | None = None, reload: bool = False) -> Any:
    """Declare one option. ``reload`` marks keys SIGHUP may change at run time."""
    meta = {"help": help, "env": env, "min": min, "max": max, "choices": choices, "reload": reload}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ServerSection:
    host: str = opt("0.0.0.0", "Interface to listen on (0.0.0.0 for all IPv4, :: for all).")
    port: int = opt(3000, "TCP port for WebSocket and REST together.", env="PORT", min=0, max=65535)
    public_url: str = opt("", "URL clients use to reach this relay (e.g. wss://relay.example.org); "
                              "signed auth binds to it. Empty: derived from host and port.")
    allowed_origins: tuple[str, ...] = opt(("*",), "CORS and WebSocket Origin allow-list: comma-separated, "
                                                   "'*' for any, port wildcard like http://localhost:*.",
                                           env="ALLOWED_ORIGINS", reload=True)
    trusted_proxies: tuple[str, ...] = opt((), "Peers (IPs or CIDRs) whose X-Forwarded-For is believed.",
                                           reload=True)
    auth_timeout_s: float = opt(10.0, "Close connections that have not authenticated within this time.",
                                min=0.1, max=3600, reload=True)
    ping_interval_s: float = opt(20.0, "WebSocket protocol ping interval (0 disables pings).", min=0, max=3600)
    ping_timeout_s: float = opt(20.0, "Close a peer that does not answer a ping within this time.",
                                min=0.1, max=3600)
    shutdown_timeout_s: float = opt(5.0, "Longest graceful shutdown before exit.", min=0.1, max=600)
    head_timeout_s: float = opt(5.0, "A new connection must send its first HTTP request head within this time.",
                                min=0.1, max=600, reload=True)
    http_idle_timeout_s: float = opt(5.0, "Close a kept-alive REST connection idle this long.",
                                     min=0.1, max=600, reload=True)
    max_requests_per_connection: int = opt(1000, "REST requests answered on one kept-alive connection "
                                           "(1: every answer closes the connection).",
                                           min=1, max=10_000_000, reload=True)
    stall_timeout_s: float = opt(30.0, "Cut a WebSocket whose send buffer stays full this long "
                                 "(its peer stopped reading).", min=1, max=3600, reload=True)


@dataclass(frozen=True)
class LimitsSection:
    rate_limit_window_ms: int = opt(60000, "REST rate-limit window per client IP.", env="RATE_LIMIT_WINDOW_MS",
                                    min=1, max=86_400_000, reload=True)
    rate_limit_max_requests: int = opt(1000, "REST writes and other requests allowed per client IP per window "
                                       "(0: unlimited).", env="RATE_LIMIT_MAX_REQUESTS", min=0, max=10_000_000,
                                       reload=True)
    rate_limit_max_reads: int = opt(30000, "REST key lookups and status reads allowed per client IP per window "
                                    "(0: unlimited).", min=0, max=100_000_000, reload=True)
    max_message_bytes: int = opt(262144, "Largest message content (bytes of the content string).",
                                 min=16, max=16 * 1024 * 1024, reload=True)
    max_body_bytes: int = opt(262144, "Largest REST request body.", min=64, max=64 * 1024 * 1024, reload=True)
    max_connections: int = opt(0, "Connections the relay holds at once (0: as many as the file-descriptor limit "
                               "allows, keeping a reserve).", min=0, max=10_000_000, reload=True)
    max_connections_per_ip: int = opt(2048, "Concurrent connections per client IP, counted from accept "
                                      "(IPv6: per /64; 0: no limit).", min=0, max=10_000_000, reload=True)
    max_pending_handshakes_per_ip: int = opt(256, "Connections per IP that have not sent their first request "
                                             "head yet (0: no limit).", min=0, max=10_000_000, reload=True)
    max_pending_handshakes: int = opt(2048, "Connections in total that have not sent their first request head "
                                      "yet (0: no limit).", min=0, max=10_000_000, reload=True)
    connections_per_ip_per_s: float = opt(100.0, "New WebSocket connections per client IP per second, "
                                          "after the burst (0: no limit).", min=0, max=1e6, reload=True)
    connection_burst_per_ip: int = opt(2000, "New WebSocket connections one client IP may open at once, "
                                       "e.g. every phone behind a carrier NAT reconnecting after a restart.",
                                       min=1, max=10_000_000, reload=True)
    auth_attempts_per_ip_per_min: int = opt(60, "Signature checks per client IP per minute (0: no limit).",
                                            min=0, max=10_000_000, reload=True)
    frames_per_s: float = opt(100.0, "Frames per connection per second (0: no limit).", min=0, max=1e6,
                              reload=True)
    frame_burst: int = opt(1000, "Frames a connection may send at once before frames_per_s applies.",
                           min=1, max=10_000_000, reload=True)
    rate_limited_close_after: int = opt(50, "Close a connection (1008) after this many rate_limited refusals "
                                        "in a row.", min=1, max=1_000_000, reload=True)
    max_preauth_frame_bytes: int = opt(4096, "Largest frame accepted before auth.", min=256, max=1 << 20,
                                       reload=True)
    max_outbound_bytes: int = opt(1 << 20, "Bytes a connection's peer may leave unread before it is cut off.",
                                  min=16384, max=1 << 30, reload=True)
    max_inbound_bytes: int = opt(1 << 20, "Bytes of received frames a connection may have waiting before "
                                 "relayd stops reading from it.", min=16384, max=1 << 30, reload=True)
    max_buffered_bytes_per_ip: int = opt(64 << 20, "Bytes all connections of one client IP may hold in buffers "
                                         "(unread, unsent, being stored); past it the largest are cut "
                                         "(0: no limit).", min=0, max=1 << 40, reload=True)
    max_buffered_bytes: int = opt(256 << 20, "Bytes all connections together may hold in buffers "
                                  "(0: no limit).", min=0, max=1 << 40, reload=True)
    new_queues_per_sender_per_hour: int = opt(1000, "Distinct offline recipients one sender may queue for "
                                              "per hour (0: no limit).", min=0, max=10_000_000, reload=True)
    new_queues_per_ip_per_hour: int = opt(20000, "Distinct offline recipients all senders of one client IP "
                                          "may queue for per hour (0: no limit).", min=0, max=100_000_000,
                                          reload=True)


@dataclass(frozen=True)
class QueueSection:
    max_offline_messages: int = opt(1000, "Messages held per offline recipient.", env="MAX_OFFLINE_MESSAGES",
                                    min=1, max=10_000_000, reload=True)
    max_offline_bytes: int = opt(16 * 1024 * 1024, "Content bytes held per offline recipient.",
                                 min=1024, max=1 << 40, reload=True)
    message_retention_hours: float = opt(168.0, "Queued messages older than this are removed.",
                                         env="MESSAGE_RETENTION_HOURS", min=0.001, max=24 * 365 * 10, reload=True)
    overflow: str = opt("reject", "When a queue is full: reject (sender gets queue_full) or drop_oldest.",
                        choices=("reject", "drop_oldest"), reload=True)
    expiry_interval_s: float = opt(60.0, "How often expired messages are removed.", min=0.05, max=86400)
    max_receipts_per_recipient: int = opt(10000, "Read receipts held per offline recipient; past it the oldest "
                                          "go.", min=1, max=10_000_000, reload=True)
    flush_delay_ms: int = opt(1500, "A session without ack gets its stored messages once it sends a frame, "
                              "shortly after a key upload for its address, or after this delay (the app "
                              "listens only after its key upload).", min=0, max=600_000, reload=True)
    flush_after_key_upload_ms: int = opt(200, "After a key upload for an address, its waiting sessions get "
                                         "their stored messages this much later.", min=0, max=600_000,
                                         reload=True)


@dataclass(frozen=True)
class StorageSection:
    backend: str = opt("sqlite", "sqlite (durable, default), redis (shared by several relayd instances; "
                                 "needs the extra relayd[redis] and [redis] url) or memory (lost on restart).",
                       choices=("sqlite", "memory", "redis"))
    path: str = opt("./relayd-data/relayd.db", "SQLite database file.")
    synchronous: str = opt("normal", "normal survives a process crash; full also survives power loss.",
                           choices=("normal", "full"))
    commit_interval_ms: float = opt(2.0, "Longest a write waits to be grouped into one commit.",
                                    min=0, max=1000)
    max_bytes: int = opt(-1, "Content bytes all offline queues together may hold; past it new offline "
                             "messages get storage_unavailable (-1: half the free disk space at start-up for "
                             "SQLite, no budget for the others; 0: no budget).", min=-1, max=1 << 50,
                         reload=True)


@dataclass(frozen=True)
class RedisSection:
    url: str = opt("redis://127.0.0.1:6379/0", "Redis server for backend = redis: redis://[:PASSWORD@]HOST:PORT/DB, "
                                               "or rediss:// for TLS. With cluster = true, any one node of the "
                                               "cluster (database 0).")
    key_prefix: str = opt("relayd:", "Prefix of every key relayd writes, so several relays or other "
                                     "applications can share one Redis. No { or }.")
    cluster: bool = opt(False, "true: url names a Redis Cluster node; keys are spread over the cluster's "
                               "masters, one address's keys in one hash slot.")
    min_replicas: int = opt(0, "Answer a write (e.g. queued) only after this many replicas have it too "
                               "(Redis WAIT); fewer within wait_timeout_ms is storage_unavailable. 0: the "
                               "primary's acknowledgement is enough.", min=0, max=64)
    wait_timeout_ms: int = opt(500, "Longest wait for min_replicas acknowledgements per write.",
                               min=1, max=60_000)
    socket_timeout_s: float = opt(2.0, "Longest wait for a Redis connection or answer; past it the operation "
                                       "is storage_unavailable, never a hang.", min=0.05, max=60)


@dataclass(frozen=True)
class ClusterSection:
    node_id: str = opt("", "This instance's name among several relayd sharing one Redis (backend = redis). "
                           "Empty: hostname:port at start.")
    heartbeat_s: float = opt(1.0, "How often this instance renews its heartbeat in Redis.", min=0.1, max=3600)
    presence_ttl_s: float = opt(4.0, "An instance whose heartbeat is older than this counts as gone: its "
                                     "sessions are offline everywhere within presence_ttl_s + heartbeat_s "
                                     "(e.g. after a kill -9). Above heartbeat_s.", min=0.2, max=86400)
    reply_timeout_ms: int = opt(1000, "Longest wait for another instance to answer an offer of a message; "
                                      "no answer counts as not delivered there (the message is stored).",
                                min=10, max=60_000)

    def resolved_node_id(self, port: int) -> str:
        """``node_id``, or hostname:port when it is empty."""
        import socket
        return self.node_id or f"{socket.gethostname()}:{port}"


@dataclass(frozen=True)
class AuthSection:
    mode: str = opt("mixed", "open: the original (no proof); mixed: signatures optional, but an address that "
                             "ever signed must always sign; signed: every session and key must be signed.",
                    choices=("open", "mixed", "signed"))
    crypto: str = opt("auto", "auto uses coincurve/pycryptodome/OpenSSL Keccak when present and self-tested; "
                              "pure forces the built-in Python code.", choices=("auto", "pure"))
    challenge_ttl_s: float = opt(120.0, "How long a sign-in nonce is valid.", min=5, max=3600)
    token_ttl_s: float = opt(86400.0, "How long a REST bearer token is valid.", min=10, max=365 * 86400)
    key_clock_skew_s: float = opt(600.0, "Signed key statements must be issued within this many seconds of now.",
                                  min=10, max=86400)


@dataclass(frozen=True)
class PrivacySection:
    expose_online_list: str = opt("auto", "GET /api/status/online/all: auto (on in open mode only), true, false.",
                                  choices=("auto", "true", "false"), reload=True)


@dataclass(frozen=True)
class MetricsSection:
    enabled: bool = opt(True, "Serve Prometheus metrics at GET /metrics.")
    listen: str = opt("", "Serve /metrics on this separate host:port instead of the main port "
                          "(e.g. 127.0.0.1:9101), so metrics need not be public.")


@dataclass(frozen=True)
class TlsSection:
    certfile: str = opt("", "PEM certificate chain: serve wss:// and https:// on the same port. "
                            "Empty: plain ws:// (put a reverse proxy in front for public use).", reload=True)
    keyfile: str = opt("", "PEM private key for certfile.", reload=True)


@dataclass(frozen=True)
class LogSection:
    level: str = opt("info", "debug, info, warning or error.", env="LOG_LEVEL",
                     choices=("debug", "info", "warning", "warn", "error", "critical"), reload=True)
    format: str = opt("text", "text or json.", choices=("text", "json"), reload=True)


SECTIONS: dict[str, type] = {
    "server": ServerSection,
    "limits": LimitsSection,
    "queue": QueueSection,
    "storage": StorageSection,
    "redis": RedisSection,
    "cluster": ClusterSection,
    "auth": AuthSection,
    "privacy": PrivacySection,
    "metrics": MetricsSection,
    "tls": TlsSection,
    "log": LogSection,
}


@dataclass(frozen=True)
class Config:
    server: ServerSection = field(default_factory=ServerSection)
    limits: LimitsSection = field(default_factory=LimitsSection)
    queue: QueueSection = field(default_factory=QueueSection)
    storage: StorageSection = field(default_factory=StorageSection)
    redis: RedisSection = field(default_factory=RedisSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    auth: AuthSection = field(default_factory=AuthSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    tls: TlsSection = field(default_factory=TlsSection)
    log: LogSection = field(default_factory=LogSection)

    @property
    def expose_online_list(self) -> bool:
        setting = self.privacy.expose_online_list
        return self.auth.mode == "open" if setting == "auto" else setting == "true"

    @property
    def max_frame_bytes(self) -> int:
        """The largest WebSocket frame accepted: the largest content twice over (JSON escapes) plus the fields."""
        return 2 * self.limits.max_message_bytes + 16384

    @property
    def effective_public_url(self) -> str:
        if self.server.public_url:
            return self.server.public_url
        host = self.server.host
        if host in ("0.0.0.0", "::", ""):
            host = "localhost"
        elif ":" in host:
            host = f"[{host}]"
        scheme = "wss" if self.tls.certfile else "ws"
        return f"{scheme}://{host}:{self.server.port}"

    def replace(self, section: str, **values: Any) -> "Config":
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **values)})


def _convert(section: str, f: dataclasses.Field, raw: Any, source: str) -> Any:
    name = f"[{section}] {f.name}"
    meta = f.metadata
    typ = f.type
    text = raw.strip() if isinstance(raw, str) else raw
    try:
        if typ == "int":
            value: Any = int(text)
        elif typ == "float":
            value = float(text)
        elif typ == "bool":
            value = configparser.ConfigParser.BOOLEAN_STATES[str(text).lower()]
        elif typ.startswith("tuple"):
            value = tuple(p.strip() for p in str(text).split(",") if p.strip())
        else:
            value = str(text)
    except (TypeError, ValueError, KeyError):
        kind = {"int": "an integer", "float": "a number", "bool": "true or false"}.get(typ, "a value")
        raise ConfigError(f"{name} (from {source}) must be {kind}, got {raw!r}") from None
    if isinstance(value, float) and value != value:  # NaN
        raise ConfigError(f"{name} (from {source}) must be a number, got {raw!r}")
    if meta["min"] is not None and value < meta["min"]:
        raise ConfigError(f"{name} (from {source}) must be at least {meta['min']}, got {raw!r}")
    if meta["max"] is not None and value > meta["max"]:
        raise ConfigError(f"{name} (from {source}) must be at most {meta['max']}, got {raw!r}")
    if meta["choices"] and value.lower() not in meta["choices"]:
        raise ConfigError(f"{name} (from {source}) must be one of {', '.join(meta['choices'])}, got {raw!r}")
    if meta["choices"]:
        value = value.lower()
    return value


def _fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def env_name(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}_{key.upper()}"


def _validate(config: Config) -> None:
    for key in ("max_outbound_bytes", "max_inbound_bytes"):
        if getattr(config.limits, key) < config.max_frame_bytes:
            raise ConfigError(f"[limits] {key} must hold the largest frame, at least {config.max_frame_bytes} "
                              f"bytes (2 x [limits] max_message_bytes + 16384), got {getattr(config.limits, key)}")
    for entry in config.server.trusted_proxies:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError(f"[server] trusted_proxies: {entry!r} is not an IP address or network") from None
    for origin in config.server.allowed_origins:
        if origin != "*" and "://" not in origin:
            raise ConfigError(f"[server] allowed_origins: {origin!r} must be '*' or a scheme://host[:port] origin")
    if config.server.public_url and not config.server.public_url.startswith(("ws://", "wss://")):
        raise ConfigError("[server] public_url must start with ws:// or wss://")
    if bool(config.tls.certfile) != bool(config.tls.keyfile):
        raise ConfigError("[tls] certfile and keyfile must be set together")
    for key in ("certfile", "keyfile"):
        path = getattr(config.tls, key)
        if path and not os.path.isfile(path):
            raise ConfigError(f"[tls] {key}: no such file {path!r}")
    _validate_redis(config)
    if config.metrics.listen:
        host, sep, port = config.metrics.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"[metrics] listen must be host:port, got {config.metrics.listen!r}")


DEFAULT_SOURCE = "default"
COMMAND_LINE_SOURCE = "command line"

Sources = dict[str, dict[str, str]]
"""``sources[section][key]``: where that key's value came from: ``"default"``, the INI file path
as given, ``"environment NAME"`` or ``"command line"``."""


def _validate_redis(config: Config) -> None:
    """The URL's scheme and shape, without echoing it (it may hold a password)."""
    url = config.redis.url
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("redis", "rediss"):
        raise ConfigError(f"[redis] url must start with redis:// or rediss:// (got scheme {scheme.lower()!r})"
                          if sep else "[redis] url must start with redis:// or rediss://")
    try:
        parsed = urllib.parse.urlsplit(url)
        parsed.port
    except ValueError as exc:
        raise ConfigError(f"[redis] url is not a valid URL: {exc}") from None
    if not parsed.hostname:
        raise ConfigError("[redis] url has no host (expected redis://HOST:PORT/DB)")
    db = parsed.path.strip("/")
    if db and not db.isdigit():
        raise ConfigError(f"[redis] url: the database must be a number after the last /, got {db!r}")
    if config.redis.cluster and db not in ("", "0"):
        raise ConfigError("[redis] url: a Redis Cluster has only database 0")
    prefix = config.redis.key_prefix
    if not prefix or any(c in prefix for c in "{} \t\r\n"):
        raise ConfigError(f"[redis] key_prefix must be non-empty, without braces or spaces, got {prefix!r}")
    node_id = config.cluster.node_id
    if node_id and (len(node_id) > 200 or any(c.isspace() or c in "{}" for c in node_id)):
        raise ConfigError(f"[cluster] node_id must be at most 200 characters, without spaces or braces, "
                          f"got {node_id!r}")
    if config.cluster.presence_ttl_s <= config.cluster.heartbeat_s:
        raise ConfigError("[cluster] presence_ttl_s must be greater than [cluster] heartbeat_s")


def load_config(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Iterable[tuple[str, str, str]] = (),
) -> Config:
    """Build the configuration from every source, in precedence order.

    ``overrides`` are ``(section, key, value)`` triples from command-line flags.
    Raises ConfigError naming the key and its source.
    """
    return load_config_with_sources(path, environ, overrides)[0]


def load_config_with_sources(
    path: str | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Iterable[tuple[str, str, str]] = (),
) -> tuple[Config, Sources]:
    """``load_config`` that also tells, for every key, which source set its value (see ``Sources``)."""
    environ = os.environ if environ is None else environ
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    sources: Sources = {s: {k: DEFAULT_SOURCE for k in _fields(s)} for s in SECTIONS}

    def apply(section: str, f: dataclasses.Field, raw: Any, source: str) -> None:
        values[section][f.name] = _convert(section, f, raw, source)
        sources[section][f.name] = source

    if path is not None:
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"),
                                           default_section="\0")
        try:
            with open(path, encoding="utf-8") as fh:
                parser.read_file(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except configparser.Error as exc:
            raise ConfigError(f"config file {path} is not valid INI: {exc}") from None
        for section in parser.sections():
            if section not in SECTIONS:
                raise ConfigError(f"{path}: unknown section [{section}]; known: {', '.join(SECTIONS)}")
            known = _fields(section)
            for key, raw in parser.items(section):
                if key not in known:
                    raise ConfigError(f"{path}: unknown key [{section}] {key}")
                apply(section, known[key], raw, path)

    for section in SECTIONS:
        for key, f in _fields(section).items():
            legacy = f.metadata["env"]
            if legacy and legacy in environ:
                apply(section, f, environ[legacy], f"environment {legacy}")
            name = env_name(section, key)
            if name in environ:
                apply(section, f, environ[name], f"environment {name}")
    for name in environ:
        if name.startswith(ENV_PREFIX) and not _env_known(name):
            raise ConfigError(f"environment {name}: unknown setting (expected {ENV_PREFIX}SECTION_KEY)")

    for section, key, raw in overrides:
        known = _fields(section) if section in SECTIONS else {}
        if key not in known:
            raise ConfigError(f"command line: unknown key [{section}] {key}")
        apply(section, known[key], raw, COMMAND_LINE_SOURCE)

    config = Config(**{s: SECTIONS[s](**values[s]) for s in SECTIONS})
    _validate(config)
    return config, sources


def _env_known(name: str) -> bool:
    return any(env_name(s, k) == name for s in SECTIONS for k in _fields(s))


def merge_reload(running: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """Take from ``new`` the keys SIGHUP may change; keep the running value of the others.

    Returns the merged configuration and the ``[section] key`` names that
    were applied and that need a restart (for the log).
    """
    merged, applied, refused = running, [], []
    for section in SECTIONS:
        changes = {}
        for f in dataclasses.fields(SECTIONS[section]):
            value = getattr(getattr(new, section), f.name)
            if getattr(getattr(running, section), f.name) != value:
                if f.metadata["reload"]:
                    changes[f.name] = value
                    applied.append(f"[{section}] {f.name}")
                else:
                    refused.append(f"[{section}] {f.name}")
        if changes:
            merged = merged.replace(section, **changes)
    return merged, applied, refused


def describe() -> str:
    """Render every option as a commented INI file (the source of relayd.conf.example)."""
    lines = ["# relayd configuration. Precedence: defaults < this file < environment < flags.",
             f"# Every key also has an environment variable {ENV_PREFIX}SECTION_KEY.", ""]
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if isinstance(default, tuple):
                default = ",".join(default)
            meta = f.metadata
            lines.append(f"# {meta['help']}")
            extra = [f"env {env_name(section, f.name)}"]
            if meta["env"]:
                extra.append(f"or {meta['env']}")
            if meta["reload"]:
                extra.append("reloadable with SIGHUP")
            lines.append(f"# ({'; '.join(extra)})")
            lines.append(f"{f.name} = {default}")
        lines.append("")
    return "\n".join(lines)
