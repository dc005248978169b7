"""What every cloud's credentials share: renewal once per refusal, however many threads
saw it.

Each store's identity (:mod:`~uploader.transfer.backends.aws_identity`,
:mod:`~uploader.transfer.backends.gcp_identity`,
:mod:`~uploader.transfer.backends.azure_identity`) hands out credentials before each
request and renews them ahead of expiry. When the store refuses them anyway (an expired
token, rotated keys), every thread that sent a request with them sees the refusal: each
passes back the :attr:`Identity.generation` it saw, and only the first one's
:meth:`Identity.refresh` renews; the others find the generation moved on and send again
with the new credentials.

Example::

    seen = identity.generation
    try:
        send(identity.credentials())
    except Refused:
        identity.refresh(seen)     # renews once, whichever thread comes first
        send(identity.credentials())
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

__all__ = ["Identity"]


class Identity(ABC):
    """The renewal protocol (see the module docstring); subclasses say how to renew."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation = 0
        #: Renewals so far (ahead of expiry or after a refusal), for tests and logs.
        self.refreshes = 0

    @property
    def generation(self) -> int:
        """Bumped by every :meth:`refresh`; pass it back so that threads that saw the
        same refusal refresh once between them."""
        return self._generation

    def refresh(self, seen: int | None = None) -> None:
        """Renew the credentials now (the store refused them), unless another thread
        already did since generation ``seen``."""
        with self._lock:
            if seen is not None and seen != self._generation:
                return
            self._renew_locked()
            self._generation += 1
            self.refreshes += 1

    @abstractmethod
    def _renew_locked(self) -> None:
        """Find fresh credentials (the lock is held)."""

    def close(self) -> None:
        """Let go of what renewal holds (HTTP sessions of a credential library)."""

    @abstractmethod
    def describe(self) -> str:
        """The source of the credentials in words, with their expiry; never a secret."""
