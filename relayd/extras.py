"""How to add an optional extra (``redis``, ``push``, ...) to the environment relayd runs in.

relayd is on no package index, so the command names the checkout (this one when relayd runs from a checkout).
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["install_hint"]


def install_hint(extra: str) -> str:
    """The pip command that adds ``extra`` to this very environment."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():
        return f"{sys.executable} -m pip install '{checkout}[{extra}]'"
    return f"{sys.executable} -m pip install 'CHECKOUT[{extra}]' (CHECKOUT: the directory of your relayd checkout)"
