"""Checkpoints: round trips for all three methods, small files, and every kind of bad file named clearly."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file


from reference import random_backbone
from taft import Classifier, FingerprintMismatchError, ModelSpec, TaftError
from taft.checkpoint import (
    FORMAT_VERSION,
    META_KEY,
    checkpoint_content_sha256,
    content_sha256,
    read_checkpoint,
    read_checkpoint_metadata,
)
from taft.cli import main
from taft.model import load_checkpoint
from taft.train import TrainConfig, fit

from helpers import CLASSES, TINY_VIT, bad
from test_train import config, model, separable

pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def trained(tiny_vit, tmp_path_factory):
    """A short TAFT run (k = 1) with its checkpoint."""
    run = tmp_path_factory.mktemp("run")
    feats, labels, ids = separable(4)
    return fit(model(tiny_vit), (feats, labels, ids), config("taft", epochs=2), run_dir=run, progress=False)


def rewrite(src, dst, edit_tensors=None, edit_meta=None):
    """Copy a checkpoint, changing its tensors (and their recorded checksum: a consistently made file) and/or
    metadata."""
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = json.loads(f.metadata()[META_KEY])
    if edit_tensors:
        edit_tensors(tensors)
        meta["content_sha256"] = content_sha256(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dst), metadata={META_KEY: json.dumps(meta)})
    return dst


@pytest.mark.parametrize("method, head_init", [("taft", "random"), ("nlft", "random"), ("probe", "random"),
                                               ("taft", "probe")])
def test_round_trip_gives_identical_predictions(tiny_vit, tmp_path, method, head_init):
    feats, labels, ids = separable(4)
    result = fit(model(tiny_vit, method, head_init=head_init), (feats, labels, ids), config(method, epochs=2),
                 run_dir=tmp_path, progress=False)
    clf, meta = load_checkpoint(result.checkpoint, tiny_vit)
    images = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        assert torch.equal(clf(images), result.classifier(images))
        assert torch.equal(clf.logits(feats), result.classifier.logits(feats))
    assert clf.method == method and clf.class_names == CLASSES and clf.fingerprint == result.classifier.fingerprint
    assert meta["method"] == method and meta["format_version"] == FORMAT_VERSION
    assert meta["data"]["ids"] == ids and meta["data"]["count"] == len(ids) and len(meta["data"]["ids_sha256"]) == 64
    assert meta["preprocess"]["image_size"] == [12, 12] and meta["backbone"] == tiny_vit.name
    assert TrainConfig.from_dict(meta["train_config"]) == result.config
    assert ModelSpec.from_dict(meta["train_config"]) == clf.spec == result.classifier.spec
    assert clf.spec.head_init == head_init and clf.train_config == result.classifier.train_config
    assert {"taft", "torch"} <= set(meta["versions"]) and meta["created"]
    assert meta["metrics"]["top1"] == result.metrics["top1"]
    assert read_checkpoint_metadata(result.checkpoint)["fingerprint"] == clf.fingerprint


def test_checkpoint_holds_only_what_was_trained(trained, tiny_vit):
    with safe_open(str(trained.checkpoint), framework="pt") as f:
        names = set(f.keys())
    assert names == set(trained.classifier.trainable_state_dict()) | {"w0.head.weight", "w0.head.bias"}
    assert not any(n.startswith(("blocks.0.", "blocks.1.", "patch_embed", "pos_embed")) for n in names)
    backbone_bytes = sum(t.numel() * t.element_size() for t in tiny_vit.model.state_dict().values())
    assert trained.checkpoint.stat().st_size < 0.5 * backbone_bytes  # k = 1 of 3 blocks


def test_corrupt_and_truncated_files(trained, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x13 not a safetensors file" * 10)
    with pytest.raises(TaftError, match="not a valid safetensors file, corrupt or truncated"):
        load_checkpoint(garbage)
    data = trained.checkpoint.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(TaftError, match="corrupt or truncated"):
        load_checkpoint(truncated)
    with pytest.raises(TaftError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "absent.safetensors")


def test_not_a_taft_checkpoint_and_unknown_version(trained, tiny_vit, tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(TaftError, match="is not a taft checkpoint"):
        load_checkpoint(plain, tiny_vit)
    future = rewrite(trained.checkpoint, tmp_path / "v99.safetensors",
                     edit_meta=lambda m: m.update(format_version=99))
    with pytest.raises(TaftError, match="format version 99; this taft .* reads version 1"):
        load_checkpoint(future, tiny_vit)


def test_other_backbone_is_refused_naming_the_wanted_one(trained, tmp_path):
    other = random_backbone(TINY_VIT, 12, seed=1, dtype=torch.float32)
    with pytest.raises(FingerprintMismatchError, match="trained on backbone 'random-0' .* not on 'random-1'"):
        load_checkpoint(trained.checkpoint, other)
    with pytest.raises(TaftError, match="needs backbone 'random-0', which cannot be loaded"):
        load_checkpoint(trained.checkpoint)  # the name is not a registry name or a file


def test_changed_base_head_is_a_fingerprint_mismatch(trained, tiny_vit, tmp_path):
    bad = rewrite(trained.checkpoint, tmp_path / "w0.safetensors",
                  edit_tensors=lambda t: t["w0.head.weight"].mul_(2))
    with pytest.raises(FingerprintMismatchError, match="other base weights"):
        load_checkpoint(bad, tiny_vit)


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("blocks.2.attn.qkv.weight"), r"missing \['blocks.2.attn.qkv.weight'\]"),
    (lambda t: t.update(extra=torch.zeros(3)), r"unexpected \['extra'\]"),
    (lambda t: t.update({"norm.bias": torch.zeros(7)}), r"wrong shapes .*norm.bias: \(7,\) != \(32,\)"),
    (lambda t: t["head.weight"].view(-1).__setitem__(3, float("nan")), r"NaN or infinite values in \['head.weight'\]"),
    (lambda t: t.pop("w0.head.bias"), r"missing tensors \['w0.head.bias'\]"),
])
def test_bad_tensors_are_named(trained, tiny_vit, tmp_path, edit, match):
    bad = rewrite(trained.checkpoint, tmp_path / "bad.safetensors", edit_tensors=edit)
    with pytest.raises(TaftError, match=match):
        load_checkpoint(bad, tiny_vit)


def test_errors_are_one_line(trained, tiny_vit, tmp_path):
    bad = rewrite(trained.checkpoint, tmp_path / "bad.safetensors", edit_tensors=lambda t: t.pop("head.bias"))
    with pytest.raises(TaftError) as info:
        load_checkpoint(bad, tiny_vit)
    assert "\n" not in str(info.value)


def test_save_without_ids_and_preprocess_from_checkpoint(tiny_vit, tmp_path):
    clf = Classifier(tiny_vit, CLASSES, method="probe")
    path = clf.save(tmp_path / "c.safetensors", train_ids=None, n_train=17)
    meta = read_checkpoint_metadata(path)
    assert meta["data"] == {"count": 17, "ids_sha256": None, "ids": None}
    loaded, _ = load_checkpoint(path, tiny_vit)
    assert loaded.preprocess == tiny_vit.preprocess


def flip_bit(src, dst, name):
    """Copy a checkpoint with the lowest bit of tensor `name`'s first byte flipped (a finite float stays finite)."""
    shutil.copyfile(src, dst)
    data = bytearray(dst.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start = 8 + n + json.loads(data[8:8 + n])[name]["data_offsets"][0]
    data[start] ^= 1
    dst.write_bytes(bytes(data))
    return dst


def test_the_writer_records_the_content_checksum(trained):
    meta = read_checkpoint_metadata(trained.checkpoint)
    assert meta["content_sha256"] == checkpoint_content_sha256(trained.checkpoint)
    file = read_checkpoint(trained.checkpoint)
    everything = {**file.tensors, "w0.head.weight": file.head_weight0, "w0.head.bias": file.head_bias0}
    assert meta["content_sha256"] == content_sha256(everything)  # over every tensor, the base head included


@pytest.mark.parametrize("name", ["blocks.2.attn.qkv.weight", "head.bias", "w0.head.weight"])
def test_a_flipped_bit_is_damage_not_a_fingerprint_mismatch(trained, tiny_vit, tmp_path, name):
    damaged = flip_bit(trained.checkpoint, tmp_path / "flipped.safetensors", name)
    message = f"{damaged} is damaged: its tensors do not match their recorded checksum"
    for read in (lambda: load_checkpoint(damaged, tiny_vit), lambda: checkpoint_content_sha256(damaged)):
        with pytest.raises(TaftError) as info:
            read()
        assert str(info.value) == message and not isinstance(info.value, FingerprintMismatchError)


def test_taft_info_and_predict_refuse_a_damaged_file(trained, tmp_path, capsys):
    damaged = flip_bit(trained.checkpoint, tmp_path / "flipped.safetensors", "blocks.2.attn.proj.weight")
    bad(capsys, ["info", str(damaged)], "is damaged")
    bad(capsys, ["predict", str(damaged), str(tmp_path / "x.png")], "is damaged")


def test_files_without_a_checksum_still_load(trained, tiny_vit, tmp_path):
    old = rewrite(trained.checkpoint, tmp_path / "old.safetensors", edit_meta=lambda m: m.pop("content_sha256"))
    clf, meta = load_checkpoint(old, tiny_vit)
    assert "content_sha256" not in meta and clf.fingerprint == trained.classifier.fingerprint
    assert checkpoint_content_sha256(old) == checkpoint_content_sha256(trained.checkpoint)


def test_the_checkpoint_preprocessing_wins_over_the_backbone_it_is_loaded_with(tiny_vit, tmp_path):
    """A backbone given at another image size (same weights) gets the checkpoint's preprocessing, so the loaded
    model sees images as it was trained on them."""
    import dataclasses

    from taft.backbones.base import ImagePreprocess

    path = Classifier(tiny_vit, CLASSES, 1).save(tmp_path / "m.safetensors")
    other = dataclasses.replace(tiny_vit, preprocess=ImagePreprocess((16, 16), 4))
    loaded = Classifier.load(path, other)
    assert loaded.preprocess == tiny_vit.preprocess != other.preprocess
    assert loaded.backbone.preprocess == tiny_vit.preprocess  # and what it caches features with
