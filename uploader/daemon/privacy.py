"""Keep the daemon's memory to itself: it holds the store's credentials for as long as it runs.

:func:`make_private` marks the process non-dumpable (Linux ``prctl(PR_SET_DUMPABLE, 0)``,
through ctypes). From then on:

* a crash writes no core dump, which would hold the credentials (and could land in the
  run directory, or in a core collector readable by others);
* other processes of the same user, unless privileged, can neither read its
  ``/proc/<pid>/environ`` or ``mem`` nor attach a debugger (``ptrace``, ``py-spy``): its
  files under ``/proc/<pid>`` belong to root.

``watch`` and ``push`` call it before they read a credential. The cost: debugging a
running daemon with ``py-spy`` or ``gdb`` needs root (``sudo py-spy dump --pid N``).
The setting is kept across ``fork`` but not ``exec``; the daemon starts no programs.
Elsewhere than Linux it does nothing and says so at debug level.
"""

from __future__ import annotations

import ctypes
import logging
import sys

__all__ = ["make_private", "is_dumpable"]

log = logging.getLogger("uploader.daemon.privacy")

_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4


def _prctl(option: int, arg: int = 0) -> int | None:
    """``prctl(option, arg)``; None where there is no prctl (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    # The symbols already loaded into this process (libc's among them). Not
    # ctypes.util.find_library: it runs ldconfig, a child process that would inherit
    # this process's environment, credentials included.
    libc = ctypes.CDLL(None, use_errno=True)
    result = int(libc.prctl(option, arg, 0, 0, 0))
    if result < 0:
        log.debug("prctl(%d) failed: errno %d", option, ctypes.get_errno())
        return None
    return result


def make_private() -> bool:
    """Mark this process non-dumpable (see the module docstring); True when it is now."""
    if _prctl(_PR_SET_DUMPABLE, 0) is None:
        log.debug("cannot mark the process non-dumpable here; core dumps stay as configured")
        return False
    private = is_dumpable() is False
    log.debug("process marked non-dumpable (no core dumps, /proc/<pid> private): %s", private)
    return private


def is_dumpable() -> bool | None:
    """Whether this process may dump core and be read by its user's other processes
    (None: unknown, not Linux)."""
    value = _prctl(_PR_GET_DUMPABLE)
    return None if value is None else value != 0
