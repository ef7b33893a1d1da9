"""Files written before the one-model redesign still work: their recorded fingerprints (older formulas) are
accepted, and they predict exactly as the code that wrote them did. The files in tests/data/legacy/ were written
by commit e7be376 (see the README there)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from taft import FingerprintMismatchError, ModelSpec, TrainConfig
from taft.checkpoint import read_checkpoint
from taft.model import Classifier, load_checkpoint
from taft.store.delta_sum import compose_tensors

LEGACY = Path(__file__).parent / "data" / "legacy"


def legacy_features() -> torch.Tensor:
    """The trunk features the files' expected logits were computed on (as in README's make_legacy.py)."""
    return torch.randn(8, 10, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["taft", "probe"])
def test_legacy_checkpoint_loads_and_predicts_as_before(tiny_vit, method):
    path = LEGACY / f"{method}-e7be376.safetensors"
    expected = torch.load(LEGACY / f"{method}-e7be376.expected.pt", weights_only=True)
    clf, meta = load_checkpoint(path, tiny_vit)
    assert meta["fingerprint"] == expected["fingerprint"] == clf.legacy_fingerprint
    assert clf.fingerprint != clf.legacy_fingerprint  # the file records the old formula's value
    with torch.no_grad():
        # float32, summed in another order when the thread count differs: a few ulps of logits of size ~1
        torch.testing.assert_close(clf.logits(legacy_features()), expected["logits"], rtol=1e-5, atol=1e-6)
    again = Classifier.load(path, tiny_vit)
    assert torch.equal(again.head_weight0, clf.head_weight0) and again.method == method


def test_legacy_delta_loads_into_its_model_and_not_into_another(tiny_vit):
    path = LEGACY / "taft-e7be376.safetensors"
    file = read_checkpoint(path)
    model = Classifier(tiny_vit, class_names=["a", "b"], head_weight=file.head_weight0, head_bias=file.head_bias0)
    model.load_delta_state_dict(path)  # the fingerprint read from the file is checked
    assert all(torch.equal(model.trainable_state_dict()[n], t) for n, t in file.tensors.items())
    model.load_delta_state_dict(file.tensors, fingerprint=file.fingerprint)
    other = Classifier(tiny_vit, class_names=["a", "b"], seed=3)  # another base head
    with pytest.raises(FingerprintMismatchError, match="other base weights"):
        other.load_delta_state_dict(path)
    probe = Classifier(tiny_vit, class_names=["a", "b"], head_weight=file.head_weight0,
                       head_bias=file.head_bias0, method="probe")
    assert not probe.accepts_fingerprint(file.fingerprint)


def test_one_fingerprint_formula_names_method_k_pooling_and_head(tiny_vit):
    base = Classifier(tiny_vit, 3)
    assert base.fingerprint == Classifier(tiny_vit, 3).fingerprint
    others = [Classifier(tiny_vit, 3, method="nlft"), Classifier(tiny_vit, 3, method="probe"),
              Classifier(tiny_vit, 3, tangent_blocks=2), Classifier(tiny_vit, 3, pooling="mean"),
              Classifier(tiny_vit, 3, seed=1)]
    assert len({base.fingerprint, *(m.fingerprint for m in others)}) == 6


def test_new_and_legacy_shards_of_one_model_compose(tiny_vit, tmp_path):
    """A model saved now from a legacy file keeps a fingerprint its loader accepts, and the tensors sum as before."""
    clf, _ = load_checkpoint(LEGACY / "taft-e7be376.safetensors", tiny_vit)
    saved = clf.save(tmp_path / "resaved.safetensors", train_ids=["y0", "y1"])
    again, meta = load_checkpoint(saved, tiny_vit)
    assert meta["fingerprint"] == clf.fingerprint and again.accepts_fingerprint(clf.legacy_fingerprint)
    summed = compose_tensors([read_checkpoint(saved).tensors, clf.trainable_state_dict()], [0.5, 0.5])
    assert all(torch.equal(summed[n], t) for n, t in clf.trainable_state_dict().items())


@pytest.mark.parametrize("method", ["taft", "nlft"])
def test_checkpoints_from_before_the_model_centric_api_load_and_predict_as_before(tiny_vit, method):
    """809ba0c recorded the model's fields inside its training config; they rebuild the same model (today's
    fingerprint formula), and the recipe reads back from the same record."""
    path = LEGACY / f"{method}-809ba0c.safetensors"
    expected = torch.load(LEGACY / f"{method}-809ba0c.expected.pt", weights_only=True)
    clf, meta = load_checkpoint(path, tiny_vit)
    assert clf.fingerprint == meta["fingerprint"] == expected["fingerprint"]
    assert clf.spec == ModelSpec(method, 1, "mean", 0, "random") == ModelSpec.from_dict(meta["train_config"])
    assert TrainConfig.from_dict(meta["train_config"]).seed == 3
    with torch.no_grad():  # float32, other thread counts sum in another order: a few ulps of logits of size ~1
        torch.testing.assert_close(clf.logits(legacy_features()), expected["logits"], rtol=1e-5, atol=1e-6)
