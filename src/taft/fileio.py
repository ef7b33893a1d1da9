"""Atomic file writes: a reader sees either the old file or the complete new one, never a partial file.

Files are created with the mode an ordinary `open()` would give (0o666 minus the umask: 0644 by default), not the
0600 of `tempfile.mkstemp`."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read from /proc on Linux, without changing it; elsewhere set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(directory: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> Path:
    """A new empty file in `directory` (created, unique); the caller writes it, gives it the default mode
    (`finish_file`: writers such as safetensors may recreate the file) and renames or removes it."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    os.close(fd)
    return Path(name)


def finish_file(path: Path) -> None:
    """Give a written file the mode `open()` would have (0o666 minus the umask) and fsync it."""
    os.chmod(path, 0o666 & ~current_umask())
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temp_file(path.parent, prefix=f".{path.name}.")
    try:
        write(tmp_path)
        finish_file(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
