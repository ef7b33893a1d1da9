"""TangentModel API contracts and bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import TINY_VIT
from reference import random_backbone, randomize_delta
from taft import Classifier, FingerprintMismatchError, ModelSpec, TaftError, TangentModel, load_backbone



def small_model(seed: int = 0, k: int = 2, backbone_seed: int = 0) -> TangentModel:
    return TangentModel(random_backbone(TINY_VIT, 12, seed=backbone_seed, dtype=torch.float32), 4, tangent_blocks=k,
                        seed=seed)


def test_parameters_are_exactly_delta_and_start_at_zero():
    model = small_model()
    names = {n.removeprefix("tail.") for n, _ in model.named_parameters()}
    assert names == set(model.trainable_state_dict())
    assert "head.weight" in names and "blocks.2.attn.qkv.weight" in names and "blocks.0.norm1.weight" not in names
    assert all(torch.count_nonzero(p) == 0 for p in model.parameters())


def test_trunk_features_carry_no_gradient():
    model = small_model()
    feats = model.trunk_features(torch.randn(2, 3, 12, 12))
    assert feats.shape == (2, 10, 32) and not feats.requires_grad


def test_fingerprint_is_stable_and_names_w0_and_k():
    assert small_model().fingerprint == small_model().fingerprint
    assert small_model(seed=1).fingerprint != small_model().fingerprint          # another random head
    assert small_model(k=1).fingerprint != small_model(k=2).fingerprint          # another k
    assert small_model(backbone_seed=1).fingerprint != small_model().fingerprint  # other pretrained weights


def test_delta_round_trip_and_fingerprint_mismatch():
    model = small_model()
    randomize_delta(model, 0.1)
    delta = model.trainable_state_dict()
    other = small_model()
    other.load_delta_state_dict(delta, fingerprint=model.fingerprint)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    foreign = small_model(seed=1)
    before = foreign.trainable_state_dict()
    with pytest.raises(FingerprintMismatchError, match="other base weights"):
        foreign.load_delta_state_dict(delta, fingerprint=model.fingerprint)
    assert all(torch.equal(before[n], p) for n, p in foreign.trainable_state_dict().items())  # nothing changed


def test_bad_delta_is_rejected_before_anything_changes():
    model = small_model()
    delta = model.trainable_state_dict()
    wrong_shape = dict(delta, **{"head.weight": torch.zeros(5, 32)})
    with pytest.raises(TaftError, match="wrong shapes"):
        model.load_delta_state_dict(wrong_shape, fingerprint=model.fingerprint)
    missing = {k: v for k, v in delta.items() if k != "head.bias"}
    with pytest.raises(TaftError, match="missing"):
        model.load_delta_state_dict(missing, fingerprint=model.fingerprint)
    nan = dict(delta, **{"norm.weight": torch.full((32,), float("nan"))})
    with pytest.raises(TaftError, match="NaN"):
        model.load_delta_state_dict(nan, fingerprint=model.fingerprint)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_classes": 1}, "number of classes must be an integer ≥ 2, got 1"),
    ({"num_classes": None, "classes": ["a"]}, "at least 2 classes"),
    ({"num_classes": None, "class_names": ["a", "b", "a"]}, "not unique"),
    ({"classes": 3}, "num_classes=4 disagrees with the 3 classes given"),
    ({"class_names": ["a", "b", "c"]}, "num_classes=4 disagrees with the 3 classes given"),
    ({"k": 1}, "give k or tangent_blocks, not both"),
    ({"tangent_blocks": 0}, r"1\.\.3"),
    ({"tangent_blocks": 4}, r"1\.\.3"),
    ({"pooling": "max"}, "pooling"),
    ({"head_weight": torch.zeros(4, 32)}, "all zeros"),
    ({"head_weight": torch.ones(3, 32)}, "shape"),
])
def test_bad_construction_arguments(kwargs, message):
    args = {"num_classes": 4, "tangent_blocks": 2, **kwargs}
    with pytest.raises(TaftError, match=message):
        TangentModel(random_backbone(TINY_VIT, 12, dtype=torch.float32), **args)


def test_new_and_old_keywords_and_the_spec_build_the_same_model():
    bb = random_backbone(TINY_VIT, 12, dtype=torch.float32)
    old = TangentModel(bb, num_classes=4, tangent_blocks=2, seed=3)
    new = Classifier(bb, 4, 2, method="taft", head_seed=3)
    assert new.spec == old.spec == ModelSpec("taft", 2, "cls", 3, "random")
    assert new.fingerprint == old.fingerprint and new.class_names == ["0", "1", "2", "3"]
    same = Classifier.from_spec(bb, new.class_names, new.spec)
    assert same.fingerprint == new.fingerprint and torch.equal(same.head_weight0, new.head_weight0)
    probe = new.derive(method="probe")
    assert probe.spec == ModelSpec("probe", 2, "cls", 3, "random") and torch.equal(probe.head_weight0, new.head_weight0)
    with pytest.raises(TaftError, match="derive takes ModelSpec fields"):
        new.derive(lr=1e-3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        new.spec.method = "nlft"  # type: ignore[misc]


def test_given_head_is_used():
    weight = torch.randn(4, 32)
    model = TangentModel(random_backbone(TINY_VIT, 12, dtype=torch.float32), 4, head_weight=weight)
    assert torch.equal(model.tail.head.weight_0, weight) and torch.count_nonzero(model.tail.head.bias_0) == 0


@pytest.mark.parametrize("shape, message", [
    ((2, 1, 12, 12), "channels"),
    ((2, 3, 13, 12), "multiple of the patch size"),
    ((3, 12, 12), "expected images"),
])
def test_bad_images(shape, message):
    with pytest.raises(TaftError, match=message):
        small_model()(torch.randn(*shape))


def test_bad_backbone_requests():
    with pytest.raises(TaftError, match="unknown backbone"):
        load_backbone("no-such-model")
    with pytest.raises(TaftError, match="multiples of the patch size"):
        load_backbone("dinov2-vits14", image_size=100)


def test_readme_quickstart_runs(dinov2_56):
    """The README's Python quickstart, at 56 px to stay fast."""
    model = TangentModel(dinov2_56, num_classes=10, tangent_blocks=2, seed=0)
    images = torch.randn(4, 3, 56, 56)
    logits = model.tail(model.trunk_features(images))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    target = 15.0 * torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 10).float()
    loss = ((logits - target) ** 2).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        assert ((model.tail(model.trunk_features(images)) - target) ** 2).mean() < loss
    model.load_delta_state_dict(model.trainable_state_dict(), fingerprint=model.fingerprint)
    with torch.no_grad():
        assert model.materialize()(images).shape == (4, 10)
