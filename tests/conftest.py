"""Shared fixtures. Each server family lives in its own module under tests/fixtures/,
a thin pytest layer over harness/servers/ (which benchmarks import too)."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import pytest

# Fixture and helper modules are imported by other modules; register them for
# assertion rewriting before anything imports them.
pytest.register_assert_rewrite("harness", "tests.fixtures", "tests.ckpt.helpers")

pytest_plugins = sorted(
    f"tests.fixtures.{m.name}"
    for m in pkgutil.iter_modules([str(Path(__file__).parent / "fixtures")])
)
