"""Progress bars: tqdm on a terminal; when stderr is redirected (a file, a pipe, CI logs), one plain line per bar
when it finishes (`trunk features: 6/6 ex in 1.2 s (4.9 ex/s)`), with no carriage returns or blank lines."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO, Union

from tqdm.auto import tqdm


class LineProgress:
    """The part of tqdm's interface taft uses (update, set_postfix, write, close), printing one line at close."""

    def __init__(self, total: int | None = None, initial: int = 0, desc: str | None = None, unit: str = "it",
                 file: TextIO | None = None, **_: Any):
        self.total, self.n, self.desc, self.unit = total, initial, desc or "", unit
        self.file = file
        self.postfix = ""
        self.start = time.perf_counter()
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def write(self, line: str, file: TextIO | None = None) -> None:
        print(line, file=file or self.file or sys.stderr, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        elapsed = time.perf_counter() - self.start
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        rate = f" ({self.n / elapsed:.3g} {self.unit}/s)" if elapsed > 0 and self.n else ""
        extra = f", {self.postfix}" if self.postfix else ""
        self.write(f"{self.desc}: {count} {self.unit} in {elapsed:.1f} s{rate}{extra}")


def progress_bar(*, disable: bool = False, file: TextIO | None = None, **kw: Any) -> tqdm | LineProgress:
    """`tqdm(**kw)` when shown on a terminal or in a notebook (or disabled); a `LineProgress` when the stream is
    redirected."""
    stream = file or sys.stderr
    if disable or stream.isatty() or "ipykernel" in sys.modules:
        return tqdm(disable=disable, file=file, **kw)
    return LineProgress(file=file, **kw)
ProgressBar = Union[tqdm, LineProgress]
