"""Reading a complete feature-cache entry: `CachedFeatures`, a dataset of its rows (or a selection of them), and
the checks that find a damaged entry.

A complete entry is checked when it is loaded: every file is there, features.npy's header agrees with meta.json and
its size is exactly the header's shape × dtype (cheap: no data is read), and the files match the SHA-256 sums
meta.json records ("sha256"; entries written before it record none and get the size checks only). features.npy is
hashed only up to `VERIFY_LIMIT` bytes unless asked (`verify=True`): it is read in full by every epoch anyway, but
hashing a multi-GB file on every load would cost seconds each time; the writer hashes it once, after writing it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from taft.data.split import select_positions
from taft.errors import TaftError
from taft.fileio import sha256_file

FEATURES = "features.npy"
ENTRY_FILES = (FEATURES, "labels.npy", "ids.json")
VERIFY_LIMIT = 256 * 2**20  # features.npy up to this size is hashed on every load (~0.3 s at ~1 GB/s)


def read_json_or_none(path: Path) -> Any:
    """The parsed JSON file, or None when it is missing or unreadable (an entry being written)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def completed_meta(directory: Path, digest: str) -> dict | None:
    """The meta.json of `directory` when it marks entry `digest` complete (it is written last); None for a miss or
    a partial build."""
    meta = read_json_or_none(directory / "meta.json")
    return meta if isinstance(meta, dict) and meta.get("entry") == digest else None


def npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, Fortran order, data offset) from the header of the .npy file at `path`, reading nothing
    else; `ValueError` if there is no valid header, `OSError` if it cannot be read."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        return shape, dtype, fortran, f.tell()


