"""The contracts between layers are typed ``Protocol``s: mypy holds them on all of ``relayd/`` (strictly on the
protocol, the cluster and storage, as ``[tool.mypy]`` in pyproject.toml says)."""

from __future__ import annotations

import subprocess
import sys

from support import ROOT, scaled


def test_mypy_passes_on_relayd() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "relayd"], cwd=ROOT,
                            capture_output=True, text=True, timeout=scaled(600))
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
