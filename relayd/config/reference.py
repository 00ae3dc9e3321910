"""The configuration reference, docs/configuration.md, rendered from the schema so it cannot drift from it.

``python -m relayd.config.reference > docs/configuration.md`` writes it; a test compares the committed file
with ``render()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .schema import CONFIG_FILE_ENV, ENV_PREFIX, SECTIONS, env_name

_SECTION_ROLES = {
    "server": "the listening socket, public URL, proxies, timeouts and the status page",
    "limits": "per-IP, per-connection and per-sender budgets that keep one client from taking the relay down",
    "queue": "offline queues: their size, retention, overflow and when a session gets its backlog",
    "storage": "the storage backend, the SQLite file and its durability, the storage budget",
    "redis": "the Redis server of `backend = redis`",
    "cluster": "one instance among several on one Redis or PostgreSQL database",
    "auth": "sign-in modes and signature checks",
    "privacy": "what the REST API may reveal",
    "metrics": "Prometheus metrics",
    "tls": "serving wss:// and https:// without a reverse proxy",
    "access": "the operator's deny list and the token of the per-instance counts",
    "log": "log level, format and the activity line",
}


def _default(f: "dataclasses.Field[Any]") -> str:
    value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    if isinstance(value, tuple):
        value = ",".join(value)
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"`{value}`" if value != "" else "(empty)"


def _cell(text: str) -> str:
    """Help text as one table cell: no pipe, newline, emphasis or HTML of its own."""
    for raw, escaped in (("|", "\\|"), ("*", "\\*"), ("<", "&lt;"), ("\n", " ")):
        text = text.replace(raw, escaped)
    return text


def _number(value: float) -> str:
    return f"{int(value):,}" if value == int(value) else f"{value:g}"


def _bounds(meta: dict[str, Any]) -> str:
    if meta["choices"]:
        return "one of " + ", ".join(f"`{c}`" for c in meta["choices"])
    low, high = meta["min"], meta["max"]
    if low is None and high is None:
        return ""
    if low is not None and high is not None:
        return f"{_number(low)} to {_number(high)}"
    return f"at least {_number(low)}" if low is not None else f"at most {_number(high)}"


def render() -> str:
    """The whole reference as Markdown: one table per section, every key with its default and environment name."""
    out = [
        "# Configuration reference",
        "",
        "For operators looking up one setting. Generated from `relayd/config/schema.py` by",
        "`python -m relayd.config.reference > docs/configuration.md`: do not edit by hand (a test fails when this",
        "file and the schema disagree). How configuration is loaded, checked and reloaded is in",
        "[operating.md](operating.md#configuration); `relayd example-config` prints the same keys as an INI file",
        "([relayd.conf.example](../relayd.conf.example)).",
        "",
        "Sources, each overriding the one before: built-in defaults, the INI file (`--config FILE`, or the file",
        f"named by `{CONFIG_FILE_ENV}` for the commands that read one), environment variables",
        f"(`{ENV_PREFIX}<SECTION>_<KEY>`, and the original relay's names where listed), command-line flags",
        "(`--host`, `--port`, `--log-level`, `--storage`, `--db`, `--set SECTION.KEY=VALUE`). \"SIGHUP\" marks keys",
        "a reload (`systemctl reload relayd`) changes without a restart; the others need one.",
        "",
        "| section | what it sets |",
        "|---|---|",
    ]
    out += [f"| [`[{name}]`](#{name}) | {_SECTION_ROLES.get(name, '')} |" for name in SECTIONS]
    for name, cls in SECTIONS.items():
        out += ["", f"## {name}", "", f"`[{name}]`: {_SECTION_ROLES.get(name, '')}.", "",
                "| key | default | environment | SIGHUP | meaning |", "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            meta = f.metadata
            env = f"`{env_name(name, f.name)}`" + (f", `{meta['env']}`" if meta["env"] else "")
            bounds = _bounds(dict(meta))
            meaning = _cell(meta["help"]) + (f" ({bounds})" if bounds else "")
            default = _default(f).replace("|", "\\|")
            out.append(f"| `{f.name}` | {default} | {env} | {'yes' if meta['reload'] else 'no'} "
                       f"| {meaning} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
