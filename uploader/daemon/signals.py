"""SIGTERM and SIGINT: the first drains, a second exits at once.

:func:`capture_early_signals` is called before the store is opened, so that a
signal arriving then is not lost (nor kills the process with the default
action): :func:`signal_task` replays it once the engine runs. A second signal,
early or late, exits at once with ``128 + signum``; the journal is intact (every
change is committed before the daemon acts on it), so the next start resumes.

Example::

    capture_early_signals()
    ... open the store ...
    await task_group.start(signal_task, on_first, on_second)
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

__all__ = ["capture_early_signals", "signal_task"]

log = logging.getLogger(__name__)

_early_signals: list[int] = []


def capture_early_signals() -> None:
    """Remember SIGTERM/SIGINT arriving before the engine runs (while the store is opened).

    The engine drains for them once it starts, instead of the process dying with the
    default action; a second early signal exits at once (the journal is intact).
    """

    def remember(signum: int, frame: object) -> None:
        _early_signals.append(signum)
        if len(_early_signals) >= 2:
            os._exit(128 + signum)

    signal.signal(signal.SIGTERM, remember)
    signal.signal(signal.SIGINT, remember)


async def signal_task(
    drain: Callable[[], None],
    last_words: Callable[[str], None],
    *,
    task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Receive SIGTERM/SIGINT: the first calls ``drain()``; a second calls
    ``last_words(reason)`` (write the final status) and exits the process at once.

    Ready (``task_status.started()``) once the signals are being received.
    """
    count = 0

    def on_signal(signum: int) -> None:
        nonlocal count
        count += 1
        name = signal.Signals(signum).name
        if count == 1:
            log.info("%s received: draining (a second signal exits at once)", name)
            drain()
            return
        log.warning("second signal %s: exiting now; the journal is intact", name)
        last_words(f"interrupted by a second {name}")
        logging.shutdown()
        os._exit(128 + signum)

    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        # Signals that arrived while the store was being opened count too.
        while _early_signals:
            on_signal(_early_signals.pop(0))
        async for signum in signals:
            on_signal(signum)
