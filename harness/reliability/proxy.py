"""Faults 2 and 3: the store going away for a while, and a faulty network (the fault proxy)."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.faultproxy import FaultPlan, FaultProxy
from harness.reliability.common import (
    ROOT,
    Audit,
    MiB,
    Result,
    _store,
    bucket_audit,
    rclone_server,
    write_checkpoint_file,
)
from uploader import RetryPolicy

__all__ = ["scenario_proxy_faults", "scenario_server_down"]

log = logging.getLogger(__name__)


# -- 3. the fault proxy -----------------------------------------------------------------------


def scenario_proxy_faults(
    workdir: Path,
    files: int = 40,
    reset_rate: float = 0.08,
    stall_rate: float = 0.04,
    slowdown_rate: float = 0.08,
    stall_seconds: float = 3.0,
    timeout: float = 2.0,
    seed: int = 1234,
    time_limit: float = 600.0,
    via: str = "store",
) -> Result:
    """Upload ``files`` checkpoints (small and multipart) through the fault proxy.

    The client's socket timeout is shorter than a stall, so a stall is seen as a
    timeout and retried. ``via="store"``: the ObjectStore API uploads the files;
    one whose upload still fails after the store's retries is uploaded again (at
    most 5 times), as the daemon does. ``via="daemon"``: ``ckpt-uploader push``
    uploads the run directory through the proxy, and the retries are counted in
    its log.
    """
    if via == "daemon":
        return _proxy_faults_daemon(
            workdir,
            files,
            reset_rate,
            stall_rate,
            slowdown_rate,
            stall_seconds,
            timeout,
            seed,
            time_limit,
        )
    run_dir = workdir / "run"
    retry = RetryPolicy(attempts=12, total_seconds=120, base_delay=0.05, max_delay=1.0)
    plan = FaultPlan(
        reset_rate=reset_rate,
        reset_after=(1, 4 * MiB),
        stall_rate=stall_rate,
        stall_seconds=stall_seconds,
        slowdown_rate=slowdown_rate,
    )
    expected: dict[str, str] = {}
    sizes = [256 << 10, 3 * MiB, 11 * MiB]  # one part; one part; three 5 MiB parts
    for i in range(files):
        rel = f"checkpoints/ba{i}.pt"
        sha = write_checkpoint_file(run_dir / rel, sizes[i % len(sizes)], seed + i)
        expected[f"proxy/rank_0/{rel}"] = sha
    file_retries = 0
    t0 = time.monotonic()
    with rclone_server(workdir) as server:
        proxy = FaultProxy(("127.0.0.1", server.port), FaultPlan(), seed=seed).start()
        try:
            store = _store(server, "proxy", port=proxy.port, retry=retry, timeout=timeout)
            proxy.set_plan(plan)
            try:
                for name in expected:
                    rel = name.split("/", 2)[2]
                    for attempt in range(5):
                        if time.monotonic() - t0 > time_limit:
                            raise TimeoutError(f"proxy scenario exceeded {time_limit}s")
                        try:
                            store.upload_file(run_dir / rel, name)
                            break
                        except Exception as exc:  # the daemon retries a failed file later
                            log.warning("upload of %s failed (%s); again", name, exc)
                            file_retries += 1
                            if attempt == 4:
                                raise
                request_retries = store.retries.n
                resent = int(getattr(store.backend, "resent", 0))
            finally:
                store.close()
            stats = proxy.stats()
            proxy.set_plan(FaultPlan())
        finally:
            proxy.stop()
        seconds = time.monotonic() - t0
        with _store(server, "proxy", retry=retry) as clean:
            audit = bucket_audit(clean, expected, workdir / "audit")
    return _proxy_result(
        "3. fault proxy (resets mid-body, stalls, 503 SlowDown)",
        files,
        sizes,
        stats,
        retries=request_retries,
        resent=resent,
        file_retries=file_retries,
        audit=audit,
        seconds=seconds,
        note=f"rates: reset {reset_rate}, stall {stall_rate} ({stall_seconds}s against a "
        f"{timeout}s client timeout), slowdown {slowdown_rate}; seed {seed}",
    )


def _proxy_result(
    case: str,
    files: int,
    sizes: Sequence[int],
    stats: dict[str, int],
    *,
    retries: int,
    resent: int | None,
    file_retries: int,
    audit: Audit,
    seconds: float,
    note: str,
    pointers: bool = False,
) -> Result:
    """The figures of a fault-proxy case, in the same order for both ways of uploading."""
    figures: dict[str, Any] = {
        "files": files,
        "bytes": sum(sizes[i % len(sizes)] for i in range(files)),
        "requests": stats["requests"],
        "resets": stats["reset"],
        "stalls": stats["stall"],
        "slowdowns": stats["slowdown"],
        "retries": retries,
        "resent_on_fresh_connection": resent,
        "file_retries": file_retries,
        "lost": len(audit.lost),
        "corrupted": len(audit.corrupted),
    }
    if pointers:
        figures["bad_pointers"] = len(audit.bad_pointers)
    figures["seconds"] = round(seconds, 1)
    return Result(case, figures, [note])


def _proxy_faults_daemon(
    workdir: Path,
    files: int,
    reset_rate: float,
    stall_rate: float,
    slowdown_rate: float,
    stall_seconds: float,
    timeout: float,
    seed: int,
    time_limit: float,
) -> Result:
    run_dir, state_dir = workdir / "run", workdir / "state"
    prefix, bucket = "proxyd", "proxyd"
    sizes = [256 << 10, 3 * MiB, 11 * MiB]
    expected: dict[str, str] = {}
    for i in range(files):
        rel = f"checkpoints/ba{i}.pt"
        expected[f"{prefix}/rank_0/{rel}"] = write_checkpoint_file(
            run_dir / rel, sizes[i % len(sizes)], seed + i
        )
    plan = FaultPlan(
        reset_rate=reset_rate,
        reset_after=(1, 4 * MiB),
        stall_rate=stall_rate,
        stall_seconds=stall_seconds,
        slowdown_rate=slowdown_rate,
    )
    t0 = time.monotonic()
    with rclone_server(workdir) as server:
        server.make_bucket(bucket)
        proxy = FaultProxy(("127.0.0.1", server.port), plan, seed=seed).start()
        log_path = workdir / "push.log"
        try:
            uri = server.uri(bucket, prefix).replace(server.endpoint, proxy.url)
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "uploader",
                    "push",
                    str(run_dir),
                    "--to",
                    uri,
                    "--state-dir",
                    str(state_dir),
                    "--part-size",
                    "5M",
                    "--retries",
                    "12",
                    "--retry-seconds",
                    "120",
                    "--retry-delay",
                    "0.2",
                    "--no-progress",
                    "--extra-init-kwargs",
                    json.dumps({"timeout": timeout}),
                ],
                capture_output=True,
                text=True,
                timeout=time_limit,
                cwd=str(ROOT),
            )
            log_path.write_text(proc.stderr)
            if proc.returncode != 0:
                raise AssertionError(f"push exited {proc.returncode}:\n{proc.stderr[-3000:]}")
            stats = proxy.stats()
        finally:
            proxy.stop()
        with _store(server, bucket, retry=RetryPolicy(attempts=3)) as store:
            audit = bucket_audit(store, expected, workdir / "audit", [(prefix, 0)])
    text = log_path.read_text()
    resent = re.findall(r"(\d+) resent on a fresh connection", text)
    return _proxy_result(
        "3b. fault proxy, through ckpt-uploader push",
        files,
        sizes,
        stats,
        retries=text.count(" retry "),
        resent=int(resent[-1]) if resent else None,
        file_retries=text.count("failed, retrying"),
        audit=audit,
        seconds=time.monotonic() - t0,
        note=f"rates: reset {reset_rate}, stall {stall_rate} ({stall_seconds}s against a "
        f"{timeout}s client timeout), slowdown {slowdown_rate}; seed {seed}",
        pointers=True,
    )


# -- 2. the store goes away -----------------------------------------------------------------


def scenario_server_down(
    workdir: Path,
    size: int = 60 * MiB,
    down_seconds: float = 30.0,
    step_seconds: float = 0.02,
    save_every: int = 25,
    bwlimit: str = "4M",
    time_limit: float = 600.0,
) -> Result:
    """Stop the S3 server in the middle of a large upload for ``down_seconds``.

    A "training loop" in this process runs beside the upload worker
    (:class:`uploader.Sidecar`, a separate process): it steps every
    ``step_seconds``, calls ``check()`` each step, writes a small checkpoint every
    ``save_every`` steps, and records the longest gap between two steps. The
    worker's upload is throttled (``--bwlimit``) so the server surely stops
    mid-upload; its retry flags cover the outage.
    """
    from uploader import Sidecar

    run_dir, state_dir = workdir / "run", workdir / "state"
    prefix, bucket = "down", "down"
    big = "checkpoints/ep1.pt"
    expected = {f"{prefix}/rank_0/{big}": write_checkpoint_file(run_dir / big, size, 7)}
    retry_args = [
        "--part-size",
        "5M",
        "--bwlimit",
        bwlimit,
        "--concurrency",
        "1",
        "--retries",
        str(int(down_seconds) + 20),
        "--retry-seconds",
        str(int(down_seconds * 3 + 60)),
        "--settle",
        "0.3",
    ]
    steps = saves = steps_during_outage = 0
    max_gap = 0.0
    stopped_at = 0
    outage = [0.0, 0.0]
    t0 = time.monotonic()
    with rclone_server(workdir) as server:
        server.make_bucket(bucket)
        sidecar = Sidecar(
            run_dir,
            server.uri(bucket, prefix),
            rank=0,
            state_dir=state_dir,
            drain_timeout=time_limit,
            progress_bar=False,
            check_interval=0.2,
            extra_args=retry_args,
        )
        sidecar.start()
        try:
            last = time.monotonic()
            deadline = t0 + time_limit
            while time.monotonic() < deadline:
                time.sleep(step_seconds)
                sidecar.check()
                now = time.monotonic()
                max_gap = max(max_gap, now - last)
                last = now
                steps += 1
                if outage[0] and not outage[1]:
                    steps_during_outage += 1
                if steps % save_every == 0:
                    rel = f"checkpoints/ba{steps}.pt"
                    sha = write_checkpoint_file(run_dir / rel, 64 << 10, steps)
                    expected[f"{prefix}/rank_0/{rel}"] = sha
                    saves += 1
                st = sidecar.status()
                if not outage[0]:
                    if st is not None and st.bytes_done >= size // 4 and st.uploading:
                        stopped_at = st.bytes_done
                        server.stop()
                        outage[0] = time.monotonic()
                elif not outage[1]:
                    if now - outage[0] >= down_seconds:
                        server.start()
                        outage[1] = time.monotonic()
                elif now - outage[1] >= 1.0 and saves >= 3:
                    break
            else:
                raise TimeoutError(f"server-down scenario exceeded {time_limit}s")
            final = sidecar.stop(timeout=time_limit)
        finally:
            if sidecar.worker.running:
                sidecar.worker.kill()
        drained = time.monotonic() - outage[1]
        with _store(server, bucket, retry=RetryPolicy(attempts=3)) as clean:
            audit = bucket_audit(clean, expected, workdir / "audit", [(prefix, 0)])
    log_tail = (state_dir / ".ckpt-uploader.log").read_text(errors="replace")
    return Result(
        "2. object store down mid-upload",
        {
            "files": len(expected),
            "bytes": size,
            "down_seconds": round(outage[1] - outage[0], 1),
            "stopped_after_bytes": stopped_at,
            "retries": log_tail.count("retry "),
            "training_steps": steps,
            "steps_during_outage": steps_during_outage,
            "max_step_gap_s": round(max_gap, 3),
            "drained_s_after_restart": round(drained, 1),
            "verified": final.done if final is not None else 0,
            "lost": len(audit.lost),
            "corrupted": len(audit.corrupted),
            "bad_pointers": len(audit.bad_pointers),
            "no_recorded_digest": len(audit.no_digest),
        },
        [
            f"upload worker throttled to {bwlimit}/s; server stopped (SIGTERM) once "
            f"{stopped_at} bytes were sent, started again after {down_seconds}s",
            "rclone's server forgets unfinished multipart uploads when it restarts; the "
            "store then answers NoSuchUpload and the uploader uploads the file again from "
            "its start",
            "no_recorded_digest: rclone's server keeps object metadata in memory, so objects "
            "stored before the restart lost the digest kept there; their bytes were checked "
            "against the local files, and the commit pointer still records their digests",
        ],
    )
