"""Secrets out of anything printed or logged: the one place that knows how to hide a configured secret.

A key declared with ``secret=True`` in the schema is shown redacted wherever a
value is printed (``relayd config``, logs): a URL keeps its scheme, user, host,
port and path and loses its password; any other secret shows only whether it is set.
"""

from __future__ import annotations

import dataclasses
import urllib.parse
from typing import Any

from .schema import SECTIONS

REDACTED = "***"


def redact_url(url: str) -> str:
    """``url`` with its password (in the user part, or a libpq ``password=`` parameter) and nothing else replaced
    by ``***``; unparseable URLs are hidden whole."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return REDACTED
    query = "&".join(f"password={REDACTED}" if pair.lower().startswith("password=") else pair
                     for pair in parts.query.split("&")) if parts.query else ""
    if password is None and "@" not in parts.netloc:
        return urllib.parse.urlunsplit(parts._replace(query=query))
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    hidden = f"{user}:{REDACTED}" if password is not None else user
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{hidden}@{hostport}", query=query))


def is_secret(section: str, key: str) -> bool:
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
    return bool(fields[key].metadata.get("secret"))


def redacted(section: str, key: str, value: Any) -> Any:
    """``value`` as it may be shown: unchanged unless ``[section] key`` is a secret."""
    if not is_secret(section, key) or not value:
        return value
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return REDACTED
