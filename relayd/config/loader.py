"""Loading a configuration: defaults, then the INI file, then the environment, then flags.

Every value is converted and validated as it is read, and every error names
the key and the source it came from.
"""

from __future__ import annotations

import configparser
import dataclasses
import importlib.util
import ipaddress
import os
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from typing import Any

from ..access import parse_entry
from ..extras import install_hint
from .schema import (
    CONFIG_FILE_ENV,
    ENV_PREFIX,
    IGNORED_ENV_PREFIXES,
    SECTIONS,
    Config,
    ConfigError,
    env_name,
    listen_hosts,
)


def _convert(section: str, f: dataclasses.Field, raw: Any, source: str) -> Any:
    name = f"[{section}] {f.name}"
    meta = f.metadata
    typ = str(f.type)  # the schema's annotations are strings (``from __future__ import annotations``)
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


def _validate(config: Config) -> None:
    for key in ("max_outbound_bytes", "max_inbound_bytes"):
        if getattr(config.limits, key) < config.max_frame_bytes:
            raise ConfigError(f"[limits] {key} must hold the largest frame, at least {config.max_frame_bytes} "
                              f"bytes (2 x [limits] max_message_bytes + 16384), got {getattr(config.limits, key)}")
    _validate_hosts(config.server.host, config.server.port)
    for entry in config.access.deny:
        try:
            parse_entry(entry)
        except ValueError as exc:
            raise ConfigError(f"[access] deny: {exc}") from None
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
    _validate_postgres(config)
    _validate_push(config)
    if config.metrics.listen:
        host, sep, port = config.metrics.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"[metrics] listen must be host:port, got {config.metrics.listen!r}")


_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def _validate_hosts(hosts: tuple[str, ...], port: int) -> None:
    """Each host an IP address or a host name (no port, no brackets); port 0 only for one socket."""
    if not hosts:
        raise ConfigError("[server] host must name at least one address (0.0.0.0 for every IPv4 interface, "
                          ":: for every interface)")
    for host in hosts:
        try:
            ipaddress.ip_address(host)
            continue
        except ValueError:
            pass
        if host.startswith("[") or host.count(":") == 1:
            raise ConfigError(f"[server] host: {host!r} must be an address without brackets or port "
                              f"(the port is [server] port)")
        if not _HOSTNAME.fullmatch(host):
            raise ConfigError(f"[server] host: {host!r} is not an IP address or host name")
    if port == 0 and hosts != ("::",) and len(listen_hosts(hosts)) > 1:
        raise ConfigError("[server] port = 0 (any free port) needs a single host: each host would get its own "
                          "port")


DEFAULT_SOURCE = "default"
COMMAND_LINE_SOURCE = "command line"

Sources = dict[str, dict[str, str]]
"""``sources[section][key]``: where that key's value came from: ``"default"``, the INI file path
as given, ``"environment NAME"`` or ``"command line"``."""


def _validate_postgres(config: Config) -> None:
    """The URL's scheme (empty: libpq's PG* variables), without echoing it (it may hold a password)."""
    url = config.postgres.url
    scheme, sep, _ = url.partition("://")
    if url and (not sep or scheme.lower() not in ("postgresql", "postgres")):
        raise ConfigError("[postgres] url must start with postgresql:// (or be empty: libpq's PG* variables)")
    if config.postgres.pool_min > config.postgres.pool_size:
        raise ConfigError(f"[postgres] pool_min ({config.postgres.pool_min}) must not exceed pool_size "
                          f"({config.postgres.pool_size})")


MISSING_PUSH_EXTRA = f"push notifications need the optional extra push: {install_hint('push')}"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _validate_push(config: Config) -> None:
    push = config.push
    if not push.enabled:
        return
    if not _importable("cryptography"):
        raise ConfigError(f"[push] enabled = true: {MISSING_PUSH_EXTRA} (cryptography is missing)")
    if not push.vapid_subject.startswith(("mailto:", "https://")) or len(push.vapid_subject) < 10:
        raise ConfigError("[push] vapid_subject must be a mailto: or https: URL where push services can reach the "
                          f"operator (RFC 8292), got {push.vapid_subject!r}")
    if bool(push.fcm_project) != bool(push.fcm_key_file):
        raise ConfigError("[push] fcm_project and fcm_key_file must be set together")
    apns = (push.apns_key_file, push.apns_key_id, push.apns_team_id, push.apns_topic)
    if any(apns) and not all(apns):
        raise ConfigError("[push] apns_key_file, apns_key_id, apns_team_id and apns_topic must be set together")
    if push.apns_key_file and not _importable("h2"):
        raise ConfigError(f"[push] APNs: {MISSING_PUSH_EXTRA} (h2 is missing)")
    for key in ("fcm_key_file", "apns_key_file", "ca_file"):
        path = getattr(push, key)
        if path and not os.path.isfile(path):
            raise ConfigError(f"[push] {key}: no such file {path!r}")
    for key in ("fcm_url", "apns_url"):
        if not getattr(push, key).startswith("https://"):
            raise ConfigError(f"[push] {key} must be an https:// URL")


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
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {path} is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at "
                              f"offset {exc.start}") from None
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
        if name.startswith(ENV_PREFIX) and not name.startswith(IGNORED_ENV_PREFIXES) and not _env_known(name):
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
    return name == CONFIG_FILE_ENV or any(env_name(s, k) == name for s in SECTIONS for k in _fields(s))
