"""Local checkpoints (Hugging Face and timm format) load into our ViT and reproduce the source model's outputs.

Reference models are tiny transformers `Dinov2Model` / `ViTModel` with random weights, built offline (no hub).
Parity tolerance: both sides compute the same float32 graph, differing only in summation order (our fused qkv
matmul and SDPA vs HF's separate projections and eager attention); on LayerNorm-ed O(1) outputs of a few layers
that leaves errors around 1e-6, so 1e-5 is tight enough to catch any mis-mapped weight (those give O(0.1)).
timm itself is not used: it imports torchvision at import time, so timm-format files are written here by renaming
HF weights to timm's names (the names documented in `taft.backbones.vit`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from taft.backbones import load_backbone  # noqa: E402
from taft.backbones.base import IMAGENET_MEAN  # noqa: E402
from taft.backbones.keymaps import load_local_vit  # noqa: E402
from taft.errors import TaftError  # noqa: E402

HF_V5 = int(transformers.__version__.split(".")[0]) >= 5


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Replace HF's small init (near-uniform attention would hide a q/k swap) with larger random weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("lambda1"):
                p.copy_(0.5 + 0.2 * noise)
            elif p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_((0.5 if "embeddings" in name else 0.1) * noise)


def _dinov2(cls_name: str = "Dinov2Model", **kw) -> torch.nn.Module:
    args = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=14,
                attn_implementation="eager")
    args.update(kw)
    model = getattr(transformers, cls_name)(transformers.Dinov2Config(**args))
    _randomize(model, 0)
    return model.eval()


def _vit(cls_name: str = "ViTModel", **kw) -> torch.nn.Module:
    args = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, image_size=32,
                patch_size=4, attn_implementation="eager")
    args.update(kw)
    model = getattr(transformers, cls_name)(transformers.ViTConfig(**args))
    _randomize(model, 1)
    return model.eval()


def _images(h: int, w: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_hf_dinov2_folder_parity(tmp_path: Path) -> None:
    hf = _dinov2()
    hf.save_pretrained(tmp_path)
    bb = load_backbone(str(tmp_path))
    cfg = bb.model.cfg
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.mlp_hidden, cfg.patch_size, cfg.pos_grid) == (64, 3, 4, 256, 14, 2)
    assert cfg.layerscale and cfg.gelu == "exact" and cfg.ln_eps == 1e-6
    assert bb.preprocess.image_size == (28, 28) and bb.preprocess.mean == IMAGENET_MEAN
    x = _images(28, 28)
    _close(bb.model(x), hf(pixel_values=x).last_hidden_state)
    if HF_V5:  # transformers 5 resizes to an explicit grid, bicubic, align_corners=False, as we do
        x = _images(42, 56)
        _close(bb.model(x), hf(pixel_values=x).last_hidden_state)


@torch.no_grad()
def test_hf_vit_folder_parity_tanh_gelu_pooler_and_preprocessor(tmp_path: Path) -> None:
    hf = _vit(hidden_act="gelu_pytorch_tanh")
    assert hf.pooler is not None
    hf.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    bb = load_backbone(str(tmp_path))
    cfg = bb.model.cfg
    assert not cfg.layerscale and cfg.gelu == "tanh" and cfg.ln_eps == 1e-12 and cfg.mlp_hidden == 96
    assert bb.preprocess.image_size == (32, 32) and bb.preprocess.mean == (0.5, 0.5, 0.5)
    x = _images(32, 32)
    _close(bb.model(x), hf(pixel_values=x).last_hidden_state)
    if HF_V5:
        x = _images(24, 40)
        _close(bb.model(x), hf(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state)


@pytest.mark.parametrize("make,cls_name,attr", [(_dinov2, "Dinov2ForImageClassification", "dinov2"),
                                                (_vit, "ViTForImageClassification", "vit")])
@torch.no_grad()
def test_hf_classification_prefix(tmp_path: Path, make, cls_name: str, attr: str) -> None:
    hf = make(cls_name, num_labels=5)
    hf.save_pretrained(tmp_path)
    assert any(k.startswith(f"{attr}.") for k in load_file(tmp_path / "model.safetensors"))
    bb = load_backbone(tmp_path)
    size = bb.preprocess.image_size
    x = _images(*size)
    _close(bb.model(x), getattr(hf, attr)(pixel_values=x).last_hidden_state)


@pytest.mark.parametrize("make", [_dinov2, _vit])
@torch.no_grad()
def test_hf_file_with_in_memory_names(tmp_path: Path, make) -> None:
    """A bare state_dict() dump (transformers 5 in-memory names) with config.json beside the file."""
    hf = make()
    hf.save_pretrained(tmp_path / "ref")
    (tmp_path / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "w.safetensors")
    bb = load_backbone(tmp_path / "w.safetensors")
    x = _images(*bb.preprocess.image_size)
    _close(bb.model(x), hf(pixel_values=x).last_hidden_state)


_HF_TO_TIMM = {"norm1": ("norm1", "layernorm_before"), "norm2": ("norm2", "layernorm_after"),
               "attn.proj": ("attention.output.dense",), "mlp.fc1": ("mlp.fc1", "intermediate.dense"),
               "mlp.fc2": ("mlp.fc2", "output.dense"), "ls1": ("layer_scale1",), "ls2": ("layer_scale2",)}


def _timm_from_hf(folder: Path, depth: int) -> dict[str, torch.Tensor]:
    """Rename a saved HF model's weights to timm's VisionTransformer names (plus a classifier head)."""
    hf = load_file(folder / "model.safetensors")
    sd = {"cls_token": hf["embeddings.cls_token"], "pos_embed": hf["embeddings.position_embeddings"],
          "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
          "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
          "norm.weight": hf["layernorm.weight"], "norm.bias": hf["layernorm.bias"],
          "head.weight": torch.zeros(7, 64), "head.bias": torch.zeros(7)}
    for i in range(depth):
        pre = f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            sd[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(
                [hf[f"{pre}attention.attention.{n}.{p}"] for n in ("query", "key", "value")])
        for ours, names in _HF_TO_TIMM.items():
            for name in names:
                if f"{pre}{name}.lambda1" in hf:
                    sd[f"blocks.{i}.{ours}.gamma"] = hf[f"{pre}{name}.lambda1"]
                for p in ("weight", "bias"):
                    if f"{pre}{name}.{p}" in hf:
                        sd[f"blocks.{i}.{ours}.{p}"] = hf[f"{pre}{name}.{p}"]
    return sd


@torch.no_grad()
def test_timm_file_parity_dinov2_with_config(tmp_path: Path) -> None:
    hf = _dinov2()
    hf.save_pretrained(tmp_path / "hf")
    save_file(_timm_from_hf(tmp_path / "hf", 3), tmp_path / "model.safetensors")
    stats = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.4]}
    (tmp_path / "config.json").write_text(json.dumps(
        {"architecture": "vit_small_patch14_dinov2", "model_args": {"num_heads": 4}, "pretrained_cfg": stats}))
    bb = load_backbone(tmp_path / "model.safetensors")
    cfg = bb.model.cfg
    assert (cfg.heads, cfg.depth, cfg.mlp_hidden, cfg.patch_size, cfg.pos_grid, cfg.layerscale) == (4, 3, 256, 14, 2,
                                                                                                      True)
    assert bb.preprocess.image_size == (28, 28) and bb.preprocess.std == (0.2, 0.3, 0.4)
    x = _images(28, 28)
    _close(bb.model(x), hf(pixel_values=x).last_hidden_state)
    # the same weights saved as a timm `save_for_hf` folder also load
    assert load_backbone(tmp_path).model.cfg == cfg


@torch.no_grad()
def test_timm_file_parity_vit_heads_from_metadata(tmp_path: Path) -> None:
    hf = _vit(layer_norm_eps=1e-6)  # timm ViTs use eps 1e-6
    hf.save_pretrained(tmp_path / "hf")
    sd = _timm_from_hf(tmp_path / "hf", 2)
    save_file(sd, tmp_path / "m.safetensors", metadata={"num_heads": "4"})
    bb = load_backbone(tmp_path / "m.safetensors")
    assert bb.model.cfg.heads == 4 and not bb.model.cfg.layerscale and bb.preprocess.mean == IMAGENET_MEAN
    x = _images(32, 32)
    _close(bb.model(x), hf(pixel_values=x).last_hidden_state)
    save_file(sd, tmp_path / "plain.safetensors")  # no config, no metadata: width // 64 heads
    assert load_local_vit(tmp_path / "plain.safetensors")[0].heads == 1


def _timm_sd(tmp_path: Path) -> dict[str, torch.Tensor]:
    hf = _vit(num_hidden_layers=2)
    hf.save_pretrained(tmp_path / "hf")
    return _timm_from_hf(tmp_path / "hf", 2)


def _raises(path: Path, *fragments: str) -> None:
    with pytest.raises(TaftError) as info:
        load_backbone(path)
    message = str(info.value)
    for fragment in (path.name, *fragments):
        assert fragment in message, message


@pytest.mark.parametrize("edit,fragments", [
    (lambda sd: sd.pop("blocks.1.norm2.weight"), ("missing", "blocks.1.norm2.weight")),
    (lambda sd: sd.update({"blocks.0.attn.proj.weight": torch.zeros(64, 32)}), ("wrong shapes", "attn.proj")),
    (lambda sd: sd.update({"blocks.0.mlp.fc1.weight": torch.zeros(192, 64)}), ("SwiGLU",)),
    (lambda sd: sd.update({"reg_token": torch.zeros(1, 4, 64)}), ("register",)),
    (lambda sd: sd.update({"pos_embed": sd["pos_embed"][:, 1:]}), ("no_embed_class",)),
    (lambda sd: sd.update({"pos_embed": sd["pos_embed"][:, :-1]}), ("square",)),
    (lambda sd: sd.update({"norm_pre.weight": torch.ones(64)}), ("unsupported", "norm_pre.weight")),
    (lambda sd: sd.pop("cls_token"), ("cls_token",)),
])
def test_timm_bad_inputs(tmp_path: Path, edit, fragments) -> None:
    sd = _timm_sd(tmp_path)
    edit(sd)
    save_file(sd, tmp_path / "bad.safetensors")
    _raises(tmp_path / "bad.safetensors", *fragments)


def test_hf_bad_inputs(tmp_path: Path) -> None:
    _vit(hidden_act="relu").save_pretrained(tmp_path / "relu")
    _raises(tmp_path / "relu", "hidden_act", "relu")
    _dinov2(use_swiglu_ffn=True).save_pretrained(tmp_path / "swiglu")
    _raises(tmp_path / "swiglu", "SwiGLU")
    if hasattr(transformers, "Dinov2WithRegistersModel"):  # transformers >= 4.48
        regs = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            hidden_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28, patch_size=14))
        regs.save_pretrained(tmp_path / "regs")
        _raises(tmp_path / "regs", "register")

    _dinov2().save_pretrained(tmp_path / "d")
    sd = load_file(tmp_path / "d" / "model.safetensors")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name, edit, fragments in [
        ("nopos.safetensors", lambda s: s.pop("embeddings.position_embeddings"), ("missing", "position_embeddings")),
        ("noq.safetensors", lambda s: s.pop("encoder.layer.1.attention.attention.query.weight"), ("layer 1", "q")),
        ("extra.safetensors", lambda s: s.update({"decoder.weight": torch.zeros(1)}), ("unsupported", "decoder")),
        ("shape.safetensors", lambda s: s.update({"encoder.layer.0.mlp.fc1.weight": torch.zeros(100, 64)}),
         ("wrong shapes", "blocks.0.mlp.fc1.weight")),
    ]:
        bad = dict(sd)
        edit(bad)
        save_file(bad, tmp_path / name)
        _raises(tmp_path / name, *fragments)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "x"}))
    save_file(sd, tmp_path / "cfg.safetensors")
    _raises(tmp_path / "cfg.safetensors", "config.json")


def test_unknown_formats(tmp_path: Path) -> None:
    save_file({"foo": torch.zeros(2)}, tmp_path / "foo.safetensors")
    _raises(tmp_path / "foo.safetensors", "not timm format")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    _raises(tmp_path / "junk.safetensors", "cannot read")
    (tmp_path / "w.bin").write_bytes(b"")
    _raises(tmp_path / "w.bin", "unsupported checkpoint")
    (tmp_path / "empty").mkdir()
    _raises(tmp_path / "empty", "model.safetensors")
