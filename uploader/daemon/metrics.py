"""Prometheus metrics of the daemon, with prometheus_client: an HTTP endpoint
(``--metrics-port``, on ``--metrics-addr``) and node_exporter's textfile format
(``--metrics-file``, rewritten atomically every second).

Every metric is labelled with ``prefix`` (the object name prefix) and ``rank`` (the
daemon's ``--rank``; the complete-to-committed histogram and the commit counter use
the rank of each checkpoint); never with a secret. Counters count since the daemon
started:

=================================================== ===========================================
``ckpt_uploader_uploaded_bytes_total``              bytes sent (parts of resumed uploads kept
                                                    by the store are not sent again)
``ckpt_uploader_files_uploaded_total``              files verified in the store
``ckpt_uploader_checkpoints_committed_total``       checkpoints a pointer write named
``ckpt_uploader_checkpoints_skipped_total``         checkpoints skipped as superseded
``ckpt_uploader_files_failed_total``                files failed for good
``ckpt_uploader_retries_total``                     attempts retried (files and requests)
``ckpt_uploader_resumed_bytes_total``               bytes not sent again: a resumed upload's
                                                    parts the store already held
``ckpt_uploader_lag_seconds``                       see :mod:`uploader.daemon.keepup`
``ckpt_uploader_pending_bytes``                     bytes queued or in flight
``ckpt_uploader_pending_checkpoints``               checkpoints queued or in flight
``ckpt_uploader_resumable_bytes``                   bytes recorded as held by unfinished
                                                    multipart uploads
``ckpt_uploader_last_commit_timestamp_seconds``     Unix time of the last pointer write
                                                    (0: none yet)
``ckpt_uploader_phase{phase=...}``                  1 for the daemon's state, 0 for the others
``ckpt_uploader_fenced``                            1 when pointer writes are compare-and-swap
``ckpt_uploader_commit_delay_seconds``              histogram: a checkpoint complete on disk
                                                    to committed
=================================================== ===========================================

The HTTP server also answers ``/livez`` (200 while the daemon's event loop answers: the
heartbeat its status task beats every second is less than :data:`LIVE_WITHIN` seconds
old) and
``/readyz`` (503 while uploads keep failing: :data:`FAILING_ATTEMPTS` attempts in a row
failed or the state is ``failed``; or while the lag exceeds ``--ready-max-lag``).

Example::

    metrics = attach(engine)            # None unless --metrics-port / --metrics-file
    # or by hand:
    metrics = Metrics(engine, prefix="exp1", rank=0, max_lag=600)
    port = metrics.serve("127.0.0.1", 9108)
    metrics.update(report)              # each status reading
    metrics.write_textfile(Path("/var/lib/node_exporter/ckpt.prom"))
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from uploader.daemon.status import STATES, StatusReport

__all__ = ["Metrics", "attach", "LIVE_WITHIN", "FAILING_ATTEMPTS"]

log = logging.getLogger(__name__)

#: /livez fails when the event loop's heartbeat is older than this (seconds).
LIVE_WITHIN = 10.0
#: /readyz fails after this many failed upload attempts in a row.
FAILING_ATTEMPTS = 3
#: Buckets of the complete-to-committed histogram (seconds).
DELAY_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class _Collector(Collector):
    """Reads the daemon's counters and its last status report at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterable[Metric]:
        m = self.m
        names, values = ["prefix", "rank"], [m.prefix, str(m.rank)]
        report = m.report

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(f"ckpt_uploader_{name}", doc, labels=names)
            c.add_metric(values, value)
            return c

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(f"ckpt_uploader_{name}", doc, labels=names)
            g.add_metric(values, value)
            return g

        e = m.engine
        uploads = e.uploads
        yield counter("uploaded_bytes", "Bytes sent to the store.", uploads.sent()[0])
        yield counter("files_uploaded", "Files verified in the store.", uploads.verified_files)
        yield counter(
            "checkpoints_skipped", "Checkpoints skipped as superseded.", e.backlog.skipped
        )
        yield counter("files_failed", "Files failed for good.", uploads.failed_files)
        yield counter(
            "retries",
            "Upload attempts and store requests retried.",
            uploads.retried + int(getattr(e.store.retries, "n", 0)),
        )
        yield counter(
            "resumed_bytes", "Bytes a resumed upload did not send again.", uploads.resumed_bytes
        )
        committed = CounterMetricFamily(
            "ckpt_uploader_checkpoints_committed",
            "Checkpoints named by a pointer write.",
            labels=names,
        )
        for rank, n in sorted(m.committed.items()):
            committed.add_metric([m.prefix, str(rank)], n)
        yield committed
        yield gauge(
            "lag_seconds",
            "Age of the newest complete checkpoint not committed.",
            report.lag_seconds,
        )
        yield gauge("pending_bytes", "Bytes queued or in flight.", report.pending_bytes)
        yield gauge(
            "pending_checkpoints", "Checkpoints queued or in flight.", report.pending_checkpoints
        )
        yield gauge(
            "resumable_bytes", "Bytes held by unfinished multipart uploads.", m.resumable_bytes
        )
        yield gauge(
            "last_commit_timestamp_seconds", "Unix time of the last pointer write.", m.last_commit
        )
        yield gauge(
            "fenced", "1 when pointer writes are compare-and-swap.", 1.0 if report.fenced else 0.0
        )
        phase = GaugeMetricFamily(
            "ckpt_uploader_phase", "1 for the daemon's state.", labels=[*names, "phase"]
        )
        for state in STATES:
            phase.add_metric([*values, state], 1.0 if report.state == state else 0.0)
        yield phase


