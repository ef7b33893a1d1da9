"""Deterministic image preprocessing from an `ImagePreprocess`, without torchvision.

Pipeline: PIL image -> RGB (or L when the preprocess has one channel; grey, palette and alpha images are
converted, alpha is dropped) -> resize to exactly `image_size` (H, W) with the preprocess's PIL filter
(bicubic by default; small images such as 28 px Fashion-MNIST are simply upscaled) -> float tensor (C, H, W)
in [0, 1] -> per-channel `(x - mean) / std`.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from taft.backbones.base import ImagePreprocess
from taft.errors import TaftError

# Bump when the pixels produced for the same preprocess change, so that cached trunk features are recomputed.
TRANSFORM_VERSION = 1

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def preprocess_id(preprocess: ImagePreprocess) -> dict:
    """A JSON-ready description of the pixels `ImageTransform(preprocess)` produces (for cache keys; "augment":
    false stays in it so that the keys of existing feature-cache entries are unchanged)."""
    d = preprocess.to_dict()
    return {
        "image_size": [int(s) for s in d["image_size"]],
        "patch_size": int(d["patch_size"]),
        "mean": [float(m) for m in d["mean"]],
        "std": [float(s) for s in d["std"]],
        "interpolation": str(d["interpolation"]),
        "augment": False,
        "version": TRANSFORM_VERSION,
    }


class ImageTransform:
    """Callable `(image) -> Tensor (C, H, W)` implementing the pipeline above.

    Raises `TaftError` for an unknown interpolation, a channel count other than 1 or 3, or a zero-size image.
    """

    def __init__(self, preprocess: ImagePreprocess) -> None:
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
        self.size_hw = (h, w)
        self.mode = "RGB" if len(preprocess.mean) == 3 else "L"
        self._filter = _FILTERS[preprocess.interpolation]
        self._mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(preprocess.std, dtype=torch.float32).view(-1, 1, 1)

    def cache_id(self) -> dict:
        """`preprocess_id` of this transform."""
        return preprocess_id(self.preprocess)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.width <= 0 or image.height <= 0:
            raise TaftError(f"cannot preprocess a zero-size image ({image.width}x{image.height})")
        if image.mode != self.mode:
            image = image.convert(self.mode)
        h, w = self.size_hw
        arr = np.asarray(image.resize((w, h), self._filter), dtype=np.uint8)
        x = torch.from_numpy(arr.copy()).float().div_(255.0)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        return (x - self._mean) / self._std

    def __repr__(self) -> str:
        return f"ImageTransform({self.preprocess})"