def layout_problem(directory: Path, meta: dict) -> str | None:
    """What is wrong with the files of the complete entry in `directory` (meta.json `meta`) that shows without
    reading their data: a missing file, a features.npy whose header disagrees with meta.json or whose size is not
    its header's shape × dtype (truncated or overlong). None when nothing is."""
    missing = [f for f in ENTRY_FILES if not (directory / f).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        shape, dtype, fortran, offset = npy_layout(directory / FEATURES)
        expected = (int(meta["n"]), *(int(d) for d in meta["feature_shape"]))
        if shape != expected or dtype != np.dtype(meta["dtype"]) or fortran:
            return f"{FEATURES} holds {shape} {dtype}, meta.json says {expected} {meta['dtype']}"
        size, needed = (directory / FEATURES).stat().st_size, offset + math.prod(shape) * dtype.itemsize
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{FEATURES} or meta.json unreadable ({type(e).__name__}: {e})"
    return None if size == needed else f"{FEATURES} has {size} bytes, its header needs {needed}"


def checksum_problem(directory: Path, meta: dict, verify: bool | None) -> str | None:
    """The first file of the entry whose SHA-256 is not the one meta.json records, as a problem; None when all
    match or none is recorded. features.npy is hashed when `verify` is True, or None and it is at most
    `VERIFY_LIMIT` bytes."""
    recorded = meta.get("sha256") or {}
    for name in sorted(recorded):
        path = directory / name
        if name == FEATURES and not (verify or (verify is None and path.stat().st_size <= VERIFY_LIMIT)):
            continue
        try:
            actual = sha256_file(path)
        except OSError as e:
            return f"{name} unreadable ({e.strerror})"
        if actual != recorded[name]:
            return f"{name} does not match its recorded checksum"
    return None


def entry_problem(directory: Path, meta: dict, verify: bool | None = None) -> str | None:
    """What makes the complete entry in `directory` (meta.json `meta`) damaged: `layout_problem`, then
    `checksum_problem` (with `verify`); None when it is whole."""
    return layout_problem(directory, meta) or checksum_problem(directory, meta, verify)


def usable(directory: Path, digest: str, verify: bool | None = None) -> bool:
    """Whether `directory` holds entry `digest` complete and whole (`entry_problem` finds nothing)."""
    meta = completed_meta(directory, digest)
    return meta is not None and entry_problem(directory, meta, verify) is None


class CachedFeatures(Dataset):
    """A complete cache entry (or a selection of its rows): `cf[i] -> (features float32 Tensor, label, id)`;
    `TaftError` for an entry that is incomplete or whose files do not fit together (`layout_problem`).

    `features` is the read-only memmap of the stored rows (its stored dtype) for a whole entry, an in-memory
    copy for a selection. Also `ids`, `labels`, `class_names`, `path`, `meta`, `feature_shape`.
    """

    def __init__(self, path: str | Path, rows: Sequence[int] | None = None) -> None:
        self.path = Path(path)
        meta = read_json_or_none(self.path / "meta.json")
        if not meta:
            raise TaftError(f"{self.path} is not a complete feature-cache entry (no readable meta.json)")
        problem = layout_problem(self.path, meta)
        if problem:
            raise TaftError(f"{self.path} is a damaged feature-cache entry ({problem}); rebuild it")
        self.meta: dict = meta
        self.class_names: list[str] = list(meta["class_names"])
        self.feature_shape: tuple[int, ...] = tuple(meta["feature_shape"])
        all_ids = json.loads((self.path / "ids.json").read_text())
        all_labels = np.load(self.path / "labels.npy")
        self._rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        sel = slice(None) if self._rows is None else self._rows
        self.ids: list[str] = list(all_ids) if self._rows is None else [all_ids[r] for r in self._rows]
        self.labels: list[int] = [int(y) for y in all_labels[sel]]
        lengths_file = self.path / "lengths.npy"
        self.lengths: list[int] | None = ([int(v) for v in np.load(lengths_file)[sel]]
                                          if lengths_file.is_file() else None)
        self._mm: np.ndarray | None = None
        self._loaded: np.ndarray | None = None  # the selected rows in memory (`in_memory()`)

    @property
    def _memmap(self) -> np.ndarray:
        if self._mm is None:
            self._mm = np.load(self.path / "features.npy", mmap_mode="r")
        return self._mm

    @property
    def features(self) -> np.ndarray:
        if self._loaded is not None:
            return self._loaded
        return self._memmap if self._rows is None else self._memmap[self._rows]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        if self._loaded is not None:
            x = torch.from_numpy(np.array(self._loaded[i], dtype=np.float32))
        else:
            row = i if self._rows is None else int(self._rows[i])
            x = torch.from_numpy(np.array(self._memmap[row], dtype=np.float32))
        return x, self.labels[i], self.ids[i]

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features as float32 (n, *feature_shape), labels int64 (n,)), loaded into memory."""
        feats = torch.from_numpy(np.array(self.features, dtype=np.float32))
        return feats, torch.tensor(self.labels, dtype=torch.int64)

    @property
    def rows(self) -> list[int] | None:
        """The entry's row numbers this selection holds (None: the whole entry)."""
        return None if self._rows is None else [int(r) for r in self._rows]

    def in_memory(self) -> CachedFeatures:
        """The same selection with its features loaded (stored dtype): it pickles with them, so a process that
        cannot read the cache's disk can train on it exactly as on the cache."""
        copy = object.__new__(CachedFeatures)
        copy.__dict__.update(self.__dict__)
        copy._mm, copy._loaded = None, np.ascontiguousarray(self.features)
        return copy

    def content_hash(self) -> str:
        """Names the entry and the selected rows."""
        h = hashlib.sha256(self.meta["entry"].encode())
        if self._rows is not None:
            h.update(self._rows.tobytes())
        return h.hexdigest()

    def select(self, ids: Sequence[str]) -> CachedFeatures:
        """The rows whose id is in `ids`, in entry order. Raises `TaftError` naming unknown ids."""
        local = select_positions(self.ids, ids, "the cached features")
        rows = local if self._rows is None else [int(self._rows[k]) for k in local]
        return CachedFeatures(self.path, rows)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_mm"] = None  # reopen in the worker instead of pickling the whole array (`_loaded` travels)
        return state

    def __repr__(self) -> str:
        return f"CachedFeatures({len(self)} x {self.feature_shape} {self.meta['dtype']} at {self.path})"
