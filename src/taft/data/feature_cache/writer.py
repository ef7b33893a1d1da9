"""Writing a feature-cache entry resumably: features chunk by chunk through a memmap, progress.json after each
flushed chunk, meta.json (the completion marker) atomically last; one builder per entry (a POSIX file lock)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from taft.data.feature_cache.key import LabelledDataset, dtype_name
from taft.data.feature_cache.reader import read_json_or_none
from taft.errors import TaftError
from taft.fileio import atomic_write
from taft.progress import progress_bar

try:  # POSIX only; elsewhere builds are not locked.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1)))


def write_npy(path: Path, array: np.ndarray) -> None:
    def write(p: Path) -> None:
        with open(p, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
            np.save(f, array)

    atomic_write(path, write)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold the entry's build lock (a no-op where fcntl is missing)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(directory / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


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
    feat_path, prog_path = directory / "features.npy", directory / "progress.json"
    state = read_json_or_none(prog_path)
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
                write_json(prog_path, state)
                bar.update(len(rows))
    finally:
        bar.close()
        del mm
    write_npy(directory / "labels.npy", np.asarray(dataset.labels, dtype=np.int64))
    lengths = getattr(dataset, "lengths", None)
    if lengths is not None:
        write_npy(directory / "lengths.npy", np.asarray(lengths, dtype=np.int64))
    write_json(directory / "ids.json", ids)
    meta = {"entry": digest, "key": full, "n": n, "feature_shape": state["feature_shape"],
            "dtype": dtype_name(dtype), "chunk": chunk, "class_names": list(dataset.class_names),
            "device": str(device or "cpu"), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(directory / "meta.json", meta)
    prog_path.unlink(missing_ok=True)


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
        hint = " (float16 overflow? use dtype=torch.float32)" if dtype == torch.float16 else ""
        raise TaftError(f"trunk returned non-finite features{hint}")
    return out.contiguous()

