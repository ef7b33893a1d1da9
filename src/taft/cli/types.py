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


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line, `taft: error: ...`, exit status 2 (like taft's own)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"taft: error: {message} (see {self.prog} --help)\n")
