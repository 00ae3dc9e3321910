"""What a SIGHUP may change in a running relay."""

from __future__ import annotations

import dataclasses

from .schema import SECTIONS, Config


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
