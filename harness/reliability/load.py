"""Load: many ranks, each with its own upload worker, against one server at once."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

from harness.reliability.common import (
    MiB,
    Result,
    _store,
    bucket_audit,
    rclone_server,
    write_checkpoint_file,
)
from uploader import RetryPolicy

__all__ = ["scenario_load"]

log = logging.getLogger(__name__)


# -- load: many ranks at once -------------------------------------------------------------------


def scenario_load(
    workdir: Path,
    ranks: int = 8,
    files_per_rank: int = 50,
    size: int = 4 * MiB,
    interval: float = 0.0,
    time_limit: float = 900.0,
) -> Result:
    """``ranks`` upload workers (one :class:`uploader.Sidecar` each, as the callback
    starts them) upload ``files_per_rank`` checkpoints of ``size`` bytes each to one
    server at once. Samples every worker's memory, file descriptors and threads
    twice a second; compares them early (after a fifth of the files) with late
    (after all were written), and this process's before and after.
    """
    import psutil

    from uploader import Sidecar

    me = psutil.Process()
    fds_before, threads_before = me.num_fds(), threading.active_count()
    prefix, bucket = "load", "load"
    expected: dict[str, str] = {}
    samples: dict[int, list[tuple[float, int, int, int]]] = {}
    stop = threading.Event()
    marks: dict[str, float] = {}
    t0 = time.monotonic()
    with rclone_server(workdir) as server:
        server.make_bucket(bucket)
        sidecars = [
            Sidecar(
                workdir / "run" / f"rank_{r}",
                server.uri(bucket, prefix),
                rank=r,
                state_dir=workdir / f"state{r}",
                progress_bar=False,
                drain_timeout=time_limit,
                check_interval=0.5,
            )
            for r in range(ranks)
        ]

        def sample() -> None:
            procs = {sc.pid: psutil.Process(sc.pid) for sc in sidecars if sc.pid}
            while not stop.wait(0.5):
                for pid, p in procs.items():
                    with contextlib.suppress(psutil.Error):
                        samples.setdefault(pid, []).append(
                            (time.monotonic(), p.memory_info().rss, p.num_fds(), p.num_threads())
                        )

        sampler = threading.Thread(target=sample, name="load-sampler", daemon=True)
        try:
            for sc in sidecars:
                sc.start()
            sampler.start()
            for i in range(files_per_rank):
                if time.monotonic() - t0 > time_limit:
                    raise TimeoutError(f"load scenario exceeded {time_limit}s")
                for r, sc in enumerate(sidecars):
                    rel = f"checkpoints/ba{i}.pt"
                    sha = write_checkpoint_file(
                        workdir / "run" / f"rank_{r}" / rel, size, 1000 * r + i
                    )
                    expected[f"{prefix}/rank_{r}/{rel}"] = sha
                    sc.check()
                if i + 1 == max(1, files_per_rank // 5):
                    marks["early"] = time.monotonic()
                if interval:
                    time.sleep(interval)
            marks["late"] = time.monotonic()
            finals = [sc.stop(timeout=time_limit) for sc in sidecars]
            marks["drained"] = time.monotonic()
        finally:
            stop.set()
            if sampler.is_alive():
                sampler.join(5)
            for sc in sidecars:
                if sc.worker.running:
                    sc.worker.kill()
        with _store(server, bucket, retry=RetryPolicy(attempts=3)) as store:
            audit = bucket_audit(
                store, expected, workdir / "audit", [(prefix, r) for r in range(ranks)]
            )
    fds_after, threads_after = me.num_fds(), threading.active_count()

    def at(series: list[tuple[float, int, int, int]], when: float) -> tuple[int, int]:
        """(fds, threads) of the sample nearest to ``when``."""
        best = min(series, key=lambda s: abs(s[0] - when))
        return best[2], best[3]

    peak_rss = max((s[1] for ss in samples.values() for s in ss), default=0)
    growth_fds = growth_threads = 0
    for ss in samples.values():
        e_fd, e_th = at(ss, marks.get("early", t0))
        l_fd, l_th = at(ss, marks.get("late", t0))
        growth_fds = max(growth_fds, l_fd - e_fd)
        growth_threads = max(growth_threads, l_th - e_th)
    seconds = marks.get("drained", time.monotonic()) - t0
    total = ranks * files_per_rank * size
    return Result(
        "load: ranks uploading to one server at once",
        {
            "ranks": ranks,
            "files": len(expected),
            "file_mib": round(size / MiB, 1),
            "verified": sum(f.done for f in finals if f is not None),
            "lost": len(audit.lost),
            "corrupted": len(audit.corrupted),
            "bad_pointers": len(audit.bad_pointers),
            "peak_worker_rss_mib": round(peak_rss / MiB, 1),
            "max_worker_fds": max((s[2] for ss in samples.values() for s in ss), default=0),
            "max_worker_threads": max((s[3] for ss in samples.values() for s in ss), default=0),
            "worker_fd_growth": growth_fds,
            "worker_thread_growth": growth_threads,
            "parent_fd_leak": fds_after - fds_before,
            "parent_thread_leak": threads_after - threads_before,
            "mib_per_s": round(total / MiB / max(seconds, 1e-9), 1),
            "seconds": round(seconds, 1),
        },
        [f"{len(samples)} workers sampled twice a second; default part size and concurrency"],
    )
