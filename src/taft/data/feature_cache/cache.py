"""`FeatureCache`: find, build (resumably, one builder per entry) or clear entries under a root directory."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from taft.data.feature_cache.key import CACHE_DTYPE, LabelledDataset, entry_digest, entry_key
from taft.data.feature_cache.reader import CachedFeatures, completed_meta, entry_problem, usable
from taft.data.feature_cache.writer import WRITE, build_entry, locked
from taft.errors import TaftError
from taft.fileio import os_errors
from taft.paths import cache_dir


class FeatureCache:
    """Trunk-feature cache under `root` (default `cache_dir()/"features"`, resolved at each use)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self._root = Path(root) if root is not None else None

    @property
    def root(self) -> Path:
        """The cache's directory; `TaftError` naming it if the default one cannot be created."""
        if self._root is not None:
            return self._root
        try:
            return cache_dir() / "features"
        except OSError as e:
            raise TaftError(f"cannot create the cache directory {e.filename}: {e.strerror or e}") from e

    def entry_dir(self, dataset: LabelledDataset, key: dict, dtype: torch.dtype = CACHE_DTYPE) -> Path:
        return self.root / entry_digest(entry_key(dataset, key, dtype))

    def load(self, dataset: LabelledDataset, key: dict, dtype: torch.dtype = CACHE_DTYPE, *,
             verify: bool | None = None) -> CachedFeatures | None:
        """The complete entry for (dataset, key, dtype), or None (a miss, a partial build or a damaged entry:
        `reader.entry_problem`; `verify`: hash features.npy always (True), never (False) or up to
        `reader.VERIFY_LIMIT` bytes (None))."""
        digest = entry_digest(entry_key(dataset, key, dtype))
        directory = self.root / digest
        return CachedFeatures(directory) if usable(directory, digest, verify) else None

    def build_or_load(self, dataset: LabelledDataset, trunk: Callable[[torch.Tensor], torch.Tensor], key: dict,
                      *, dtype: torch.dtype = CACHE_DTYPE, batch_size: int = 64, num_workers: int = 0,
                      device: torch.device | str | None = None, progress: bool = True,
                      verify: bool | None = None) -> CachedFeatures:
        """Load the entry, or compute it with `trunk` (batches (B, C, H, W) -> features (B, ...), called under
        `torch.no_grad()`, batches moved to `device` if given) and store it; resumes a partial build and rebuilds
        a damaged entry (checked as `load` checks it, `verify` likewise) with a one-line warning naming it.
        Raises `TaftError` for a bad key or dtype, trunk outputs of the wrong batch size, inconsistent shape or
        non-finite values (e.g. float16 overflow), or a filesystem that refuses the entry (a full disk, an
        unwritable directory: the entry stays incomplete and a later build resumes it)."""
        if batch_size <= 0:
            raise TaftError(f"batch_size must be positive, got {batch_size}")
        if len(dataset) == 0:
            raise TaftError("cannot cache features of an empty dataset")
        full = entry_key(dataset, key, dtype)
        digest = entry_digest(full)
        directory = self.root / digest
        if usable(directory, digest, verify):
            return CachedFeatures(directory)
        with os_errors(WRITE, directory):
            directory.mkdir(parents=True, exist_ok=True)
        with locked(directory):
            meta = completed_meta(directory, digest)  # another process may have finished it meanwhile
            problem = None if meta is None else entry_problem(directory, meta, verify)
            if problem is not None:
                warnings.warn(f"feature-cache entry {directory} is damaged ({problem}); rebuilding it", stacklevel=2)
            if meta is None or problem is not None:
                build_entry(directory, digest, full, dataset, trunk, dtype, batch_size, num_workers, device,
                            progress)
        return CachedFeatures(directory)

    def clear(self, dataset: LabelledDataset | None = None, key: dict | None = None,
              dtype: torch.dtype = CACHE_DTYPE) -> int:
        """Remove the entry of (dataset, key, dtype), or every entry when both are None; returns how many."""
        if (dataset is None) != (key is None):
            raise TaftError("clear() takes both dataset and key (one entry) or neither (everything)")
        root = self.root
        if dataset is not None and key is not None:
            targets = [self.entry_dir(dataset, key, dtype)]
        else:
            targets = [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
        removed = 0
        for p in targets:
            if p.is_dir():
                shutil.rmtree(p)
                removed += 1
        return removed


def build_or_load_features(dataset: LabelledDataset, trunk: Callable[[torch.Tensor], torch.Tensor], key: dict,
                           *, root: str | Path | None = None, dtype: torch.dtype = CACHE_DTYPE,
                           batch_size: int = 64, num_workers: int = 0, device: torch.device | str | None = None,
                           progress: bool = True, verify: bool | None = None) -> CachedFeatures:
    """`FeatureCache(root).build_or_load(...)`."""
    return FeatureCache(root).build_or_load(dataset, trunk, key, dtype=dtype, batch_size=batch_size,
                                            num_workers=num_workers, device=device, progress=progress,
                                            verify=verify)
