"""The documentation: the configuration reference matches the schema, and every relative link points at something."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import ROOT

from relayd.config.reference import render


def test_configuration_reference_is_generated_from_the_schema():
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == render(), ("docs/configuration.md differs from the schema: regenerate it with "
                                   "`python -m relayd.config.reference > docs/configuration.md`")
