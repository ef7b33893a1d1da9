"""Where `fit` gets its trunk features (`FeatureSource`): cached features are trained on as they are; a raw
dataset (images, texts) is cached once (`Classifier.cache_features`) or streamed through the trunk on every batch
(`taft.train.streaming`), as the source's mode says:

- "cache": cache the dataset's trunk features (or reuse the entry), then train on them.
- "stream": run the frozen trunk on every batch; nothing is written to the feature cache. Needed to augment.
- "auto": cache when the entry (n × tokens × width × bytes) fits in `cache_max` bytes, else stream, saying so in
  one warning line; a run that augments streams its training data.

Streaming or caching in float32 does not change what is trained (up to the last bits of float summation); the
default float16 cache rounds each stored feature to float16 (relative error ≤ 2^-11), which changed validation
accuracy by less than the seed-to-seed spread where measured (docs/results.md). So neither is part of the recipe;
the augmentation, which does change what is trained, is (`TrainConfig.augment`).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Union

import torch

from taft.data.feature_cache import CachedFeatures, LabelledDataset
from taft.data.feature_cache.key import CACHE_DTYPE, dtype_name
from taft.data.feature_cache.writer import stack
from taft.errors import TaftError
from taft.model import Classifier
from taft.precision import check_autocast
from taft.train.examples import Examples, FeatureData, Prepared
from taft.train.streaming import Streamed
from taft.validate import check_choice, check_integer

FEATURE_MODES = ("auto", "cache", "stream")
# The default disk budget of one cache entry: 4 GiB. An entry is read in full every epoch, so it should stay in the
# page cache beside a training run on a 16 GB machine; and a user who did not ask for gigabytes of cache should not
# find them. In the default float16, CIFAR-10 mini (10,000 images) with DINOv2 ViT-S/14 takes 0.46 GiB at 112 px
# and 1.8 GiB at 224 px, Fashion-MNIST (60,000) at 112 px 2.8 GiB, and they cache; CIFAR-10 (50,000) at 224 px
# (9.2 GiB) streams. A float32 cache takes twice as much (Fashion-MNIST at 112 px: 5.6 GiB, streams).
CACHE_MAX = 4 * 2**30
MAX_LOADER_WORKERS = 8

TrainingData = Union[Examples, Streamed]


def default_loader_workers() -> int:
    """DataLoader workers when none are given: one per usable core but one (the trunk's process), at most
    `MAX_LOADER_WORKERS` (decoding and resizing a batch costs far less than the trunk on it)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(MAX_LOADER_WORKERS, cores - 1))


@dataclass(frozen=True)
class FeatureSource:
    """How `fit` turns a raw dataset into trunk features (see the module doc). mode: "auto", "cache" or "stream";
    cache_max: the entry size in bytes up to which "auto" caches; loader_workers: DataLoader worker processes that
    read, decode and preprocess a streamed dataset (None: `default_loader_workers()`); cache_dtype: the cache's
    storage dtype (float16, the default `CACHE_DTYPE`, or float32; streamed features stay float32); autocast: the
    trunk's precision, cached or streamed ("none", "bf16", "fp16"; part of the cache key); cache_root: the feature
    cache's directory (None: the default one)."""

    mode: str = "auto"
    cache_max: int = CACHE_MAX
    loader_workers: int | None = None
    cache_dtype: torch.dtype = CACHE_DTYPE
    autocast: str = "none"
    cache_root: str | Path | None = None

    def __post_init__(self) -> None:
        check_choice("features", self.mode, FEATURE_MODES)
        check_integer("cache_max", self.cache_max, minimum=0)
        if self.loader_workers is not None:
            check_integer("loader_workers", self.loader_workers, minimum=0)
        dtype_name(self.cache_dtype)
        check_autocast(self.autocast)

    @property
    def workers(self) -> int:
        return default_loader_workers() if self.loader_workers is None else self.loader_workers


def feature_source(features: FeatureSource | str) -> FeatureSource:
    """`features` as a `FeatureSource` (a mode name gives the defaults otherwise)."""
    return features if isinstance(features, FeatureSource) else FeatureSource(mode=features)


