"""On-disk cache of frozen-trunk features, one entry per (key, data content, preprocessing, dtype).

The trunk is frozen and its input does not depend on the tangent parameters, so its output for an example
can be computed once and reused by every epoch, shard and run. An entry lives in
`<root>/<sha256 of the entry key>/` (root: `cache_dir()/"features"`), where the entry key is the caller's
`key` (backbone fingerprint, tangent blocks, ...) plus `dataset.content_hash()`, the dataset's
`transform_id()` (preprocessing) and the storage dtype. Any change there is a different directory, i.e. a
miss; stale entries are removed with `FeatureCache.clear()`.

Files of an entry:
  features.npy   (n, *feature_shape) float32 or float16, written in place through a memmap, chunk by chunk
  progress.json  chunk size and the chunks already written and flushed (an interrupted build resumes there;
                 the chunk size of the first attempt is kept, so a resumed build equals an uninterrupted one)
  labels.npy, ids.json
  lengths.npy    text only: real tokens per example. Rows are as long as the dataset's longest example (its
                 `width`); each batch runs the trunk padded to its own longest example only, and the positions
                 past an example's length hold zeros (they are masked out downstream anyway)
  meta.json      written atomically last: the completion marker. Without it an entry is never read as
                 complete. Its "device" (where the trunk ran) is information only: entries load anywhere.
Builds of one entry by several processes are serialised with a file lock (POSIX). With a CUDA `device` the loader
pins its batches and copies them asynchronously. A trunk run under autocast gives other features: its callers
(`taft.data.cache_features`) put the autocast setting into `key`; the stored dtype is always `dtype`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from taft.paths import cache_dir
from taft.errors import TaftError
from taft.fileio import atomic_write
from taft.progress import progress_bar

try:  # POSIX only; elsewhere builds are not locked.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

FORMAT_VERSION = 1
_DTYPES = {torch.float32: "float32", torch.float16: "float16"}
_MAX_LISTED = 10


class LabelledDataset(Protocol):
    """What the cache needs from a dataset (an `ImageDataset` has it): `dataset[i] -> (x, label, id)`. A dataset
    may also have `collate(batch)` (the batch's trunk input, labels, ids; default: stack) and `lengths` (tokens per
    example, stored with the features: `TextDataset`)."""

    class_names: Sequence[str]

    @property
    def ids(self) -> Sequence[str]: ...

    @property
    def labels(self) -> Sequence[int]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]: ...

    def content_hash(self) -> str: ...


def _canonical(obj: Any) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TaftError(f"feature-cache key must be plain JSON data (str, numbers, lists, dicts): {e}") from e


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPES:
        raise TaftError(f"feature-cache dtype must be torch.float32 or torch.float16, got {dtype}")
    return _DTYPES[dtype]


def entry_key(dataset: LabelledDataset, key: dict, dtype: torch.dtype = torch.float32) -> dict:
    """The full key of `dataset`'s entry. Raises `TaftError` if the transform has no `cache_id` (not an
    `ImageTransform`) and `key` has no "preprocess" entry naming the preprocessing."""
    transform_id = getattr(dataset, "transform_id", lambda: None)()
    if transform_id is None and "preprocess" not in key:
        raise TaftError("the dataset's transform has no cache_id(); name its preprocessing in "
                        "key['preprocess'] so that a change of preprocessing invalidates the cache")
    full = {"format": FORMAT_VERSION, "key": key, "data": dataset.content_hash(), "n": len(dataset),
            "dtype": _dtype_name(dtype)}
    if transform_id is not None:
        full["transform"] = transform_id
    _canonical(full)
    return full


def entry_digest(full_key: dict) -> str:
    return hashlib.sha256(_canonical(full_key).encode()).hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1)))


def _write_npy(path: Path, array: np.ndarray) -> None:
    def write(p: Path) -> None:
        with open(p, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
            np.save(f, array)

    atomic_write(path, write)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(directory / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _collate(batch: list[tuple[torch.Tensor, int, str]]) -> tuple[torch.Tensor, list[int], list[str]]:
    return torch.stack([b[0] for b in batch]), [int(b[1]) for b in batch], [b[2] for b in batch]


class CachedFeatures(Dataset):
    """A complete cache entry (or a selection of its rows): `cf[i] -> (features float32 Tensor, label, id)`.

    `features` is the read-only memmap of the stored rows (its stored dtype) for a whole entry, an in-memory
    copy for a selection. Also `ids`, `labels`, `class_names`, `path`, `meta`, `feature_shape`.
    """

    def __init__(self, path: str | Path, rows: Sequence[int] | None = None) -> None:
        self.path = Path(path)
        meta = _read_json(self.path / "meta.json")
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
        self._index: dict[str, int] | None = None

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
        if self._index is None:
            self._index = {i: k for k, i in enumerate(self.ids)}
        wanted = set(ids)
        unknown = sorted(wanted - set(self._index))
        if unknown:
            raise TaftError(f"{len(unknown)} ids are not in the cached features, e.g. {unknown[:_MAX_LISTED]}")
        local = [k for k, i in enumerate(self.ids) if i in wanted]
        rows = local if self._rows is None else [int(self._rows[k]) for k in local]
        return CachedFeatures(self.path, rows)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_mm"] = None  # reopen in the worker instead of pickling the whole array (`_loaded` travels)
        return state

    def __repr__(self) -> str:
        return f"CachedFeatures({len(self)} x {self.feature_shape} {self.meta['dtype']} at {self.path})"


class FeatureCache:
    """Trunk-feature cache under `root` (default `cache_dir()/"features"`, resolved at each use)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self._root = Path(root) if root is not None else None

    @property
    def root(self) -> Path:
        return self._root if self._root is not None else cache_dir() / "features"

    def entry_dir(self, dataset: LabelledDataset, key: dict, dtype: torch.dtype = torch.float32) -> Path:
        return self.root / entry_digest(entry_key(dataset, key, dtype))

    @staticmethod
    def _complete(directory: Path, digest: str) -> bool:
        meta = _read_json(directory / "meta.json")
        return (isinstance(meta, dict) and meta.get("entry") == digest
                and all((directory / f).is_file() for f in ("features.npy", "labels.npy", "ids.json")))

    def load(self, dataset: LabelledDataset, key: dict, dtype: torch.dtype = torch.float32
             ) -> CachedFeatures | None:
        """The complete entry for (dataset, key, dtype), or None (a miss or a partial build)."""
        full = entry_key(dataset, key, dtype)
        directory = self.root / entry_digest(full)
        return CachedFeatures(directory) if self._complete(directory, entry_digest(full)) else None

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
        if self._complete(directory, digest):
            return CachedFeatures(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with _locked(directory):
            if not self._complete(directory, digest):  # another process may have finished it meanwhile
                self._build(directory, digest, full, dataset, trunk, dtype, batch_size, num_workers, device,
                            progress)
        return CachedFeatures(directory)

    def _build(self, directory: Path, digest: str, full: dict, dataset: LabelledDataset,
               trunk: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype, batch_size: int,
               num_workers: int, device: torch.device | str | None, progress: bool) -> None:
        n = len(dataset)
        np_dtype = np.dtype(_dtype_name(dtype))
        feat_path, prog_path = directory / "features.npy", directory / "progress.json"
        state = _read_json(prog_path)
        mm: np.ndarray | None = None
        if (isinstance(state, dict) and state.get("entry") == digest and state.get("feature_shape")
                and feat_path.is_file()):
            try:
                mm = np.lib.format.open_memmap(feat_path, mode="r+")
            except (OSError, ValueError):
                mm = None
            if mm is not None and (mm.shape != (n, *state["feature_shape"]) or mm.dtype != np_dtype):
                mm = None
        if mm is None:  # start afresh
            state = {"entry": digest, "chunk": batch_size, "feature_shape": None, "done": []}
            for stale in (prog_path, feat_path, directory / "meta.json"):
                stale.unlink(missing_ok=True)
        chunk = int(state["chunk"])
        done = set(state["done"])
        todo = [c for c in range(math.ceil(n / chunk)) if c not in done]
        batches = [list(range(c * chunk, min(n, (c + 1) * chunk))) for c in todo]
        ids = list(dataset.ids)
        width = int(getattr(dataset, "width", 0) or 0) if getattr(dataset, "lengths", None) is not None else 0
        pin = device is not None and torch.device(device).type == "cuda"  # pinned batches copy asynchronously
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,  # type: ignore[arg-type]
                            collate_fn=getattr(dataset, "collate", _collate), pin_memory=pin)
        bar = progress_bar(total=n, initial=n - sum(len(b) for b in batches), disable=not progress,
                           desc="trunk features", unit="ex")
        try:
            with torch.no_grad():
                for c, rows, (x, _, batch_ids) in zip(todo, batches, loader):
                    if batch_ids != ids[rows[0]:rows[-1] + 1]:
                        raise TaftError("dataset returned ids out of order; dataset[i] must have id ids[i]")
                    out = trunk(x if device is None else x.to(device, non_blocking=pin))
                    out = self._check_output(out, len(rows), state["feature_shape"], dtype, width)
                    if mm is None:
                        state["feature_shape"] = [width, *out.shape[2:]] if width else list(out.shape[1:])
                        mm = np.lib.format.open_memmap(feat_path, mode="w+", dtype=np_dtype,
                                                       shape=(n, *state["feature_shape"]))
                    if width:  # zeros past each example's length (padding), whatever the batch it ran in; past
                        # the batch's width the new file is already zero (a chunk's rows, hence width, never change)
                        lengths = torch.tensor([dataset.lengths[r] for r in rows])
                        out[torch.arange(out.shape[1]) >= lengths[:, None]] = 0
                    mm[rows[0]:rows[-1] + 1, :out.shape[1]] = out.numpy()
                    mm.flush()  # data on disk before the progress file says so
                    done.add(c)
                    state["done"] = sorted(done)
                    _write_json(prog_path, state)
                    bar.update(len(rows))
        finally:
            bar.close()
            del mm
        _write_npy(directory / "labels.npy", np.asarray(dataset.labels, dtype=np.int64))
        lengths = getattr(dataset, "lengths", None)
        if lengths is not None:
            _write_npy(directory / "lengths.npy", np.asarray(lengths, dtype=np.int64))
        _write_json(directory / "ids.json", ids)
        meta = {"entry": digest, "key": full, "n": n, "feature_shape": state["feature_shape"],
                "dtype": _dtype_name(dtype), "chunk": chunk, "class_names": list(dataset.class_names),
                "device": str(device or "cpu"), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_json(directory / "meta.json", meta)
        prog_path.unlink(missing_ok=True)

    @staticmethod
    def _check_output(out: Any, batch: int, shape: list[int] | None, dtype: torch.dtype,
                      width: int = 0) -> torch.Tensor:
        """`width` > 0 (text): batches may be shorter than `width` tokens (dynamic padding), never longer."""
        if not isinstance(out, torch.Tensor):
            raise TaftError(f"trunk must return a Tensor, got {type(out).__name__}")
        if out.ndim < 2 or out.shape[0] != batch:
            raise TaftError(f"trunk returned shape {tuple(out.shape)} for a batch of {batch}; expected "
                            f"({batch}, ...)")
        if width and (out.ndim < 3 or out.shape[1] > width):
            raise TaftError(f"trunk returned {tuple(out.shape)} for text whose longest example has {width} tokens")
        got = list(out.shape[2:]) if width else list(out.shape[1:])
        if shape is not None and got != list(shape[1:] if width else shape):
            raise TaftError(f"trunk returned features of shape {tuple(out.shape[1:])}, earlier batches "
                            f"{tuple(shape)}")
        out = out.detach().to("cpu", dtype)
        if not torch.isfinite(out).all():
            hint = " (float16 overflow? use dtype=torch.float32)" if dtype == torch.float16 else ""
            raise TaftError(f"trunk returned non-finite features{hint}")
        return out.contiguous()

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