class Metrics:
    """The daemon's metrics (see the module docstring).

    Args:
        engine: the :class:`~uploader.daemon.engine.Engine` measured.
        prefix / rank: the labels.
        max_lag: /readyz fails while the lag is above this (seconds).
    """

    def __init__(self, engine: Any, prefix: str, rank: int, max_lag: float) -> None:
        self.engine = engine
        self.prefix = prefix
        self.rank = rank
        self.max_lag = max_lag
        self.registry = CollectorRegistry()
        self.report = StatusReport()
        self.resumable_bytes = 0
        self.last_commit = 0.0
        self.committed: dict[int, int] = {}
        self.heartbeat = time.monotonic()
        self.delay = Histogram(
            "ckpt_uploader_commit_delay_seconds",
            "Seconds from a checkpoint complete on disk to committed.",
            ["prefix", "rank"],
            buckets=DELAY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Collector(self))
        self._server: WSGIServer | None = None

    # -- readings -----------------------------------------------------------------------
    def update(self, report: StatusReport) -> None:
        """The latest status report (gauges read it at each scrape)."""
        self.report = report

    def observe_commit(self, rank: int, delay: float) -> None:
        """A checkpoint of ``rank`` was committed ``delay`` seconds after it was complete."""
        self.delay.labels(self.prefix, str(rank)).observe(delay)

    def commit(self, rank: int, count: int) -> None:
        """A pointer write of ``rank`` named ``count`` checkpoints."""
        self.committed[rank] = self.committed.get(rank, 0) + count
        self.last_commit = time.time()

    def beat(self) -> None:
        """The event loop answers (called from it)."""
        self.heartbeat = time.monotonic()

    # -- probes -------------------------------------------------------------------------
    def live(self) -> bool:
        return time.monotonic() - self.heartbeat < LIVE_WITHIN

    def ready(self) -> tuple[bool, str]:
        """Whether the daemon keeps up, and why not."""
        r = self.report
        if r.state == "failed":
            return False, f"state failed: {r.last_error or 'see the log'}"
        failing = int(getattr(self.engine.uploads, "failing", 0))
        if failing >= FAILING_ATTEMPTS:
            return False, f"{failing} upload attempts in a row failed"
        if r.lag_seconds > self.max_lag:
            return False, f"lag {r.lag_seconds:.0f}s is above {self.max_lag:g}s"
        return True, "ok"

    # -- serving ------------------------------------------------------------------------
    def app(self) -> Callable[..., Iterator[bytes]]:
        """The WSGI app: /livez, /readyz, and the metrics on every other path."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            path = environ.get("PATH_INFO", "/")
            if path in ("/livez", "/readyz"):
                ok, why = (self.live(), "ok") if path == "/livez" else self.ready()
                if path == "/livez" and not ok:
                    why = "the event loop does not answer"
                status = "200 OK" if ok else "503 Service Unavailable"
                start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
                return [f"{why}\n".encode()]
            return metrics_app(environ, start_response)

        return app

    def serve(self, addr: str, port: int) -> int:
        """Serve on ``addr:port`` in a daemon thread; returns the port (0: any free one)."""
        server = make_server(addr, port, self.app(), handler_class=_Quiet)
        self._server = server
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        bound = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics (/livez, /readyz)", addr, bound)
        return bound

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def write_textfile(self, path: Path) -> None:
        """Write node_exporter's textfile format to ``path`` atomically."""
        write_to_textfile(str(path), self.registry)


def attach(engine: Any) -> Metrics | None:
    """The metrics of ``engine`` when its options ask for them (None otherwise): fed by
    each status reading, each commit and the event loop's heartbeat; served on
    ``metrics_addr:metrics_port`` and written to ``metrics_file`` as asked.
    ConfigError when the address cannot be bound."""
    from uploader.errors import ConfigError

    opts = engine.opts
    if opts.metrics_port is None and opts.metrics_file is None:
        return None
    metrics = Metrics(engine, opts.prefix, opts.rank, opts.ready_max_lag)
    engine.backlog.observers.append(metrics.observe_commit)
    path = opts.metrics_file

    def reading(report: StatusReport) -> None:
        metrics.beat()
        metrics.update(report)
        metrics.resumable_bytes = engine.reporter.resumable_bytes
        if path is not None:
            try:
                metrics.write_textfile(path)
            except OSError as exc:
                log.warning("cannot write the metrics file %s: %s", path, exc.strerror)

    engine.reporter.listeners.append(reading)
    if opts.metrics_port is not None:
        try:
            metrics.serve(opts.metrics_addr, opts.metrics_port)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {opts.metrics_addr}:{opts.metrics_port}: "
                f"{exc.strerror or exc}; choose another --metrics-port or --metrics-addr"
            ) from exc
    return metrics
