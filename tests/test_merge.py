"""Task arithmetic (`taft merge`, `taft.store.merge_checkpoints`): the merged model's logits against the inputs'
logits, in float64 (f_lin is linear in Δw, so Σ wᵢΔwᵢ gives f0 + Σ wᵢ(fᵢ − f0) up to rounding), and the
refusals, which write nothing."""

from __future__ import annotations

import pytest
import torch

from helpers import CLASSES, TINY_VIT, bad
from reference import random_backbone
from taft import Classifier, FingerprintMismatchError, TaftError
from taft.checkpoint import checkpoint_content_sha256, read_checkpoint_metadata
from taft.cli import main
from taft.store import merge_checkpoints

TOL = 1e-10  # float64 sums of a few terms of size ~1: rounding is ~1e-15; anything non-linear would be ~1e-2


@pytest.fixture(scope="module")
def backbone():
    return random_backbone(TINY_VIT, 12, seed=0, dtype=torch.float64)


def saved(backbone, path, method="taft", seed=1, head_seed=0):
    """A model with random trained tensors (seeded), saved at `path`, with its ids."""
    model = Classifier(backbone, CLASSES, 2, method=method, head_seed=head_seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # what training would move: Δw (taft), the head (probe), the tail weights (nlft)
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    model.save(path, train_ids=[f"{path.stem}-{i}" for i in range(3)])
    return model


@pytest.mark.parametrize("method", ["taft", "probe"])
@pytest.mark.parametrize("weights", [(1.0, -1.0), (0.5, 0.5), (1.0, 1.0), (2.0, -0.5, 0.25)])
def test_merged_logits_are_the_weighted_sum_of_the_inputs(backbone, tmp_path, method, weights):
    models = [saved(backbone, tmp_path / f"m{i}.safetensors", method, seed=i + 1) for i in range(len(weights))]
    base = Classifier(backbone, CLASSES, 2, method=method)  # Δw = 0: f0
    out = merge_checkpoints([tmp_path / f"m{i}.safetensors" for i in range(len(weights))], weights,
                            tmp_path / "merged.safetensors")
    merged = Classifier.load(out, backbone)
    x = torch.randn(5, 10, TINY_VIT.dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        f0 = base.logits(x)
        want = f0 + sum(w * (m.logits(x) - f0) for w, m in zip(weights, models))
        torch.testing.assert_close(merged.logits(x), want, rtol=0, atol=TOL)
        if abs(sum(weights) - 1) < 1e-12:  # a convex or affine combination: the weighted sum of the logits
            torch.testing.assert_close(merged.logits(x), sum(w * m.logits(x) for w, m in zip(weights, models)),
                                       rtol=0, atol=TOL)
        assert (merged.logits(x) - f0).abs().max() > 1e-3  # the inputs moved the model: the check is not vacuous
    meta = read_checkpoint_metadata(out)
    assert meta["merge"]["weights"] == list(weights)
    assert [i["content_sha256"] for i in meta["merge"]["inputs"]] == [
        checkpoint_content_sha256(tmp_path / f"m{i}.safetensors") for i in range(len(weights))]
    assert meta["data"]["count"] == 3 * len(weights)


def test_refusals_name_the_problem_and_write_nothing(backbone, tmp_path, capsys):
    a = tmp_path / "a.safetensors"
    saved(backbone, a)
    saved(backbone, tmp_path / "b.safetensors", seed=2)
    saved(backbone, tmp_path / "other-head.safetensors", head_seed=3)
    saved(backbone, tmp_path / "nlft.safetensors", method="nlft")
    out = tmp_path / "out.safetensors"
    with pytest.raises(FingerprintMismatchError, match="different base weights"):
        merge_checkpoints([a, tmp_path / "other-head.safetensors"], [1, -1], out)
    with pytest.raises(TaftError, match="not linear in its trained weights"):
        merge_checkpoints([a, tmp_path / "nlft.safetensors"], [1, -1], out)
    with pytest.raises(TaftError, match="one weight per checkpoint"):
        merge_checkpoints([a, tmp_path / "b.safetensors"], [1.0], out)
    with pytest.raises(TaftError, match="at least 2"):
        merge_checkpoints([a], [1.0], out)
    bad(capsys, ["merge", str(a), str(tmp_path / "b.safetensors"), "--weights", "1,x", "--out", str(out)],
        "--weights takes numbers")
    bad(capsys, ["merge", str(a), str(tmp_path / "b.safetensors"), "--weights", "1,nan", "--out", str(out)],
        "finite")
    assert not out.exists()
    assert main(["merge", str(a), str(tmp_path / "b.safetensors"), "--weights", "1,-1", "--out", str(out)]) == 0
    assert "merged 2 checkpoints with weights 1, -1 into" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0 and "method       taft" in capsys.readouterr().out
