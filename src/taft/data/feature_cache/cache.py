"""`FeatureCache`: find, build (resumably, one builder per entry) or clear entries under a root directory."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from taft.data.feature_cache.key import LabelledDataset, entry_digest, entry_key
from taft.data.feature_cache.reader import CachedFeatures, is_complete
from taft.data.feature_cache.writer import build_entry, locked
from taft.errors import TaftError
from taft.paths import cache_dir


class FeatureCache:
    """Trunk-feature cache under `root` (default `cache_dir()/"features"`, resolved at each use)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self._root = Path(root) if root is not None else None

    @property
    def root(self) -> Path:
        return self._root if self._root is not None else cache_dir() / "features"

    def entry_dir(self, dataset: LabelledDataset, key: dict, dtype: torch.dtype = torch.float32) -> Path:
        return self.root / entry_digest(entry_key(dataset, key, dtype))

    def load(self, dataset: LabelledDataset, key: dict, dtype: torch.dtype = torch.float32
             ) -> CachedFeatures | None:
        """The complete entry for (dataset, key, dtype), or None (a miss or a partial build)."""
        full = entry_key(dataset, key, dtype)
        directory = self.root / entry_digest(full)
        return CachedFeatures(directory) if is_complete(directory, entry_digest(full)) else None

    def build_or_load(self, dataset: LabelledDataset, trunk: Callable[[torch.Tensor], torch.Tensor], key: dict,
                      *, dtype: torch.dtype = torch.float32, batch_size: int = 64, num_workers: int = 0,
                      device: torch.device | str | None = None, progress: bool = True) -> CachedFeatures:
        """Load the entry, or compute it with `trunk` (batches (B, C, H, W) -> features (B, ...), called under
        `torch.no_grad()`, batches moved to `device` if given) and store it; resumes a partial build.
        Raises `TaftError` for a bad key or dtype, or trunk outputs of the wrong
        batch size, inconsistent shape or non-finite values (e.g. float16 overflow)."""
        if batch_size <= 0:
            raise TaftError(f"batch_size must be positive, got {batch_size}")
        if len(dataset) == 0:
            raise TaftError("cannot cache features of an empty dataset")
        full = entry_key(dataset, key, dtype)
        digest = entry_digest(full)
        directory = self.root / digest
        if is_complete(directory, digest):
            return CachedFeatures(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with locked(directory):
            if not is_complete(directory, digest):  # another process may have finished it meanwhile
                build_entry(directory, digest, full, dataset, trunk, dtype, batch_size, num_workers, device,
                            progress)
        return CachedFeatures(directory)

    def clear(self, dataset: LabelledDataset | None = None, key: dict | None = None,
              dtype: torch.dtype = torch.float32) -> int:
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
                           *, root: str | Path | None = None, dtype: torch.dtype = torch.float32,
                           batch_size: int = 64, num_workers: int = 0, device: torch.device | str | None = None,
                           progress: bool = True) -> CachedFeatures:
    """`FeatureCache(root).build_or_load(...)`."""
    return FeatureCache(root).build_or_load(dataset, trunk, key, dtype=dtype, batch_size=batch_size,
                                            num_workers=num_workers, device=device, progress=progress)
