"""Reading a complete feature-cache entry: `CachedFeatures`, a dataset of its rows (or a selection of them)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from taft.data.split import select_positions
from taft.errors import TaftError


def read_json_or_none(path: Path) -> Any:
    """The parsed JSON file, or None when it is missing or unreadable (an entry being written)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_complete(directory: Path, digest: str) -> bool:
    """Whether `directory` holds the complete entry `digest` (its meta.json, the completion marker, is written)."""
    meta = read_json_or_none(directory / "meta.json")
    return (isinstance(meta, dict) and meta.get("entry") == digest
            and all((directory / f).is_file() for f in ("features.npy", "labels.npy", "ids.json")))


class CachedFeatures(Dataset):
    """A complete cache entry (or a selection of its rows): `cf[i] -> (features float32 Tensor, label, id)`.

    `features` is the read-only memmap of the stored rows (its stored dtype) for a whole entry, an in-memory
    copy for a selection. Also `ids`, `labels`, `class_names`, `path`, `meta`, `feature_shape`.
    """

    def __init__(self, path: str | Path, rows: Sequence[int] | None = None) -> None:
        self.path = Path(path)
        meta = read_json_or_none(self.path / "meta.json")
        if not meta:
            raise TaftError(f"{self.path} is not a complete feature-cache entry (no readable meta.json)")
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
