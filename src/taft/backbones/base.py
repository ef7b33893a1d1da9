"""A loaded backbone: the plain model, where it came from, and how to preprocess its inputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from taft.fingerprint import hash_tensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImagePreprocess:
    """Images are resized to `image_size` (H, W), both multiples of `patch_size`, scaled to [0, 1] and normalised
    per channel with `mean` and `std`."""

    image_size: tuple[int, int]
    patch_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Backbone:
    """`model` is a plain `ViT` (eval mode, frozen). `name` identifies the weights (registry name or file path)."""

    name: str
    model: nn.Module
    preprocess: ImagePreprocess
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the backbone's weights and architecture (cached; the weights are frozen)."""
        if self._fingerprint is None:
            arch = sorted(self.model.cfg.to_dict().items())
            self._fingerprint = hash_tensors(self.model.state_dict(), extra=[f"{k}={v}" for k, v in arch])
        return self._fingerprint
