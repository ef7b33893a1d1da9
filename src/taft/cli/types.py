"""Argument types for the `taft` command: numbers are checked where they are parsed, so an error names the flag
(`argument -k/--k: must be an integer ≥ 1, got '0'`) rather than a Python parameter."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(kind: Callable[[str], float], what: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in its "invalid ... value" message
    return parse


positive_int = _number(int, "an integer ≥ 1", lambda v: v >= 1)
nonnegative_int = _number(int, "an integer ≥ 0", lambda v: v >= 0)
positive_float = _number(float, "a number > 0", lambda v: v > 0)
nonnegative_float = _number(float, "a number ≥ 0", lambda v: v >= 0)
probability = _number(float, "a number in (0, 1)", lambda v: 0 < v < 1)
fraction = _number(float, "a number in [0, 1)", lambda v: 0 <= v < 1)


BYTE_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
              "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}


def byte_size(text: str) -> int:
    """A size in bytes: a number with an optional unit, K / M / G / T (binary, as KiB ... TiB) or KB ... TB
    (decimal): `4G`, `512MiB`, `20GB`, `1e9`."""
    number = text.strip().rstrip("bBiIkKmMgGtT")
    unit = text.strip()[len(number):].lower()
    try:
        value = float(number) * BYTE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"must be a size such as 4G, 512MiB or 20GB, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a size ≥ 0, got {text!r}")
    return int(value)


byte_size.__name__ = "a size"


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, `taft: error: ...`, exit status 2 (like taft's own)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"taft: error: {message} (see {self.prog} --help)\n")
