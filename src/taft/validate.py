"""Checks of user-given settings, each raising a one-line `TaftError` that names the setting and the value."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from taft.errors import TaftError


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    """`value` must be one of `allowed`."""
    if value not in allowed:
        raise TaftError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def check_integer(name: str, value: Any, minimum: int) -> None:
    """`value` must be an int (not a bool) ≥ `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TaftError(f"{name} must be an integer ≥ {minimum}, got {value!r}")


def check_number(name: str, value: Any, positive: bool) -> None:
    """`value` must be a finite real number ≥ 0 (> 0 when `positive`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise TaftError(f"{name} must be a finite number {'> 0' if positive else '≥ 0'}, got {value!r}")
