"""The key of a feature-cache entry: the caller's key (backbone fingerprint, trunk blocks, autocast), the data's
content hash, its preprocessing and the storage dtype; the entry's directory is the SHA-256 of that key."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from taft.errors import TaftError

FORMAT_VERSION = 1
DTYPES = {torch.float32: "float32", torch.float16: "float16"}
# The default storage dtype of trunk features, the one place it is set (cache_features, FeatureSource, a store's
# DataSource and --cache-dtype read it): float16 halves the disk and the page cache of an entry, and on a validation
# split it trained probe, NLFT-1 and TAFT-1 to the float32 accuracy within seed noise (docs/results.md).
CACHE_DTYPE = torch.float16


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


def key_text(obj: Any) -> str:
    """`obj` as compact canonical JSON; `TaftError` unless it is plain JSON data."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TaftError(f"feature-cache key must be plain JSON data (str, numbers, lists, dicts): {e}") from e


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" or "float16"; `TaftError` for another storage dtype."""
    if dtype not in DTYPES:
        raise TaftError(f"feature-cache dtype must be torch.float32 or torch.float16, got {dtype}")
    return DTYPES[dtype]


def entry_key(dataset: LabelledDataset, key: dict, dtype: torch.dtype = CACHE_DTYPE) -> dict:
    """The full key of `dataset`'s entry. Raises `TaftError` if the transform has no `cache_id` (not an
    `ImageTransform`) and `key` has no "preprocess" entry naming the preprocessing."""
    transform_id = getattr(dataset, "transform_id", lambda: None)()
    if transform_id is None and "preprocess" not in key:
        raise TaftError("the dataset's transform has no cache_id(); name its preprocessing in "
                        "key['preprocess'] so that a change of preprocessing invalidates the cache")
    full = {"format": FORMAT_VERSION, "key": key, "data": dataset.content_hash(), "n": len(dataset),
            "dtype": dtype_name(dtype)}
    if transform_id is not None:
        full["transform"] = transform_id
    key_text(full)
    return full


def entry_digest(full_key: dict) -> str:
    """The entry's directory name: SHA-256 of its full key."""
    return hashlib.sha256(key_text(full_key).encode()).hexdigest()
