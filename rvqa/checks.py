"""Argument checks shared by every layer (stdlib only)."""

from __future__ import annotations

import numbers
from typing import Any

from rvqa.errors import UsageError

__all__ = ["check_int"]


def check_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an ``int`` that is at least ``minimum``.

    Raises:
        TypeError: Not an integer (``bool`` and ``2.0`` included), naming ``name``.
        UsageError: Below ``minimum`` (a ``ValueError``), naming ``name`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise UsageError(f"{name} must be ≥ {minimum}, got {value}")
    return int(value)
