"""On-disk layout of a model store and the file primitives every store operation uses.

    <store>/manifest.json      the single commit point (see `taft.store.commit`)
    <store>/shards/shard-XXX-<sha256[:16]>.safetensors   one Δw checkpoint per shard, content-addressed
    <store>/composed.safetensors   the composed model, an ordinary taft checkpoint
    <store>/forgotten.json     sorted JSON list of forgotten ids (a copy of the manifest's, written after commit)
    <store>/audit.jsonl        append-only log, one JSON object per line
    <store>/pending.json       journal of the operation in progress (absent when none)
    <store>/.lock              flock(2) serialising operations on the store

Test hooks: `crashpoint(name)` calls `os._exit(CRASH_EXIT)` when `TAFT_TEST_CRASH_AT` equals `name`, and sleeps
`TAFT_TEST_STEP_DELAY` seconds (if set) so that a test can kill the process at a random moment mid-operation.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from taft.errors import TaftError
from taft.fileio import exclusive_lock

CRASH_ENV = "TAFT_TEST_CRASH_AT"
DELAY_ENV = "TAFT_TEST_STEP_DELAY"
CRASH_EXIT = 86
SHARD_PREFIX = "shard-"
SHARD_SUFFIX = ".safetensors"


def crashpoint(name: str) -> None:
    """Test hook at a named step of a store operation (see the module doc); does nothing in normal use."""
    delay = os.environ.get(DELAY_ENV)
    if delay:
        time.sleep(float(delay))
    if os.environ.get(CRASH_ENV) == name:
        os._exit(CRASH_EXIT)


class StoreLayout:
    """Paths of a store rooted at `root`, plus its lock."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def pending(self) -> Path:
        return self.root / "pending.json"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def forgotten(self) -> Path:
        return self.root / "forgotten.json"

    @property
    def composed(self) -> Path:
        return self.root / "composed.safetensors"

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def path(self, relative: str) -> Path:
        """A file named in the manifest (relative POSIX path inside the store)."""
        p = Path(relative)
        if p.is_absolute() or ".." in p.parts:
            raise TaftError(f"store file name {relative!r} points outside the store")
        return self.root / p

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def shard_files(self) -> list[Path]:
        """Every finished shard file in shards/ (referenced or not)."""
        if not self.shards_dir.is_dir():
            return []
        return sorted(p for p in self.shards_dir.iterdir()
                      if p.name.startswith(SHARD_PREFIX) and p.name.endswith(SHARD_SUFFIX))

    def temp_files(self) -> list[Path]:
        """Leftovers of interrupted writes (hidden `*.tmp` files) in the store and shards/."""
        out: list[Path] = []
        for d in (self.root, self.shards_dir):
            if d.is_dir():
                out += [p for p in d.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
        return sorted(out)

    @contextlib.contextmanager
    def locked(self, wait: bool = True, create: bool = False) -> Iterator[None]:
        """Exclusive lock on the store for one operation (`taft.fileio.exclusive_lock`: another holder is named,
        in a warning before waiting, or with `wait=False` in a `TaftError`). The lock dies with its process, so a
        killed operation never leaves the store locked. `TaftError` if the store directory does not exist, unless
        `create` (a new store)."""
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.root.is_dir():
            raise TaftError(f"{self.root} is not a model store (no such directory)")
        with exclusive_lock(self.lock_file, f"store {self.root} is locked by a running operation", wait=wait):
            yield


def shard_file_name(index: int, sha256: str) -> str:
    return f"{SHARD_PREFIX}{index:03d}-{sha256[:16]}{SHARD_SUFFIX}"
