"""Writing a feature-cache entry resumably: features chunk by chunk through a memmap (its disk space reserved first),
progress.json after each flushed chunk, meta.json (the completion marker, with the SHA-256 of every file)
atomically last; one builder per entry (a POSIX file lock). A filesystem error (a full disk, an unwritable
directory) is a one-line `TaftError` naming the file; the entry stays incomplete and a later build resumes it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from taft.data.feature_cache.key import LabelledDataset, dtype_name
from taft.data.feature_cache.reader import ENTRY_FILES, FEATURES, read_json_or_none
from taft.errors import TaftError
from taft.fileio import atomic_write, os_errors, sha256_file
from taft.progress import progress_bar

try:  # POSIX only; elsewhere builds are not locked.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

WRITE = "write feature-cache entry"


def write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as JSON to `path`; `TaftError` naming it if the filesystem refuses."""
    with os_errors(WRITE, path):
        atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1)))


def write_npy(path: Path, array: np.ndarray) -> None:
    """Atomically write `array` as .npy to `path`; `TaftError` naming it if the filesystem refuses."""
    def write(p: Path) -> None:
        with open(p, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
            np.save(f, array)

    with os_errors(WRITE, path):
        atomic_write(path, write)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold the entry's build lock (a no-op where fcntl is missing); `TaftError` if the lock file cannot be
    written."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with os_errors(WRITE, directory / ".lock"):
        f = open(directory / ".lock", "a+")
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def allocate(path: Path) -> None:
    """Reserve the disk space of the (sparse) file at `path`, so that a full disk is an `OSError` here rather than a
    SIGBUS while writing through a memmap (a no-op where `os.posix_fallocate` is missing)."""
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)


def new_features(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.memmap:
    """A new features.npy of `shape` and `dtype`, open for writing, its disk space reserved (`allocate`)."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    allocate(path)
    return mm


def resumable(directory: Path, digest: str, n: int, dtype: np.dtype, chunk: int) -> tuple[dict, np.memmap | None]:
    """(progress state, features memmap) of an interrupted build of entry `digest` in `directory` that can go on
    (its chunk size kept); otherwise a fresh state of chunks of `chunk` rows and None, with the stale files
    removed."""
    feat_path, prog_path = directory / FEATURES, directory / "progress.json"
    state = read_json_or_none(prog_path)
    if (isinstance(state, dict) and state.get("entry") == digest and state.get("feature_shape")
            and feat_path.is_file()):
        try:
            mm = np.lib.format.open_memmap(feat_path, mode="r+")
        except (OSError, ValueError):
            mm = None
        if mm is not None and mm.shape == (n, *state["feature_shape"]) and mm.dtype == dtype:
            return state, mm
    with os_errors(WRITE, directory):
        for stale in (prog_path, feat_path, directory / "meta.json"):
            stale.unlink(missing_ok=True)
    return {"entry": digest, "chunk": chunk, "feature_shape": None, "done": []}, None


def stack(batch: list[tuple[torch.Tensor, int, str]]) -> tuple[torch.Tensor, list[int], list[str]]:
    """The default collate: (stacked inputs, labels, ids)."""
    return torch.stack([b[0] for b in batch]), [int(b[1]) for b in batch], [b[2] for b in batch]


def build_entry(directory: Path, digest: str, full: dict, dataset: LabelledDataset,
                trunk: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype, batch_size: int,
                num_workers: int, device: torch.device | str | None, progress: bool) -> None:
    """Compute entry `digest` (full key `full`) of `dataset` with `trunk` into `directory`, continuing from the
    chunks an interrupted build flushed; the caller holds the entry's lock."""
    n = len(dataset)
    np_dtype = np.dtype(dtype_name(dtype))
    feat_path, prog_path = directory / FEATURES, directory / "progress.json"
    state, mm = resumable(directory, digest, n, np_dtype, batch_size)
    chunk = int(state["chunk"])
    done = set(state["done"])
    todo = [c for c in range(math.ceil(n / chunk)) if c not in done]
    batches = [list(range(c * chunk, min(n, (c + 1) * chunk))) for c in todo]
    ids = list(dataset.ids)
    width = int(getattr(dataset, "width", 0) or 0) if getattr(dataset, "lengths", None) is not None else 0
    pin = device is not None and torch.device(device).type == "cuda"  # pinned batches copy asynchronously
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,  # type: ignore[arg-type]
                        collate_fn=getattr(dataset, "collate", stack), pin_memory=pin)
    bar = progress_bar(total=n, initial=n - sum(len(b) for b in batches), disable=not progress,
                       desc="trunk features", unit="ex")
    try:
        with torch.no_grad():
            for c, rows, (x, _, batch_ids) in zip(todo, batches, loader):
                if batch_ids != ids[rows[0]:rows[-1] + 1]:
                    raise TaftError("dataset returned ids out of order; dataset[i] must have id ids[i]")
                out = trunk(x if device is None else x.to(device, non_blocking=pin))
                out = check_output(out, len(rows), state["feature_shape"], dtype, width)
                if width:  # zeros past each example's length (padding), whatever the batch it ran in; past
                    # the batch's width the new file is already zero (a chunk's rows, hence width, never change)
                    lengths = torch.tensor([dataset.lengths[r] for r in rows])
                    out[torch.arange(out.shape[1]) >= lengths[:, None]] = 0
                with os_errors(WRITE, feat_path):
                    if mm is None:
                        state["feature_shape"] = [width, *out.shape[2:]] if width else list(out.shape[1:])
                        mm = new_features(feat_path, np_dtype, (n, *state["feature_shape"]))
                    mm[rows[0]:rows[-1] + 1, :out.shape[1]] = out.numpy()
                    mm.flush()  # data on disk before the progress file says so
                done.add(c)
                state["done"] = sorted(done)
                write_json(prog_path, state)
                bar.update(len(rows))
    finally:
        bar.close()
        del mm
    finish_entry(directory, digest, full, dataset, state, dtype, device)


