"""`--log-file`: a copy of what a command prints (results, warnings, errors, each progress bar's final state) as
plain lines appended to a file, after a header line naming the command and the time."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from taft.errors import TaftError


class Tee:
    """A text stream writing to `stream` unchanged and to `log` as plain lines: a line redrawn with carriage
    returns (a progress bar) keeps only its last state, blank lines are dropped."""

    def __init__(self, stream: TextIO, log: TextIO):
        self.stream, self.log, self.pending = stream, log, ""

    def write(self, text: str) -> int:
        self.stream.write(text)
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self._log(line)
        return len(text)

    def _log(self, line: str) -> None:
        line = line.rsplit("\r", 1)[-1].rstrip()
        if line:
            self.log.write(line + "\n")
            self.log.flush()

    def flush(self) -> None:
        self.stream.flush()

    def close_log(self) -> None:
        self._log(self.pending)
        self.pending = ""

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")


@contextlib.contextmanager
def log_to(path: Path, argv: Sequence[str]) -> Iterator[None]:
    """Copy stdout and stderr to `path` (appended) while the block runs."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise TaftError(f"cannot open --log-file {path}: {e.strerror or e}") from e
    log.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S%z')} taft {' '.join(argv)}\n")
    out, err = Tee(sys.stdout, log), Tee(sys.stderr, log)
    sys.stdout, sys.stderr = out, err  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out.stream, err.stream
        out.close_log()
        err.close_log()
        log.close()
