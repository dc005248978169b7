"""Metrics of a real daemon: scraped over HTTP and parsed with prometheus_client's parser,
the textfile, /livez and /readyz, bad options, and the idle daemon's memory."""

from __future__ import annotations

import re
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from tests.daemon.test_process import (
    Daemon,
    atomic_write,
    daemons,  # noqa: F401  (fixture)
    local_uri,
    run_cli,
    wait_for,
)
from uploader.daemon.metrics import FAILING_ATTEMPTS, Metrics
from uploader.daemon.status import StatusReport

MiB = 1 << 20


def _port(d: Daemon) -> int:
    found = wait_for(
        lambda: re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", d.log()),
        20,
        "the metrics line",
    )
    return int(found.group(1))


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def _value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    return sum(v for _, v in samples[name])


def test_metrics_scraped_from_a_real_daemon(
    tmp_path: Path,
    local_bucket: Path,
    daemons: list[Daemon],  # noqa: F811
) -> None:
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    prom = tmp_path / "ckpt.prom"
    d = Daemon(
        tmp_path,
        run,
        "--to",
        local_uri(local_bucket, "m"),
        "--settle",
        "0.2",
        "--metrics-port",
        "0",
        "--metrics-file",
        str(prom),
    )
    daemons.append(d)
    port = _port(d)
    for i in range(3):
        atomic_write(run / "ckpt" / f"ep{i}.pt", 1 * MiB, seed=i)
    d.wait_status(lambda s: s.get("committed") == 3)
    time.sleep(1.2)  # one more status reading
    status, text = _get(port, "/metrics")
    assert status == 200
    s = _samples(text)
    assert _value(s, "ckpt_uploader_uploaded_bytes_total") == 3 * MiB
    assert _value(s, "ckpt_uploader_files_uploaded_total") == 3
    assert _value(s, "ckpt_uploader_checkpoints_committed_total") == 3
    assert _value(s, "ckpt_uploader_checkpoints_skipped_total") == 0
    assert _value(s, "ckpt_uploader_files_failed_total") == 0
    assert _value(s, "ckpt_uploader_lag_seconds") == 0
    assert _value(s, "ckpt_uploader_pending_bytes") == 0
    assert _value(s, "ckpt_uploader_commit_delay_seconds_count") == 3
    assert _value(s, "ckpt_uploader_last_commit_timestamp_seconds") > time.time() - 60
    assert _value(s, "ckpt_uploader_fenced") == 1
    for name in ("ckpt_uploader_retries_total", "ckpt_uploader_resumed_bytes_total"):
        assert name in s
    assert "ckpt_uploader_resumable_bytes" in s
    phases = {lab["phase"]: v for lab, v in s["ckpt_uploader_phase"]}
    assert phases["running"] == 1 and sum(phases.values()) == 1
    labels = {k for samples in s.values() for lab, _ in samples for k in lab}
    assert labels <= {"prefix", "rank", "phase", "le"}
    assert {lab["prefix"] for lab, _ in s["ckpt_uploader_files_uploaded_total"]} == {"m"}
    assert _get(port, "/livez")[0] == 200
    assert _get(port, "/readyz") == (200, "ok\n")
    # The textfile: node_exporter's format, parsed the same way, no temporary left.
    file_samples = _samples(prom.read_text())
    assert _value(file_samples, "ckpt_uploader_files_uploaded_total") == 3
    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.log()
    phases = {lab["phase"]: v for lab, v in _samples(prom.read_text())["ckpt_uploader_phase"]}
    assert phases["done"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt.prom")] == ["ckpt.prom"]


def test_readyz_fails_while_the_lag_is_above_its_bound(
    tmp_path: Path,
    local_bucket: Path,
    daemons: list[Daemon],  # noqa: F811
) -> None:
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    d = Daemon(
        tmp_path,
        run,
        "--to",
        local_uri(local_bucket, "r"),
        "--settle",
        "0.2",
        "--bwlimit",
        "1M",
        "--files",
        "1",
        "--metrics-port",
        "0",
        "--ready-max-lag",
        "1",
    )
    daemons.append(d)
    port = _port(d)
    assert _get(port, "/readyz")[0] == 200
    for i in range(3):
        atomic_write(run / "ckpt" / f"ep{i}.pt", 3 * MiB, seed=i)
    wait_for(lambda: _get(port, "/readyz")[0] == 503, 20, "/readyz 503 while behind")
    code, why = _get(port, "/readyz")
    assert "lag" in why
    assert _get(port, "/livez")[0] == 200  # behind, but alive
    lag = _value(_samples(_get(port, "/metrics")[1]), "ckpt_uploader_lag_seconds")
    assert lag > 1
    wait_for(lambda: _get(port, "/readyz")[0] == 200, 30, "/readyz 200 once caught up")
    d.signal(signal.SIGTERM)
    assert d.wait() == 0, d.log()


def test_readyz_fails_while_uploads_keep_failing() -> None:
    engine = SimpleNamespace(uploads=SimpleNamespace(failing=0))
    m = Metrics(engine, "p", 0, max_lag=60)
    m.update(StatusReport(state="running"))
    assert m.ready()[0]
    engine.uploads.failing = FAILING_ATTEMPTS
    ok, why = m.ready()
    assert not ok and "failed" in why
    engine.uploads.failing = 0
    m.update(StatusReport(state="failed", last_error="HTTP 403"))
    assert not m.ready()[0]
    m.heartbeat -= 60
    assert not m.live()


def test_idle_daemon_with_metrics_stays_small(
    tmp_path: Path,
    local_bucket: Path,
    daemons: list[Daemon],  # noqa: F811
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    d = Daemon(tmp_path, run, "--to", local_uri(local_bucket, "i"), "--metrics-port", "0")
    daemons.append(d)
    port = _port(d)
    d.wait_running()
    for _ in range(5):
        assert _get(port, "/metrics")[0] == 200
    time.sleep(1)
    status = Path(f"/proc/{d.proc.pid}/status").read_text()
    rss_kib = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
    assert rss_kib < 64 * 1024, f"idle RSS {rss_kib} KiB"
    d.signal(signal.SIGTERM)
    assert d.wait() == 0


def test_bad_metrics_options_say_what_to_do(tmp_path: Path, local_bucket: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    uri = local_uri(local_bucket, "b")
    out = run_cli("watch", str(run), "--to", uri, "--metrics-port", "70000", "--exit-when-idle")
    assert out.returncode == 2
    assert "--metrics-port 70000 is not a TCP port" in out.stderr
    out = run_cli("watch", str(run), "--to", uri, "--metrics-addr", "a b", "--exit-when-idle")
    assert out.returncode == 2 and "--metrics-addr" in out.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        out = run_cli(
            "watch", str(run), "--to", uri, "--metrics-port", str(taken), "--exit-when-idle"
        )
    assert out.returncode == 2, out.stderr
    assert "choose another --metrics-port" in out.stderr


def test_readyz_fails_while_uploads_fail_in_a_real_daemon(
    tmp_path: Path,
    local_bucket: Path,
    daemons: list[Daemon],  # noqa: F811
) -> None:
    run = tmp_path / "run"
    (run / "ckpt").mkdir(parents=True)
    d = Daemon(
        tmp_path,
        run,
        "--to",
        local_uri(local_bucket, "f"),
        "--settle",
        "0.2",
        "--attempts",
        "2",
        "--retry-delay",
        "0.1",
        "--metrics-port",
        "0",
    )
    daemons.append(d)
    port = _port(d)
    d.wait_running()
    assert _get(port, "/readyz")[0] == 200
    (local_bucket / "f").write_text("a file where the prefix's directory should be")
    atomic_write(run / "ckpt" / "ep1.pt", 64 << 10)
    wait_for(lambda: _get(port, "/readyz")[0] == 503, 20, "/readyz 503 once uploads fail")
    assert "failed" in _get(port, "/readyz")[1]
    assert _get(port, "/livez")[0] == 200
    s = _samples(_get(port, "/metrics")[1])
    assert _value(s, "ckpt_uploader_files_failed_total") == 1
    assert _value(s, "ckpt_uploader_retries_total") >= 1
    d.signal(signal.SIGTERM)
    assert d.wait() == 1, d.log()
