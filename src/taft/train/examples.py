"""Training and evaluation data on cached trunk features: `Examples` (features, labels, ids, class names; the
text masks), checked against the run, and `Prepared`, what the trainer feeds a model (a probe's pooled features
are computed once)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Union

import numpy as np
import torch

from taft.data.feature_cache import CachedFeatures
from taft.errors import TaftError
from taft.model import Classifier
from taft.train.feeding import Batch, choose_feed, streamed

FeatureData = Union[CachedFeatures, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, Sequence[str]]]
EVAL_BATCH = 256


def check_labels(what: str, labels: torch.Tensor, names: Sequence[str] | None, class_names: Sequence[str]) -> None:
    """`TaftError` naming `what` unless `labels` index `class_names` and the data's class `names` (when known) are
    those."""
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= len(class_names):
        raise TaftError(f"{what}: labels must be in [0, {len(class_names)}), found {lo}..{hi}")
    if names is not None and list(names) != list(class_names):
        raise TaftError(f"{what}: class names {list(names)[:10]} differ from {list(class_names)[:10]}")


class Examples:
    """Features (in memory, or the feature cache's memmap), labels, and when known ids and class names. Text
    features also have `lengths` (real tokens per example; the rest of a row is padding)."""

    def __init__(self, data: FeatureData, what: str = "data"):
        self.what = what
        self.key: dict | None = None
        self.lengths: torch.Tensor | None = None
        self.feed = "host"  # see `place`
        if isinstance(data, CachedFeatures):
            self.x: torch.Tensor | np.ndarray = data.features  # read rows on demand; no full copy of a memmap
            self.labels = torch.tensor(data.labels, dtype=torch.int64)
            if data.lengths is not None:
                self.lengths = torch.tensor(data.lengths, dtype=torch.int64)
            self.ids: list[str] | None = list(data.ids)
            self.class_names: list[str] | None = list(data.class_names)
            key = data.meta.get("key", {})
            self.key = key.get("key") if isinstance(key, dict) else None
        elif isinstance(data, (tuple, list)) and len(data) in (2, 3):
            self.x = torch.as_tensor(data[0])
            self.labels = torch.as_tensor(data[1]).to(torch.int64).reshape(-1)
            self.ids = [str(i) for i in data[2]] if len(data) == 3 and data[2] is not None else None
            self.class_names = None
        else:
            raise TaftError(f"{what} must be CachedFeatures or a tuple (features, labels[, ids]), "
                            f"got {type(data).__name__}")
        n = self.x.shape[0]
        if n == 0:
            raise TaftError(f"{what} is empty")
        if len(self.labels) != n:
            raise TaftError(f"{what}: {n} feature rows but {len(self.labels)} labels")
        if self.ids is not None and len(self.ids) != n:
            raise TaftError(f"{what}: {n} feature rows but {len(self.ids)} ids")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features of rows `idx`, their mask (b, N) or None). Text rows are cut to the longest real length in
        the batch (dynamic padding), the mask marks each row's real tokens."""
        width = None
        if self.lengths is not None:
            lengths = self.lengths[idx]
            width = max(1, int(lengths.max())) if len(idx) else 1
        cols = slice(None) if width is None else slice(0, width)
        if isinstance(self.x, np.ndarray):
            x = torch.from_numpy(np.asarray(self.x[idx.numpy(), cols], dtype=np.float32))
        else:
            x = self.x[idx, cols]
        mask = None if width is None else torch.arange(width) < lengths[:, None]
        return x, mask

    def host_batch(self, idx: torch.Tensor) -> Batch:
        """(features, labels, mask) of rows `idx` where they are stored."""
        x, mask = self.rows(idx)
        return x, self.labels[idx], mask

    def batch(self, idx: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Batch:
        """(features, labels, mask) of rows `idx` on `device` (features in `dtype`)."""
        x, mask = self.rows(idx)
        mask = None if mask is None else mask.to(device, non_blocking=True)
        return x.to(device, dtype, non_blocking=True), self.labels[idx].to(device, non_blocking=True), mask

    @property
    def nbytes(self) -> int:
        """Bytes of the feature array as stored (memmap or tensor)."""
        x = self.x
        return int(x.nbytes) if isinstance(x, np.ndarray) else x.element_size() * x.numel()

    def place(self, device: torch.device, feed: str = "auto") -> str:
        """Choose how batches reach `device` (`taft.train.feeding`); "resident" copies the features there now.
        Features already on `device` (a probe's pooled features) stay resident. Returns the feed chosen."""
        self.feed = choose_feed(feed, device, self.nbytes)
        if isinstance(self.x, torch.Tensor) and self.x.device == device:
            self.feed = "resident"  # nothing to move
        if self.feed == "resident":
            x = self.x if isinstance(self.x, torch.Tensor) else torch.from_numpy(np.array(self.x))
            self.x = x.to(device)
        return self.feed

    def batches(self, order: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype,
                epoch: int = 0) -> Iterator[Batch]:
        """`batch(idx, ...)` for each index batch of `order`, streamed ahead when the feed is "stream". `epoch`
        (1-based, 0 outside training) changes nothing here: cached features are the same every epoch (streamed
        ones, `taft.train.streaming`, may be augmented per epoch)."""
        if self.feed == "stream":
            yield from streamed(self.host_batch, order, device, dtype)
            return
        for idx in order:
            yield self.batch(idx, device, dtype)

    def check_labels(self, class_names: Sequence[str]) -> None:
        check_labels(self.what, self.labels, self.class_names, class_names)

    def unaugmented(self) -> Examples:
        """These examples (cached features are never augmented)."""
        return self

    def check(self, model: Classifier) -> None:
        """Names any mismatch with `model`: feature width, labels, class names, trunk (from the cache key)."""
        if len(self.feature_shape) != 2:
            raise TaftError(f"{self.what}: expected trunk features (n, tokens, dim), got shape "
                            f"{tuple(self.x.shape)}")
        dim = model.config.dim
        if self.feature_shape[-1] != dim:
            raise TaftError(f"{self.what}: features have width {self.feature_shape[-1]}, backbone "
                            f"{model.backbone_name} has width {dim}")
        self.check_labels(model.class_names)
        if self.key is not None and {"backbone", "trunk_blocks"} <= set(self.key):
            if self.key["backbone"] != model.backbone_fingerprint:
                raise TaftError(f"{self.what}: the cached features were computed with another backbone "
                                f"(fingerprint {str(self.key['backbone'])[:12]}…) than {model.backbone_name} "
                                f"({model.backbone_fingerprint[:12]}…); cache them with this model")
            depth, k = model.config.depth, model.tangent_blocks
            if self.key["trunk_blocks"] != depth - k:
                have_k = depth - int(self.key["trunk_blocks"])
                raise TaftError(f"{self.what}: the cached features are for k={have_k} tangent blocks (trunk of "
                                f"{self.key['trunk_blocks']} blocks), this model has k={k}; cache them with "
                                "this model (model.cache_features)")


class Prepared(Examples):
    """What the trainer feeds `Classifier.train_logits`: the model's `train_inputs` of every row, when they differ
    from the trunk features (a probe's pooled features, computed once); else the trunk features themselves."""

    def __init__(self, classifier: Classifier, examples: Examples, batch_size: int = EVAL_BATCH):
        self.__dict__.update(examples.__dict__)
        if not classifier.tail.prepares_inputs:
            return  # trains on the trunk features as they are
        self.x = torch.cat([classifier.train_inputs(*examples.rows(idx))[0]
                            for idx in torch.arange(len(examples)).split(batch_size)])
        self.lengths = None  # prepared inputs have no tokens left to mask
