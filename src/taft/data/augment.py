"""Seeded image augmentation for training on streamed trunk features (never for evaluation, prediction or the
feature cache, whose entries hold one fixed view of each image).

- "none": the dataset's own preprocessing.
- "flip": a horizontal flip with probability 1/2, of the preprocessed tensor.
- "crop-flip": a random resized crop (an area fraction of the image drawn from `CROP_SCALE`, an aspect ratio
  drawn log-uniformly from `CROP_RATIO`, a uniform position; after `CROP_TRIES` boxes that do not fit, the
  central crop of the nearest allowed ratio), resized to the model's input by the dataset's own preprocessing
  (the same filter as evaluation), then the flip.

Every draw comes from a generator seeded by (run seed, epoch, example id) alone (`view_generator`): a view does
not depend on the batch, the order, the loader worker or the process that makes it, so a run is reproducible and
a retrained shard sees the views it saw before.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch
from PIL import Image
from torch.utils.data import Dataset

from taft.data.images import ImageDataset
from taft.errors import TaftError
from taft.validate import check_choice

AUGMENTS = ("none", "flip", "crop-flip")
# The usual range of fine-tuning recipes (timm's and torchvision's RandomResizedCrop defaults), kept so that the
# validation study measures the augmentation users know; a narrower one is a one-line change if it wins there.
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10


def view_generator(seed: int, epoch: int, example_id: str) -> torch.Generator:
    """A generator seeded by (seed, epoch, example id) only (SHA-256 of the three, 63 bits of it)."""
    digest = hashlib.sha256(json.dumps([int(seed), int(epoch), str(example_id)]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen, dtype=torch.float64))


def crop_box(width: int, height: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random resized crop of a `width` × `height` image (see the module doc)."""
    area = width * height
    for _ in range(CROP_TRIES):
        target = area * uniform(gen, *CROP_SCALE)
        ratio = math.exp(uniform(gen, math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(width - w + 1, (), generator=gen))
            top = int(torch.randint(height - h + 1, (), generator=gen))
            return left, top, left + w, top + h
    ratio = min(max(width / height, CROP_RATIO[0]), CROP_RATIO[1])
    w, h = (width, round(width / ratio)) if width / height <= ratio else (round(height * ratio), height)
    w, h = max(1, min(w, width)), max(1, min(h, height))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class AugmentedImages(Dataset):
    """`dataset` (an `ImageDataset` with its transform) seen through `augment` at `epoch` of a run seeded `seed`:
    `view[i] -> (augmented tensor (C, H, W), label, id)`; `ids`, `labels`, `class_names` as the dataset's."""

    def __init__(self, dataset: ImageDataset, augment: str, seed: int, epoch: int):
        check_choice("augment", augment, AUGMENTS)
        if augment == "none":
            raise TaftError("AugmentedImages needs an augmentation; use the dataset itself for augment='none'")
        if dataset.transform is None:
            raise TaftError("augmenting an image dataset needs its preprocessing (a transform)")
        self.dataset, self.augment, self.seed, self.epoch = dataset, augment, seed, epoch
        self.ids, self.labels, self.class_names = dataset.ids, dataset.labels, dataset.class_names

    def __len__(self) -> int:
        return len(self.dataset)

    def view(self, image: Image.Image, example_id: str) -> torch.Tensor:
        """The augmented, preprocessed view of `image` (example `example_id`) in this epoch."""
        gen = view_generator(self.seed, self.epoch, example_id)
        if self.augment == "crop-flip":
            image = image.crop(crop_box(image.width, image.height, gen))
        x = self.dataset.transform(image)
        return x.flip(-1) if bool(torch.rand((), generator=gen) < 0.5) else x

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        r = self.dataset.records[i]
        return self.view(r.source.load(), r.id), int(r.label), r.id


def augmented(dataset: Dataset, augment: str, seed: int, epoch: int) -> Dataset:
    """`dataset` itself for augment "none", else its `AugmentedImages` view (images only: `TaftError` for text)."""
    check_choice("augment", augment, AUGMENTS)
    if augment == "none":
        return dataset
    if not isinstance(dataset, ImageDataset):
        raise TaftError(f"augment={augment!r} applies to images; this data is {type(dataset).__name__}",
                        arguments=("augment",))
    return AugmentedImages(dataset, augment, seed, epoch)
