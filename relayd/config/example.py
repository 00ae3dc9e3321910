"""The example configuration file, rendered from the schema (``relayd example-config``)."""

from __future__ import annotations

import dataclasses

from .schema import ENV_PREFIX, SECTIONS, env_name


def describe() -> str:
    """Render every option as a commented INI file (the source of relayd.conf.example)."""
    lines = ["# relayd configuration. Precedence: defaults < this file < environment < flags.",
             f"# Every key also has an environment variable {ENV_PREFIX}SECTION_KEY.", ""]
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]")
        for f in dataclasses.fields(cls):
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
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
