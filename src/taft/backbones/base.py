"""A loaded backbone: the plain model, where it came from, and how to preprocess its inputs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import nn

from taft.errors import TaftError
from taft.fingerprint import hash_tensors

if TYPE_CHECKING:
    from taft.backbones.tokenizer import TextTokenizer

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


@dataclass(frozen=True)
class TextPreprocess:
    """Texts are tokenized with the tokenizer whose tokenizer.json has SHA-256 `tokenizer`, as
    [CLS] tokens [SEP], truncated to `max_length` tokens (with a warning; ≤ the model's positions), and padded
    with `pad_id` (padding is masked out everywhere)."""

    tokenizer: str
    max_length: int
    pad_id: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


Preprocess = Union[ImagePreprocess, TextPreprocess]


def preprocess_from_dict(d: dict[str, Any]) -> Preprocess:
    """Inverse of `to_dict()` for either kind (text preprocessing names a tokenizer). Raises TypeError/ValueError
    on malformed input."""
    if "tokenizer" in d:
        return TextPreprocess(tokenizer=str(d["tokenizer"]), max_length=int(d["max_length"]),
                              pad_id=int(d.get("pad_id", 0)))
    return ImagePreprocess(image_size=tuple(int(v) for v in d["image_size"]), patch_size=int(d["patch_size"]),
                           mean=tuple(float(v) for v in d["mean"]), std=tuple(float(v) for v in d["std"]),
                           interpolation=str(d.get("interpolation", "bicubic")))


@dataclass
class TokenBatch:
    """A padded batch of token ids (B, N) int64 with its mask (B, N) bool, True = real token (padding last)."""

    ids: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.ids.shape != self.mask.shape:
            raise TaftError(f"token ids {tuple(self.ids.shape)} and mask {tuple(self.mask.shape)} must be equal "
                            "(batch, length) shapes")

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device: torch.device | str | None = None, *args: Any, **kwargs: Any) -> TokenBatch:
        """Moves to `device` (other arguments, e.g. a float dtype, do not apply to ids and are ignored)."""
        return TokenBatch(self.ids.to(device), self.mask.to(device)) if device is not None else self


@dataclass
class Backbone:
    """`model` is a plain `ViT` or `BertEncoder` (eval mode, frozen). `name` identifies the weights (registry name
    or file path). Text backbones also carry their `tokenizer`."""

    name: str
    model: nn.Module
    preprocess: Preprocess
    tokenizer: TextTokenizer | None = None
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def is_text(self) -> bool:
        return isinstance(self.preprocess, TextPreprocess)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the backbone's weights and architecture (cached; the weights are frozen)."""
        if self._fingerprint is None:
            arch = sorted(self.model.cfg.to_dict().items())
            self._fingerprint = hash_tensors(self.model.state_dict(), extra=[f"{k}={v}" for k, v in arch])
        return self._fingerprint
