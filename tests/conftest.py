"""Shared fixtures. Each server family lives in its own module under tests/fixtures/."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import pytest

# Fixture modules import each other; register them for assertion rewriting first.
pytest.register_assert_rewrite("tests.fixtures", "tests.faultproxy")

pytest_plugins = sorted(
    f"tests.fixtures.{m.name}"
    for m in pkgutil.iter_modules([str(Path(__file__).parent / "fixtures")])
)
