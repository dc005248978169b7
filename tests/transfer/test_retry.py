"""Which failures are retried, and that retries stay within their bounds."""

from __future__ import annotations

import errno
import ssl

import pytest

from uploader import (
    AuthError,
    ConfigError,
    ContainerNotFoundError,
    IntegrityError,
    ObjectNotFoundError,
    PermanentError,
    RetryPolicy,
    TransientError,
)
from uploader.transfer.retry import is_transient


class _HTTPError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class ConnectTimeout(Exception):  # named like the requests exception
    pass


@pytest.mark.parametrize(
    "exc",
    [
        TransientError("x"),
        ConnectionResetError(errno.ECONNRESET, "reset"),
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        BrokenPipeError(errno.EPIPE, "pipe"),
        OSError(errno.ETIMEDOUT, "timed out"),
        OSError(errno.EHOSTUNREACH, "unreachable"),
        TimeoutError(),
        ssl.SSLEOFError(),
        _HTTPError(500),
        _HTTPError(503),
        _HTTPError(429),
        _HTTPError(408),
        Exception("<Code>SlowDown</Code> please reduce your request rate"),
        Exception("ServerBusy: try later"),
        ConnectTimeout("connect"),
    ],
)
def test_transient(exc: BaseException) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        PermanentError("x"),
        AuthError("denied"),
        ContainerNotFoundError("no"),
        ObjectNotFoundError("no"),
        ConfigError("bad"),
        IntegrityError("corrupt"),
        _HTTPError(403),
        _HTTPError(404),
        _HTTPError(400),
        OSError(errno.ENOSPC, "no space"),
        OSError(errno.EACCES, "denied"),
        ValueError("bad value"),
        KeyError("k"),
    ],
)
def test_permanent(exc: BaseException) -> None:
    assert not is_transient(exc)


class FakeClock:
    """A monotonic clock that only moves when the policy sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        assert s >= 0
        self.sleeps.append(s)
        self.now += s


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr("uploader.transfer.retry.time.monotonic", c.monotonic)
    return c


def _failing(n: int, exc: Exception) -> tuple[list[int], object]:
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= n:
            raise exc
        return "ok"

    return calls, fn


def test_succeeds_after_transient_failures(clock: FakeClock) -> None:
    calls, fn = _failing(3, ConnectionResetError(errno.ECONNRESET, "reset"))
    seen: list[int] = []
    policy = RetryPolicy(attempts=5, total_seconds=100, base_delay=1, max_delay=4)
    assert policy.call(fn, "op", lambda a, e: seen.append(a), sleep=clock.sleep) == "ok"  # type: ignore[arg-type]
    assert len(calls) == 4
    assert seen == [1, 2, 3]
    # Full jitter within the exponential cap.
    for i, s in enumerate(clock.sleeps):
        assert 0 <= s <= min(4, 2**i)


def test_attempts_bounded(clock: FakeClock) -> None:
    calls, fn = _failing(100, ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    policy = RetryPolicy(attempts=4, total_seconds=1e6, base_delay=0.5)
    with pytest.raises(TransientError, match="gave up after 4 attempts") as info:
        policy.call(fn, "upload x", sleep=clock.sleep)  # type: ignore[arg-type]
    assert len(calls) == 4
    assert len(clock.sleeps) == 3
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert "upload x" in str(info.value) and "--retries" in str(info.value)


def test_total_time_bounded(clock: FakeClock) -> None:
    calls, fn = _failing(10_000, TimeoutError("slow"))
    policy = RetryPolicy(attempts=10_000, total_seconds=30, base_delay=1, max_delay=5)
    with pytest.raises(TransientError, match="gave up"):
        policy.call(fn, "op", sleep=clock.sleep)  # type: ignore[arg-type]
    assert clock.now <= 30
    assert len(calls) < 10_000


@pytest.mark.parametrize(
    "exc", [AuthError("denied"), ContainerNotFoundError("missing"), ValueError("bug")]
)
def test_permanent_not_retried(clock: FakeClock, exc: Exception) -> None:
    calls, fn = _failing(5, exc)
    with pytest.raises(type(exc)):
        RetryPolicy(attempts=5).call(fn, "op", sleep=clock.sleep)  # type: ignore[arg-type]
    assert len(calls) == 1 and clock.sleeps == []


def test_keyboard_interrupt_not_retried(clock: FakeClock) -> None:
    calls, fn = _failing(5, KeyboardInterrupt())  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        RetryPolicy(attempts=5).call(fn, "op", sleep=clock.sleep)  # type: ignore[arg-type]
    assert len(calls) == 1


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(total_seconds=0)
    p = RetryPolicy(base_delay=0.25, max_delay=2)
    assert all(0 <= p.delay(a) <= min(2, 0.25 * 2 ** (a - 1)) for a in range(1, 20))


def test_retry_log_has_reason(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    calls, fn = _failing(1, ConnectionResetError(errno.ECONNRESET, "peer reset it"))
    with caplog.at_level("WARNING", logger="uploader.transfer.retry"):
        RetryPolicy(attempts=3).call(fn, "upload y", sleep=clock.sleep)  # type: ignore[arg-type]
    assert "upload y" in caplog.text and "peer reset it" in caplog.text
