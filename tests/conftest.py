"""Shared fixtures. Each server family lives in its own module under tests/fixtures/,
a thin pytest layer over harness/servers/ (which benchmarks import too)."""

from __future__ import annotations

import os
import pkgutil
from pathlib import Path

import pytest

# Loopback only: no credential chain may reach for a cloud's instance metadata address
# (169.254.169.254) when a test gives it no credentials. botocore's IMDS provider is
# off; google-auth's metadata server and azure-identity's managed identity endpoint
# (IMDS, moved by AZURE_POD_IDENTITY_AUTHORITY_HOST) are a closed loopback port.
# Tests of those providers point them at their stubs themselves. Set before anything
# imports google.auth (it reads GCE_METADATA_HOST once) and inherited by every process
# a test starts.
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["GCE_METADATA_HOST"] = "127.0.0.1:9"
os.environ["GCE_METADATA_IP"] = "127.0.0.1:9"
os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = "http://127.0.0.1:9"
for _var in ("IDENTITY_ENDPOINT", "IMDS_ENDPOINT", "MSI_ENDPOINT"):  # App Service, Arc
    os.environ.pop(_var, None)

# Fixture and helper modules are imported by other modules; register them for
# assertion rewriting before anything imports them.
pytest.register_assert_rewrite("harness", "tests.fixtures", "tests.ckpt.helpers")

pytest_plugins = sorted(
    f"tests.fixtures.{m.name}"
    for m in pkgutil.iter_modules([str(Path(__file__).parent / "fixtures")])
)
