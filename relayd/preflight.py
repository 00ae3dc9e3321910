"""What a start checks before it opens a socket, so that ``--check-config`` says OK only where a start would
get as far as listening: the storage backend can be built (the Redis extra is installed), the SQLite file is
relayd's and writable, the TLS certificate and key load and match, every host name resolves."""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

from .config import Config, ConfigError


def preflight(config: Config) -> list[str]:
    """Raise ConfigError for what would stop a start; return one line per check that passed."""
    from .storage.backends import make_store
    from .storage.store import StoreOpenError
    done = []
    make_store(config)  # ConfigError without the Redis extra
    if config.storage.backend == "sqlite":
        try:
            _check_database(Path(config.storage.path))
        except StoreOpenError as exc:
            raise ConfigError(f"[storage] path: {exc}") from None
        done.append(f"database {config.storage.path}: usable")
    else:
        done.append(f"storage backend {config.storage.backend}: available")
    if config.tls.certfile:
        from .daemon import make_ssl_context
        try:
            make_ssl_context(config)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"[tls] certfile/keyfile do not load: {getattr(exc, 'strerror', None) or exc}") \
                from None
        done.append("TLS certificate and key: load and match")
    for host in config.server.host:
        try:
            socket.getaddrinfo(host, config.server.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except (socket.gaierror, UnicodeError) as exc:
            raise ConfigError(f"[server] host: {host!r} does not resolve: {getattr(exc, 'strerror', None) or exc}") \
                from None
    done.append(f"listen on {','.join(config.server.host)} port {config.server.port}: addresses resolve "
                f"(not bound: the port may still be taken)")
    return done


def _check_database(path: Path) -> None:
    """The same checks the SQLite store makes when it opens, without creating or writing anything."""
    from .storage.sqlite.file import inspect, permission_hint
    from .storage.store import StoreOpenError
    inspect(path)
    directory = path.parent
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    if not directory.is_dir():
        raise StoreOpenError(f"cannot create directory {path.parent}: {directory} is not a directory")
    for place in (path, directory):
        if place.exists() and not os.access(place, os.W_OK):
            raise StoreOpenError(f"database {path} is not writable: relayd needs to write "
                                 f"{'it' if place == path else f'the directory {place}'}; "
                                 f"{permission_hint(directory)}")
