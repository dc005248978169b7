"""Time strings: ``"10ep"`` (epochs) and ``"500ba"`` (batches).

``save_interval`` and ``max_duration`` use the same forms; a bare integer (or a
string of digits) means epochs.

Example::

    >>> parse_interval("500ba")
    Interval(value=500, unit='ba')
    >>> parse_interval(3)
    Interval(value=3, unit='ep')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["Interval", "parse_interval", "ACCEPTED_FORMS"]

Unit = Literal["ep", "ba"]

ACCEPTED_FORMS = (
    "'<N>ep' for every N epochs (e.g. '10ep'), '<N>ba' for every N batches "
    "(e.g. '500ba'), or a positive integer meaning epochs"
)

_PATTERN = re.compile(r"^\s*(\d+)\s*(ep|ba)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Interval:
    """A positive count of epochs (``unit="ep"``) or batches (``unit="ba"``)."""

    value: int
    unit: Unit

    def __str__(self) -> str:
        return f"{self.value}{self.unit}"


def parse_interval(value: str | int | Interval, what: str = "save_interval") -> Interval:
    """Parse ``"10ep"``, ``"500ba"`` or an integer (epochs).

    Raises ValueError listing the accepted forms for anything else, including zero.
    """
    if isinstance(value, Interval):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{what}={value!r} is not a valid interval; use {ACCEPTED_FORMS}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{what}={value!r} must be positive; use {ACCEPTED_FORMS}")
        return Interval(value, "ep")
    if isinstance(value, str):
        m = _PATTERN.match(value)
        if m:
            n = int(m.group(1))
            unit = (m.group(2) or "ep").lower()
            if n <= 0:
                raise ValueError(f"{what}={value!r} must be positive; use {ACCEPTED_FORMS}")
            return Interval(n, "ep" if unit == "ep" else "ba")
    raise ValueError(f"{what}={value!r} is not a valid interval; use {ACCEPTED_FORMS}")
