"""Faults 1-3, shortened: kill -9 of the daemon, the store going away, a faulty network.

The full-length forms (30 kill cycles, a 30 s outage, hundreds of requests
through the proxy) run in ``make reliability`` (bench/reliability.py) with the
same scenario code (harness/reliability/).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.reliability import scenario_kill9, scenario_proxy_faults, scenario_server_down

pytestmark = pytest.mark.timeout(240)


def test_kill9_cycles_lose_nothing(tmp_path: Path) -> None:
    r = scenario_kill9(tmp_path, cycles=5, kill_after=(0.4, 2.5), max_files=25)
    assert r["files"] >= 10, r
    assert r["lost"] == 0, r
    assert r["corrupted"] == 0, r
    assert r["reuploaded_after_verify"] == 0, r
    assert r["bad_pointers"] == 0, r
    assert r["verified_before_last_kill"] > 0, r  # the kills did land mid-stream


def test_store_down_mid_upload(tmp_path: Path) -> None:
    r = scenario_server_down(tmp_path, size=24 << 20, down_seconds=3.0)
    assert r["lost"] == 0 and r["corrupted"] == 0, r
    assert r["down_seconds"] >= 3.0, r
    assert r["retries"] > 0, r  # the outage was seen
    assert r["stopped_after_bytes"] < r["bytes"], r  # stopped mid-upload
    # The training loop kept stepping (and saving) while the store was away.
    assert r["steps_during_outage"] >= 20, r
    assert r["max_step_gap_s"] < 2.0, r
    assert r["bad_pointers"] == 0, r


def test_proxy_faults_lose_nothing(tmp_path: Path) -> None:
    r = scenario_proxy_faults(tmp_path, files=12, seed=5)
    assert r["lost"] == 0 and r["corrupted"] == 0, r
    faults = r["resets"] + r["slowdowns"] + r["stalls"]
    assert faults > 0, r
    # 503s and stalls (client timeouts) are always retried by the store's RetryPolicy;
    # a reset on a kept-alive connection may be re-sent once by the S3 backend itself.
    # Every injected fault is accounted for by one of the three (more only if this
    # machine is slow enough for an honest request to time out).
    assert r["retries"] >= r["slowdowns"] + r["stalls"], r
    assert r["retries"] + r["resent_on_fresh_connection"] + r["file_retries"] >= faults, r


def test_proxy_faults_through_the_daemon_lose_nothing(tmp_path: Path) -> None:
    r = scenario_proxy_faults(tmp_path, files=9, seed=5, via="daemon")
    assert r["lost"] == 0 and r["corrupted"] == 0 and r["bad_pointers"] == 0, r
    faults = r["resets"] + r["slowdowns"] + r["stalls"]
    assert faults > 0, r
    assert r["retries"] >= r["slowdowns"] + r["stalls"], r
    assert r["retries"] + r["resent_on_fresh_connection"] + r["file_retries"] >= faults, r
