"""Shared fixtures. Each server family lives in its own module under tests/fixtures/."""

from __future__ import annotations

import pkgutil
from pathlib import Path

pytest_plugins = sorted(
    f"tests.fixtures.{m.name}"
    for m in pkgutil.iter_modules([str(Path(__file__).parent / "fixtures")])
)
