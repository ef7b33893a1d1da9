"""Training data whose trunk features are computed batch by batch (`Streamed`), instead of read from the feature
cache: the frozen trunk runs on every batch (no gradient; autocast allowed), nothing is written to disk, and images
may be augmented (`taft.data.augment`, seeded by the run seed, the epoch and the example id).

Examples are read, decoded and preprocessed (and augmented) by a `DataLoader` with `workers` worker processes, in
pinned memory on CUDA, while the trunk runs on the batch before; the batches and their order are the sampler's, as
for cached features. Text is padded per batch to its longest example and its padded positions are zeroed, as the
cache stores them. Without augmentation the features equal the cached ones up to the last bits of float
summation (another batch grouping); see tests/test_streaming.py for the measured tolerance.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from taft.backbones.trunk import input_mask
from taft.data.augment import augmented
from taft.data.feature_cache import LabelledDataset
from taft.data.feature_cache.writer import stack
from taft.errors import TaftError
from taft.model import Classifier
from taft.precision import autocast as autocast_context
from taft.train.examples import check_labels
from taft.train.feeding import Batch

STREAMED = "trunk"  # what metrics.json's compute.feed records for a streamed split


class Streamed:
    """A raw labelled dataset (images with their preprocessing, or a `TextDataset`) as training or evaluation data
    whose batches run a model's trunk. `augment` ("none", "flip", "crop-flip": images only) and `seed` make
    epoch e's view of each example; `workers`: DataLoader worker processes (0: read in this process); `autocast`:
    the trunk's precision ("none", "bf16", "fp16"). `prepared(classifier)` binds the model whose trunk and
    `train_inputs` make the batches; `len`, `labels`, `ids` and `class_names` are the dataset's."""

    def __init__(self, dataset: LabelledDataset, what: str = "data", *, augment: str = "none", seed: int = 0,
                 workers: int = 0, autocast: str = "none"):
        if len(dataset) == 0:
            raise TaftError(f"{what} is empty")
        if workers < 0:
            raise TaftError(f"loader_workers must be ≥ 0, got {workers}", arguments=("loader_workers",))
        augmented(dataset, augment, seed, 1)  # checks that the augmentation applies to this data
        self.dataset, self.what, self.augment, self.seed = dataset, what, augment, seed
        self.workers, self.autocast = workers, autocast
        self.labels = torch.tensor(list(dataset.labels), dtype=torch.int64)
        self.ids: list[str] | None = [str(i) for i in dataset.ids]
        self.class_names: list[str] | None = list(dataset.class_names)
        self.classifier: Classifier | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def check(self, model: Classifier) -> None:
        """Names any mismatch of labels or class names with `model`."""
        check_labels(self.what, self.labels, self.class_names, model.class_names)

    def prepared(self, classifier: Classifier) -> Streamed:
        """This data feeding `classifier` (its trunk, then its `train_inputs`: a probe's pooled features)."""
        bound = copy.copy(self)
        bound.classifier = classifier
        return bound

    def unaugmented(self) -> Streamed:
        """The same data without augmentation (for evaluating on the training data)."""
        plain = copy.copy(self)
        plain.augment = "none"
        return plain

    def place(self, device: torch.device, feed: str = "auto") -> str:
        """Nothing to place: batches are made on the device. Returns what metrics.json records as the feed."""
        return STREAMED

    def batches(self, order: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype,
                epoch: int = 0) -> Iterator[Batch]:
        """(train inputs, labels, mask) on `device` (inputs in `dtype`) for each index batch of `order`, epoch
        `epoch`'s views (1-based; augmentation draws depend on it), read ahead by the loader's workers."""
        if self.classifier is None:
            raise TaftError("streamed data feeds a model: use data.prepared(classifier)")
        data = augmented(self.dataset, self.augment, self.seed, epoch)
        pin = device.type == "cuda"
        loader = iter(self.loader(data, [idx.tolist() for idx in order if len(idx)], pin))
        for idx in order:
            if len(idx):
                yield self.features(next(loader), device, dtype, pin)
            else:  # an empty Poisson batch (DP-SGD): the shapes of one example's inputs, no rows
                x, y, mask = self.features(self.collate(data, [0]), device, dtype, pin)
                yield x[:0], y[:0], None if mask is None else mask[:0]

    def loader(self, data: Dataset, batches: list[list[int]], pin: bool) -> DataLoader:
        return DataLoader(data, batch_sampler=batches, num_workers=self.workers,  # type: ignore[arg-type]
                          collate_fn=getattr(self.dataset, "collate", stack), pin_memory=pin)

    def collate(self, data: Dataset, rows: list[int]) -> tuple:
        return getattr(self.dataset, "collate", stack)([data[r] for r in rows])

    def features(self, batch: tuple, device: torch.device, dtype: torch.dtype, pin: bool) -> Batch:
        """The bound model's train inputs (and mask) and the labels of one collated batch (inputs, labels, ids)."""
        clf = self.classifier
        assert clf is not None
        inputs, labels, _ = batch
        inputs = inputs.to(device, non_blocking=pin)
        with torch.no_grad(), autocast_context(self.autocast, device):
            tokens = clf.trunk_features(inputs)
        mask = input_mask(inputs)
        tokens = tokens.to(dtype)
        if mask is not None:  # padded positions hold zeros, as in the cache
            tokens = tokens.masked_fill(~mask[..., None], 0)
        with torch.no_grad():
            x, mask = clf.train_inputs(tokens, mask)
        return x.to(dtype), torch.as_tensor(labels, dtype=torch.int64).to(device, non_blocking=pin), mask
