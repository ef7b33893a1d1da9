"""Read local ViT checkpoints (Hugging Face or timm format, safetensors only) into our `ViT` naming.

`load_local_vit(path)` accepts:

* a Hugging Face folder (`config.json` + `model.safetensors`, or a sharded `model.safetensors.index.json`), or a
  `.safetensors` file with a `config.json` beside it, for `model_type` "dinov2" or "vit": `Dinov2Model` /
  `ViTModel` weights, optionally under a `dinov2.` / `vit.` prefix as written by `*ForImageClassification`.
  Both the names `save_pretrained` writes (transformers 4 and 5 alike: `encoder.layer.{i}.attention.attention.
  query`, ...) and transformers 5 in-memory names (`attention.q_proj`, ViT's `layers.{i}` / `mlp.fc1`) are read.
  Classifier, pooler and mask-token weights are ignored. Mean/std come from a `preprocessor_config.json` beside
  the weights, else ImageNet's.
* a timm `.safetensors` file, or a folder from timm's `save_for_hf` (`patch_embed.proj`, `cls_token`,
  `pos_embed`, `blocks.{i}.attn.qkv`, ...). The architecture is read from tensor shapes; `head.*`, `fc_norm.*`
  and `attn_pool.*` are ignored. The head count cannot be read from shapes: it comes from a timm `config.json`
  beside the file (`num_heads`, `model_args.num_heads`, or a standard `architecture` name such as
  `vit_small_patch14_dinov2` at its standard width), else from the safetensors metadata key "num_heads", else
  defaults to width // 64 (right for timm's tiny/small/base/large ViTs, wrong for e.g. huge/giant: give the count
  in metadata or config.json then). LayerNorm eps 1e-6 and exact GELU (timm's defaults; `model_args.act_layer`
  "gelu_tanh" selects tanh). Mean/std from the config's `pretrained_cfg`, else ImageNet's.

Unsupported (a `TaftError` says so): register tokens, position embeddings without a CLS slot, SwiGLU MLPs, GELU
variants other than exact/tanh, and any weight we do not map (e.g. timm `norm_pre`, `q_norm`). Every problem
raises `TaftError` naming the file.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from taft.backbones.base import IMAGENET_MEAN, IMAGENET_STD
from taft.backbones.vit import ViT, ViTConfig
from taft.errors import TaftError

Tensors = dict[str, torch.Tensor]
_HF_ACT = {"gelu": "exact", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh"}
# head counts of timm's standard ViT sizes (architecture name token, width); only used at that exact width
_TIMM_HEADS = {("tiny", 192): 3, ("small", 384): 6, ("base", 768): 12, ("large", 1024): 16, ("huge", 1280): 16,
               ("giant", 1408): 16, ("giant", 1536): 24, ("gigantic", 1664): 16}


def load_local_vit(path: Path) -> tuple[ViTConfig, Tensors, int, dict]:
    """(config, state dict in our names, native image side in pixels, {"mean", "std"}) for a local checkpoint.

    The returned state dict matches `ViT(config).state_dict()` in names and shapes (checked here)."""
    path = Path(path)
    src = str(path)
    if path.is_dir():
        tensors, metadata = read_folder_weights(path, src)
        folder = path
    elif path.suffix == ".safetensors":
        tensors, metadata = read_safetensors_tensors(path, src)
        folder = path.parent
    else:
        raise TaftError(f"{src}: unsupported checkpoint; expected a Hugging Face folder or a .safetensors file")
    config = read_json_object(folder / "config.json", src, required=False)
    if "patch_embed.proj.weight" in tensors:
        return _check(*_from_timm(tensors, metadata, config, src), src)
    if config is None or "model_type" not in config:
        raise TaftError(f"{src}: not timm format (no 'patch_embed.proj.weight') and no Hugging Face config.json "
                        "with a 'model_type' beside the weights")
    cfg, sd, native = _from_hf(tensors, config, src)
    pre = read_json_object(folder / "preprocessor_config.json", src, required=False) or {}
    mean, std = pre.get("image_mean", IMAGENET_MEAN), pre.get("image_std", IMAGENET_STD)
    if pre.get("do_normalize") is False:
        mean, std = (0.0,) * cfg.in_chans, (1.0,) * cfg.in_chans
    return _check(cfg, sd, native, _norm_stats(mean, std, cfg.in_chans, src), src)


# ---------------------------------------------------------------------------------------------------- reading


def read_json_object(path: Path, src: str, required: bool) -> dict | None:
    """The JSON object in `path` (None if absent and not `required`); TaftError prefixed with `src` otherwise."""
    if not path.is_file():
        if required:
            raise TaftError(f"{src}: missing {path.name}")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TaftError(f"{src}: cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise TaftError(f"{src}: {path} is not a JSON object")
    return data


def read_safetensors_tensors(path: Path, src: str) -> tuple[Tensors, dict[str, str]]:
    """(all tensors, metadata) of a safetensors file; TaftError naming it when unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise TaftError(f"{src}: cannot read safetensors file {path}: {e}") from e