def finish_entry(directory: Path, digest: str, full: dict, dataset: LabelledDataset, state: dict,
                 dtype: torch.dtype, device: torch.device | str | None) -> None:
    """Write the entry's labels, ids (and lengths, for text), then meta.json with every file's SHA-256 (features.npy
    read back once, whole: what reached the disk), and drop progress.json."""
    write_npy(directory / "labels.npy", np.asarray(dataset.labels, dtype=np.int64))
    lengths = getattr(dataset, "lengths", None)
    files = list(ENTRY_FILES)
    if lengths is not None:
        write_npy(directory / "lengths.npy", np.asarray(lengths, dtype=np.int64))
        files.append("lengths.npy")
    write_json(directory / "ids.json", list(dataset.ids))
    sums = {}
    for name in files:
        with os_errors("read feature-cache entry", directory / name):
            sums[name] = sha256_file(directory / name)
    meta = {"entry": digest, "key": full, "n": len(dataset), "feature_shape": state["feature_shape"],
            "dtype": dtype_name(dtype), "chunk": state["chunk"], "class_names": list(dataset.class_names),
            "device": str(device or "cpu"), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sha256": sums}
    write_json(directory / "meta.json", meta)
    with os_errors(WRITE, directory):
        (directory / "progress.json").unlink(missing_ok=True)


def check_output(out: Any, batch: int, shape: list[int] | None, dtype: torch.dtype, width: int = 0) -> torch.Tensor:
    """The trunk's output for a batch of `batch`, checked (a tensor, consistent shape, finite) and moved to the CPU
    in the storage dtype. `width` > 0 (text): batches may be shorter than `width` tokens (dynamic padding), never
    longer."""
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
        hint = (" (float16 overflow? cache in float32: dtype=torch.float32, --cache-dtype float32)"
                if dtype == torch.float16 else "")
        raise TaftError(f"trunk returned non-finite features{hint}")
    return out.contiguous()

