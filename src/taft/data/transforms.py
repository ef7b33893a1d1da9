"""Deterministic image preprocessing from an `ImagePreprocess`, without torchvision.

Pipeline: PIL image -> RGB (or L when the preprocess has one channel; grey, palette and alpha images are
converted, alpha is dropped) -> resize to exactly `image_size` (H, W) with the preprocess's PIL filter
(bicubic by default; small images such as 28 px Fashion-MNIST are simply upscaled) -> float tensor (C, H, W)
in [0, 1] -> per-channel `(x - mean) / std`.

Optional training-time augmentation (`augment=True`): a random resized crop (area scale (0.6, 1), aspect
ratio (3/4, 4/3), as in torchvision's RandomResizedCrop) followed by a horizontal flip with probability 1/2.
Randomness is reproducible: by default it is drawn from a generator seeded from (`seed`, epoch, example id),
so an example gets the same crop in a given epoch whatever the data order, batch size or worker count; call
`set_epoch(e)` to change crops between epochs (before creating the DataLoader iterator: workers copy the
transform when the iterator starts, so it does not reach `persistent_workers`). Augmented images are random, so trunk features of an augmented
dataset must not be cached: `FeatureCache` refuses such a dataset and the caller runs the trunk per batch.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from PIL import Image

from taft.backbones.base import ImagePreprocess
from taft.errors import TaftError

# Bump when the pixels produced for the same preprocess change, so that cached trunk features are recomputed.
TRANSFORM_VERSION = 1

AUGMENT_SCALE = (0.6, 1.0)
AUGMENT_RATIO = (3 / 4, 4 / 3)

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def preprocess_id(preprocess: ImagePreprocess, augment: bool = False) -> dict:
    """A JSON-ready description of the pixels `ImageTransform(preprocess, augment)` produces (for cache keys)."""
    d = preprocess.to_dict()
    return {
        "image_size": [int(s) for s in d["image_size"]],
        "patch_size": int(d["patch_size"]),
        "mean": [float(m) for m in d["mean"]],
        "std": [float(s) for s in d["std"]],
        "interpolation": str(d["interpolation"]),
        "augment": bool(augment),
        "version": TRANSFORM_VERSION,
    }


def _seed_from(*parts: object) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ImageTransform:
    """Callable `(image, key=None, generator=None) -> Tensor (C, H, W)` implementing the pipeline above.

    Raises `TaftError` for an unknown interpolation, a channel count other than 1 or 3, or a zero-size image.
    With `augment=True`, randomness comes from `generator` if given, else from one seeded by
    (`seed`, epoch, `key`) when a `key` (the example id; `ImageDataset` passes it) is given, else from the
    transform's own generator seeded with `seed`.
    """

    def __init__(self, preprocess: ImagePreprocess, augment: bool = False, seed: int = 0) -> None:
        h, w = (int(s) for s in preprocess.image_size)
        if h <= 0 or w <= 0:
            raise TaftError(f"image_size must be positive, got {preprocess.image_size}")
        if len(preprocess.mean) != len(preprocess.std) or len(preprocess.mean) not in (1, 3):
            raise TaftError(f"mean/std must both have 1 or 3 channels, got mean={preprocess.mean} "
                            f"std={preprocess.std}")
        if any(s <= 0 for s in preprocess.std):
            raise TaftError(f"std must be positive, got {preprocess.std}")
        if preprocess.interpolation not in _FILTERS:
            raise TaftError(f"unknown interpolation {preprocess.interpolation!r}; use one of {sorted(_FILTERS)}")
        self.preprocess = preprocess
        self.augment = bool(augment)
        self.seed = int(seed)
        self.epoch = 0
        self.size_hw = (h, w)
        self.mode = "RGB" if len(preprocess.mean) == 3 else "L"
        self._filter = _FILTERS[preprocess.interpolation]
        self._mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(preprocess.std, dtype=torch.float32).view(-1, 1, 1)
        self._generator = torch.Generator().manual_seed(self.seed)

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of epoch `epoch` (keyed augmentation) and reseed the transform's own generator."""
        self.epoch = int(epoch)
        self._generator.manual_seed(_seed_from(self.seed, self.epoch))

    def cache_id(self) -> dict:
        """`preprocess_id` of this transform."""
        return preprocess_id(self.preprocess, self.augment)

    def __call__(self, image: Image.Image, key: str | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        if image.width <= 0 or image.height <= 0:
            raise TaftError(f"cannot preprocess a zero-size image ({image.width}x{image.height})")
        if image.mode != self.mode:
            image = image.convert(self.mode)
        h, w = self.size_hw
        box = None
        flip = False
        if self.augment:
            if generator is None:
                generator = (torch.Generator().manual_seed(_seed_from(self.seed, self.epoch, key))
                             if key is not None else self._generator)
            box = _random_resized_crop_box(image.width, image.height, generator)
            flip = bool(torch.rand((), generator=generator) < 0.5)
        image = image.resize((w, h), self._filter, box=box)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        arr = np.asarray(image, dtype=np.uint8)
        x = torch.from_numpy(arr.copy()).float().div_(255.0)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        return (x - self._mean) / self._std

    def __repr__(self) -> str:
        return f"ImageTransform({self.preprocess}, augment={self.augment}, seed={self.seed})"


def _random_resized_crop_box(width: int, height: int, g: torch.Generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop with area fraction in AUGMENT_SCALE and aspect in AUGMENT_RATIO."""
    area = width * height
    log_lo, log_hi = math.log(AUGMENT_RATIO[0]), math.log(AUGMENT_RATIO[1])
    for _ in range(10):
        u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
        target = area * (AUGMENT_SCALE[0] + (AUGMENT_SCALE[1] - AUGMENT_SCALE[0]) * u[0])
        ratio = math.exp(log_lo + (log_hi - log_lo) * u[1])
        cw = int(round(math.sqrt(target * ratio)))
        ch = int(round(math.sqrt(target / ratio)))
        if 0 < cw <= width and 0 < ch <= height:
            left = int(torch.randint(0, width - cw + 1, (), generator=g))
            top = int(torch.randint(0, height - ch + 1, (), generator=g))
            return left, top, left + cw, top + ch
    # Fallback: the central crop clamped to the ratio range (as torchvision does).
    in_ratio = width / height
    if in_ratio < AUGMENT_RATIO[0]:
        cw, ch = width, int(round(width / AUGMENT_RATIO[0]))
    elif in_ratio > AUGMENT_RATIO[1]:
        ch, cw = height, int(round(height * AUGMENT_RATIO[1]))
    else:
        cw, ch = width, height
    left, top = (width - cw) // 2, (height - ch) // 2
    return left, top, left + cw, top + ch