def read_folder_weights(folder: Path, src: str) -> tuple[Tensors, dict[str, str]]:
    """A folder's `model.safetensors`, or the shards its `model.safetensors.index.json` lists (all checked)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors_tensors(single, src)
    if not index.exists():
        hint = ""
        if any((folder / n).exists() for n in ("pytorch_model.bin", "model.onnx", "tf_model.h5")):
            hint = "; only safetensors weights are read (convert with transformers' save_pretrained)"
        raise TaftError(f"{src}: no model.safetensors (or model.safetensors.index.json) in the folder{hint}")
    weight_map = (read_json_object(index, src, required=True) or {}).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise TaftError(f"{src}: {index.name} has no valid 'weight_map'")
    tensors: Tensors = {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise TaftError(f"{src}: shard {shard} listed in {index.name} is missing")
        tensors.update(read_safetensors_tensors(folder / shard, src)[0])
    if missing := sorted(set(weight_map) - set(tensors)):
        raise TaftError(f"{src}: {index.name} lists weights absent from their shards: {missing[:5]}")
    return tensors, {}


def _norm_stats(mean, std, chans: int, src: str) -> dict:
    try:
        out = {"mean": tuple(float(m) for m in mean), "std": tuple(float(s) for s in std)}
    except (TypeError, ValueError) as e:
        raise TaftError(f"{src}: unreadable image mean/std {mean!r} / {std!r}") from e
    if len(out["mean"]) != chans or len(out["std"]) != chans or min(out["std"]) <= 0:
        raise TaftError(f"{src}: image mean/std {out} do not fit {chans} channels with positive std")
    return out


def _grid(pos: torch.Tensor, src: str, key: str) -> int:
    """Side of the square patch-position grid of a (1, 1 + g*g, dim) position embedding with a CLS slot."""
    if pos.dim() != 3 or pos.shape[0] != 1:
        raise TaftError(f"{src}: {key} has shape {tuple(pos.shape)}, expected (1, tokens, dim)")
    n = pos.shape[1]
    g = math.isqrt(max(n - 1, 0))
    if g * g != n - 1 or g == 0:
        if math.isqrt(n) ** 2 == n:
            raise TaftError(f"{src}: {key} has {n} positions, a square grid without a CLS slot (timm "
                            "no_embed_class); unsupported")
        raise TaftError(f"{src}: {key} has {n} positions; expected 1 CLS + a square grid (perfect square + 1)")
    return g


def _fuse_qkv(sd: Tensors, qkv: dict[int, dict[str, torch.Tensor]], depth: int, has_bias: bool, src: str) -> None:
    """Stack per-layer q, k, v weights (and biases, zeros when the model has none) into `blocks.{i}.attn.qkv`."""
    if extra := sorted(set(qkv) - set(range(depth))):
        raise TaftError(f"{src}: attention weights for layers {extra[:5]} beyond the configured depth {depth}")
    for i in range(depth):
        parts = qkv.get(i, {})
        for param in ("weight", "bias") if has_bias else ("weight",):
            names = [f"{p}.{param}" for p in "qkv"]
            missing = [n for n in names if n not in parts]
            if missing:
                raise TaftError(f"{src}: layer {i} lacks attention {', '.join(missing)}")
            shapes = {tuple(parts[n].shape) for n in names}
            if len(shapes) != 1:
                raise TaftError(f"{src}: layer {i} query/key/value {param} shapes differ: {sorted(shapes)}")
            sd[f"blocks.{i}.attn.qkv.{param}"] = torch.cat([parts[n] for n in names])
        if not has_bias:
            w = sd[f"blocks.{i}.attn.qkv.weight"]
            sd[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)


def _check(cfg: ViTConfig, sd: Tensors, native: int, pre: dict, src: str) -> tuple[ViTConfig, Tensors, int, dict]:
    """Names and shapes of `sd` must equal those of `ViT(cfg)` (built on the meta device, no memory)."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ViT(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k}: {tuple(sd[k].shape)}, expected {s}" for k, s in expected.items()
             if k in sd and tuple(sd[k].shape) != s]
    if missing or unexpected or wrong:
        raise TaftError(f"{src}: weights do not fit {cfg}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                        f"wrong shapes {wrong[:5]}")
    return cfg, sd, native, pre


def _config(src: str, **kw) -> ViTConfig:
    try:
        return ViTConfig(**kw)
    except TaftError as e:
        raise TaftError(f"{src}: {e}") from e


# ---------------------------------------------------------------------------------------------- Hugging Face

_HF_GLOBAL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_MODULES = {  # per-layer module -> ours; v4/saved names and transformers 5 in-memory names
    "norm1": "norm1", "layernorm_before": "norm1", "norm2": "norm2", "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1", "intermediate.dense": "mlp.fc1", "mlp.fc2": "mlp.fc2", "output.dense": "mlp.fc2",
    "layer_scale1": "ls1", "layer_scale2": "ls2",
}
_HF_QKV = {"attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
           "attention.q_proj": "q", "attention.k_proj": "k", "attention.v_proj": "v"}
_HF_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_HF_IGNORED = re.compile(r"^(?:pooler\.|embeddings\.mask_token$)")


def _from_hf(tensors: Tensors, config: dict, src: str) -> tuple[ViTConfig, Tensors, int]:
    model_type = config.get("model_type")
    if model_type == "dinov2_with_registers" or config.get("num_register_tokens") or \
            any("register_tokens" in k for k in tensors):
        raise TaftError(f"{src}: DINOv2 with register tokens is unsupported")
    if model_type not in ("dinov2", "vit"):
        raise TaftError(f"{src}: Hugging Face model_type {model_type!r} is unsupported (only 'dinov2', 'vit')")
    if config.get("use_swiglu_ffn"):
        raise TaftError(f"{src}: DINOv2 with a SwiGLU MLP is unsupported")
    act = config.get("hidden_act", "gelu")
    if act not in _HF_ACT:
        raise TaftError(f"{src}: hidden_act {act!r} is unsupported (supported: {', '.join(_HF_ACT)})")
    try:
        dim, depth, heads = (int(config[k]) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads"))
        patch = config["patch_size"]
        patch = int(patch[0] if isinstance(patch, (list, tuple)) and len(set(patch)) == 1 else patch)
        mlp_hidden = int(dim * config.get("mlp_ratio", 4) if model_type == "dinov2" else config["intermediate_size"])
        in_chans = int(config.get("num_channels", 3))
        eps = float(config.get("layer_norm_eps", 1e-6 if model_type == "dinov2" else 1e-12))
    except KeyError as e:
        raise TaftError(f"{src}: config.json lacks {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise TaftError(f"{src}: unreadable config.json field: {e}") from e

    cls_keys = [k for k in tensors if k.endswith("embeddings.cls_token")]
    prefix = cls_keys[0][: -len("embeddings.cls_token")] if len(cls_keys) == 1 else None
    if prefix not in ("", "dinov2.", "vit."):
        raise TaftError(f"{src}: expected one 'embeddings.cls_token' (optionally under 'dinov2.' or 'vit.'), "
                        f"found {cls_keys[:3]}")
    sd: Tensors = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        if not key.startswith(prefix):
            if not key.startswith("classifier."):
                unknown.append(key)
            continue
        name = key[len(prefix):]
        if name in _HF_GLOBAL:
            sd[_HF_GLOBAL[name]] = t
        elif (m := _HF_LAYER.match(name)) and (m[2] in _HF_MODULES or m[2] in _HF_QKV):
            i, module, param = int(m[1]), m[2], m[3]
            if module in _HF_QKV:
                qkv.setdefault(i, {})[f"{_HF_QKV[module]}.{param}"] = t
            else:
                sd[f"blocks.{i}.{_HF_MODULES[module]}.{'gamma' if param == 'lambda1' else param}"] = t
        elif not _HF_IGNORED.match(name):
            unknown.append(key)
    if unknown:
        raise TaftError(f"{src}: unsupported weights {sorted(unknown)[:5]} ({len(unknown)} in all)")
    if "pos_embed" not in sd:
        raise TaftError(f"{src}: missing {prefix}embeddings.position_embeddings")
    has_bias = bool(config.get("qkv_bias", True)) or any(k.endswith("bias") for p in qkv.values() for k in p)
    _fuse_qkv(sd, qkv, depth, has_bias, src)
    grid = _grid(sd["pos_embed"], src, f"{prefix}embeddings.position_embeddings")
    cfg = _config(src, dim=dim, depth=depth, heads=heads, mlp_hidden=mlp_hidden, patch_size=patch,
                  in_chans=in_chans, pos_grid=grid, layerscale=model_type == "dinov2", ln_eps=eps, gelu=_HF_ACT[act])
    return cfg, sd, grid * patch


# ------------------------------------------------------------------------------------------------------ timm

_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$"
                         r"|^blocks\.(\d+)\.(ls1|ls2)\.gamma$")
_TIMM_GLOBAL = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias"}
_TIMM_IGNORED = ("head.", "fc_norm.", "attn_pool.")


def _timm_heads(config: dict | None, metadata: dict[str, str], dim: int, src: str) -> int:
    """Head count: config.json `num_heads` / `model_args.num_heads` / standard `architecture` name, then
    safetensors metadata "num_heads", then dim // 64."""
    config = config or {}
    for value in (config.get("num_heads"), _sub(config, "model_args").get("num_heads"),
                  _sub(config, "pretrained_cfg").get("num_heads")):
        if value is not None:
            return _int(value, "config.json num_heads", src)
    arch = config.get("architecture") or _sub(config, "pretrained_cfg").get("architecture") or ""
    if m := re.match(r"vit_(tiny|small|base|large|huge|giant|gigantic)_", str(arch)):
        if (m[1], dim) in _TIMM_HEADS:
            return _TIMM_HEADS[(m[1], dim)]
    if "num_heads" in metadata:
        return _int(metadata["num_heads"], "safetensors metadata num_heads", src)
    return max(dim // 64, 1)


def _sub(config: dict | None, key: str) -> dict:
    value = (config or {}).get(key)
    return value if isinstance(value, dict) else {}


def _int(value, what: str, src: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as e:
        raise TaftError(f"{src}: {what} {value!r} is not an integer") from e


def _from_timm(tensors: Tensors, metadata: dict[str, str], config: dict | None,
               src: str) -> tuple[ViTConfig, Tensors, int, dict]:
    for key, what in (("reg_token", "register tokens"), ("dist_token", "a distillation token")):
        if key in tensors:
            raise TaftError(f"{src}: timm ViT with {what} ('{key}') is unsupported")
    for key in ("cls_token", "pos_embed", "norm.weight"):
        if key not in tensors:
            hint = " (the model pools with fc_norm instead)" if key == "norm.weight" and "fc_norm.weight" in tensors \
                else ""
            raise TaftError(f"{src}: missing {key!r}{hint}; only timm ViTs with a CLS token, learned position "
                            "embeddings and a final norm are supported")
    sd: Tensors = {}
    unknown = []
    for key, t in tensors.items():
        m = _TIMM_BLOCK.match(key)
        if key in _TIMM_GLOBAL or m:
            sd[key] = t
        elif not key.startswith(_TIMM_IGNORED):
            unknown.append(key)
    if unknown:
        raise TaftError(f"{src}: unsupported timm weights {sorted(unknown)[:5]} ({len(unknown)} in all)")
    w = sd["patch_embed.proj.weight"]
    if w.dim() != 4 or w.shape[2] != w.shape[3]:
        raise TaftError(f"{src}: patch_embed.proj.weight has shape {tuple(w.shape)}, expected (dim, C, p, p)")
    dim, in_chans, patch = w.shape[0], w.shape[1], w.shape[2]
    indices = {int(m[1] or m[4]) for k in sd if (m := _TIMM_BLOCK.match(k))}
    depth = len(indices)
    if indices != set(range(depth)) or depth == 0:
        raise TaftError(f"{src}: block indices {sorted(indices)[:10]} are not 0..n-1")
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    if fc1 is None or fc2 is None:
        raise TaftError(f"{src}: missing blocks.0.mlp.fc1.weight / fc2.weight")
    if fc1.shape[0] != fc2.shape[-1]:
        raise TaftError(f"{src}: mlp.fc1 gives {fc1.shape[0]} features but mlp.fc2 takes {fc2.shape[-1]} "
                        "(packed SwiGLU MLP?); unsupported")
    act = _sub(config, "model_args").get("act_layer", "gelu")
    if act not in ("gelu", "gelu_tanh"):
        raise TaftError(f"{src}: timm act_layer {act!r} is unsupported (only 'gelu', 'gelu_tanh')")
    if all(f"blocks.{i}.attn.qkv.bias" not in sd for i in range(depth)):  # timm qkv_bias=False
        for i in range(depth):
            qkv_w = sd.get(f"blocks.{i}.attn.qkv.weight")
            if qkv_w is not None:
                sd[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(qkv_w.shape[0], dtype=qkv_w.dtype)
    grid = _grid(sd["pos_embed"], src, "pos_embed")
    cfg = _config(src, dim=dim, depth=depth, heads=_timm_heads(config, metadata, dim, src), mlp_hidden=fc1.shape[0],
                  patch_size=patch, in_chans=in_chans, pos_grid=grid, layerscale="blocks.0.ls1.gamma" in sd,
                  ln_eps=1e-6, gelu="tanh" if act == "gelu_tanh" else "exact")
    pcfg, config = _sub(config, "pretrained_cfg"), config or {}
    mean = pcfg.get("mean", config.get("mean", IMAGENET_MEAN))
    std = pcfg.get("std", config.get("std", IMAGENET_STD))
    return cfg, sd, grid * patch, _norm_stats(mean, std, in_chans, src)