def is_dataset(data: Any) -> bool:
    """Whether `data` is a raw labelled dataset (items (input, label, id)) rather than trunk features."""
    return not isinstance(data, (CachedFeatures, tuple, list)) and hasattr(data, "class_names") \
        and hasattr(data, "__getitem__")


def entry_bytes(model: Classifier, dataset: LabelledDataset, dtype: torch.dtype) -> int:
    """The size of the features `model.cache_features(dataset, dtype=dtype)` would store: n × tokens × width ×
    bytes (text: rows of the dataset's longest example; images: the trunk's tokens for one example)."""
    width = getattr(dataset, "width", None)
    if width is not None:
        tokens = int(width)
    else:
        tokens = int(model.trunk_features(stack([dataset[0]])[0]).shape[1])
    return len(dataset) * tokens * model.config.dim * torch.finfo(dtype).bits // 8


def size_text(n: int) -> str:
    """`n` bytes in the largest binary unit that keeps a leading digit: "512 B", "3.68 GiB"."""
    unit = max((u for u in range(5) if n >= 1024**u), default=0)
    return f"{n} B" if unit == 0 else f"{n / 1024**unit:.3g} {'KMGT'[unit - 1]}iB"


def chosen_mode(model: Classifier, dataset: LabelledDataset, source: FeatureSource, augment: str, what: str) -> str:
    """"cache" or "stream" for `dataset` (see the module doc)."""
    if augment != "none":
        if source.mode == "cache":
            raise TaftError(f"augment={augment!r} needs streamed trunk features (a cache entry holds one fixed view "
                            "of each image): use features='stream'", arguments=("augment", "features"))
        return "stream"
    if source.mode != "auto":
        return source.mode
    size = entry_bytes(model, dataset, source.cache_dtype)
    if size <= source.cache_max:
        return "cache"
    warnings.warn(f"{what}: streaming trunk features (the trunk runs on every batch, nothing is cached): its cache "
                  f"entry would take {size_text(size)}, over the budget cache_max (--cache-max) of "
                  f"{size_text(source.cache_max)}", stacklevel=4)
    return "stream"


def training_data(model: Classifier, data: FeatureData | LabelledDataset, source: FeatureSource, what: str, *,
                  augment: str = "none", seed: int = 0, progress: bool = True) -> TrainingData:
    """`data` as `fit` consumes it: cached features as `Examples`; a raw dataset (an image dataset without a
    transform gets `model`'s preprocessing) cached by `model` into `Examples`, or `Streamed` through its trunk
    (augmented by `augment`, seeded by `seed`), as `source` and `chosen_mode` decide."""
    if not is_dataset(data):
        if source.mode == "stream":
            raise TaftError(f"{what}: features='stream' needs the raw dataset (images or texts), not cached "
                            "features", arguments=("features",))
        if augment != "none":
            raise TaftError(f"augment={augment!r} needs streamed trunk features: give the raw dataset (images), not "
                            "cached features", arguments=("augment",))
        return Examples(data, what)
    if getattr(data, "transform", ()) is None:
        data = data.with_transform(model.preprocess)
    if chosen_mode(model, data, source, augment, what) == "cache":
        return Examples(model.cache_features(data, autocast=source.autocast, dtype=source.cache_dtype,
                                             root=source.cache_root, progress=progress), what)
    check_autocast(source.autocast, model.device)
    return Streamed(data, what, augment=augment, seed=seed, workers=source.workers, autocast=source.autocast)


def validation_source(source: FeatureSource, train: TrainingData) -> FeatureSource:
    """The source of the validation data: "auto" follows the training data's choice when it streams (one
    decision, one line), else `source`."""
    return replace(source, mode="stream") if source.mode == "auto" and isinstance(train, Streamed) else source


def prepared(classifier: Classifier, data: TrainingData) -> Prepared | Streamed:
    """What `classifier`'s training and evaluation consume of `data` (`Prepared`, or `Streamed.prepared`)."""
    return data.prepared(classifier) if isinstance(data, Streamed) else Prepared(classifier, data)
