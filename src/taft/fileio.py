"""Atomic file writes (a reader sees either the old file or the complete new one, never a partial file), the JSON
files every module writes and reads, the local time they record, files' SHA-256, and filesystem errors as one-line
`TaftError`s.

Files are created with the mode an ordinary `open()` would give (0o666 minus the umask: 0644 by default), not the
0600 of `tempfile.mkstemp`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from taft.errors import TaftError

try:  # POSIX only; elsewhere nothing is locked.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


def now() -> str:
    """The local time as files record it (checkpoints' `created`, the store's journal and audit log)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of the file's bytes, read in blocks of 1 MiB."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def os_errors(action: str, path: str | os.PathLike) -> Iterator[None]:
    """Turn an `OSError` in the block into the one-line `TaftError` "cannot {action} {path}: {strerror}" (a
    full disk, a read-only or unwritable directory), chained to it."""
    try:
        yield
    except OSError as e:
        raise TaftError(f"cannot {action} {path}: {e.strerror or e}") from e


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


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and unlinks in directory `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def canonical_json(obj: Any) -> str:
    """`obj` as JSON with sorted keys (equal objects give equal text); NaN and infinities are refused."""
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically replace `path` with `obj` as canonical JSON (temp file + fsync + rename + directory fsync)."""
    path = Path(path)
    atomic_write(path, lambda p: p.write_text(canonical_json(obj) + "\n", encoding="utf-8"))
    fsync_dir(path.parent)


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parsed JSON of `path`; `TaftError` naming `what` if it is missing, unreadable or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise TaftError(f"{what} {path} does not exist") from e
    except (OSError, ValueError) as e:
        raise TaftError(f"{what} {path} is unreadable or corrupt ({e})") from e


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, busy: str, *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file `path` (created, holding this process's pid) for the body. When
    another process holds it: `TaftError` "`busy` (pid N); try again when it ends", or with `wait` a warning
    "`busy` (pid N); waiting for it to end" and then wait. The lock dies with its process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            f.seek(0)
            holder = f"{busy} (pid {f.read().strip() or 'unknown'})"
            if not wait:
                raise TaftError(f"{holder}; try again when it ends") from e
            warnings.warn(f"{holder}; waiting for it to end", stacklevel=4)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            f.truncate(0)
            f.write(f"{os.getpid()}\n")
            f.flush()
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
