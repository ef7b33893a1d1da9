"""A store that lives: examples added as new shards, checkpoints trained elsewhere imported as shards, and the
exactness, refusals and audit of both. Tiny random ViT on synthetic 12 px images (tests/test_store.py)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import CLASSES
from taft import TaftError
from taft.backbones.base import Backbone
from taft.checkpoint import read_checkpoint
from taft.data import ImageDataset, ImageRecord
from taft.data.images import ArrayImage
from taft.data.trunk_features import cache_features
from taft.errors import FingerprintMismatchError
from taft.store import ModelStore
from taft.store.layout import StoreLayout
from taft.store.manifest import load_manifest
from taft.store.plan import shard_seed
from test_store import (CONFIG, INLINE, K, base_store, composed_delta, create, data, file_hashes,  # noqa: F401
                        same_tensors, store, tiny_backbone, tiny_features)  # (fixtures: data, base_store, store)

pytestmark = pytest.mark.usefixtures("one_thread")


def new_images(prefix: str, n_per_class: int = 6, seed: int = 1, classes=CLASSES) -> ImageDataset:
    """Class-coloured 12 px images like test_store's, with ids '<prefix>/<i>' (other examples than the store's)."""
    rng = np.random.default_rng(seed)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30], [120, 120, 120]])
    labels = np.repeat(np.arange(len(classes)), n_per_class)
    arr = np.clip(colours[labels][:, None, None, :] + rng.integers(-40, 40, (len(labels), 12, 12, 3)), 0, 255)
    records = [ImageRecord(f"{prefix}/{i:03d}", int(y), ArrayImage(arr.astype(np.uint8), i))
               for i, y in enumerate(labels)]
    return ImageDataset(records, classes, tiny_backbone().preprocess, source_digest=f"living-{prefix}-{seed}")


def features_of(dataset: ImageDataset):
    bb = tiny_backbone()
    return cache_features(dataset, Backbone(bb.name, copy.deepcopy(bb.model).float(), bb.preprocess), 1,
                          progress=False)


@pytest.fixture(scope="module")
def added_data():
    return features_of(new_images("new"))


# --------------------------------------------------------------------------------------------------------- add
def test_added_examples_become_new_shards_and_nothing_else_is_retrained(store, data, added_data):
    bb, _ = data
    before = load_manifest(StoreLayout(store))
    result = ModelStore(store).add(added_data, shards=2, backbone=bb, execution=INLINE)
    assert result.shards == [K, K + 1] and result.n == len(added_data) and not result.resumed
    m = load_manifest(StoreLayout(store))
    assert [(s.file, s.sha256) for s in m.shards[:K]] == [(s.file, s.sha256) for s in before.shards]  # untouched
    assert sorted(m.shards[K].ids + m.shards[K + 1].ids) == sorted(added_data.ids)
    assert [m.shards[i].seed for i in (K, K + 1)] == [shard_seed(CONFIG.seed, i) for i in (K, K + 1)]
    assert m.composed.shards == list(range(K + 2)) and m.plan.num_shards == K + 2
    assert m.additions[0].op == "add" and m.additions[0].shards == [K, K + 1]
    assert m.additions[0].data["features"]["entry"] == added_data.meta["entry"]
    # the composed model is the uniform mean of all five shards, the new ones included
    want = {}
    for i in range(K + 2):
        for k, t in read_checkpoint(ModelStore(store).shard_path(i)).tensors.items():
            want[k] = want.get(k, 0) + t.double() / (K + 2)
    got = composed_delta(store)
    assert all(torch.allclose(got[k].double(), want[k], atol=1e-7) for k in want)  # float32 sum vs float64 mean
    assert sorted(ModelStore(store).ids()) == sorted(before.plan.ids + list(added_data.ids))
    entry = ModelStore(store).audit()[-1]
    assert entry["op"] == "add" and entry["shards"] == [K, K + 1] and entry["n"] == len(added_data)
    assert ModelStore(store).info()["additions"][0]["shards"] == [K, K + 1]
    assert ModelStore(store).verify().ok
    from taft.store.report import write_report

    report = write_report(store, store.parent / "report", None).read_text()
    assert f"| {K + 1} | trained | {m.shards[K + 1].n} |" in report and "| 0 | trained" in report
    assert report.count("| created |") == K and report.count(f"| added {m.additions[0].time} |") == 2


def test_default_shards_keep_the_mean_shard_size(store, data, added_data):
    bb, cf = data
    result = ModelStore(store).add(added_data, backbone=bb, execution=INLINE)
    assert len(result.shards) == round(len(added_data) / (len(cf) / K))  # 24 new / 12 per shard = 2


def test_add_then_forget_by_retrain_equals_adding_without_the_ids(store, data, added_data, tmp_path):
    bb, cf = data
    other = Path(shutil.copytree(store, tmp_path / "other"))
    ModelStore(store).add(added_data, shards=2, backbone=bb, execution=INLINE)
    m = load_manifest(StoreLayout(store))
    new_plan = type(m.plan)(m.plan.kind, m.plan.seed, m.plan.shards[K:])
    gone = [m.shards[K].ids[0], m.shards[K].ids[2], m.shards[K + 1].ids[1]]
    ModelStore(store).forget(gone, "retrain", backbone=bb, execution=INLINE)
    rest = added_data.select([i for i in added_data.ids if i not in gone])
    ModelStore(other).add(rest, plan=new_plan.without(gone), backbone=bb, execution=INLINE)
    a, b = load_manifest(StoreLayout(store)), load_manifest(StoreLayout(other))
    assert a.composed.content_sha256 == b.composed.content_sha256  # bit-identical
    for i in range(K + 2):
        assert same_tensors(read_checkpoint(ModelStore(store).shard_path(i)).tensors,
                            read_checkpoint(ModelStore(other).shard_path(i)).tensors)


def test_add_refusals_name_the_problem_and_change_nothing(store, data, added_data):
    bb, cf = data
    hashes = file_hashes(store)
    with pytest.raises(TaftError, match=r"already in the store, e\.g\. \['img/000'"):
        ModelStore(store).add(cf.select(cf.ids[:4]), backbone=bb, execution=INLINE)
    five = features_of(new_images("odd", classes=[*CLASSES, "grey"]))
    with pytest.raises(TaftError, match="class 'grey' of the new data is not one of the store's classes"):
        ModelStore(store).add(five, backbone=bb, execution=INLINE)
    with pytest.raises(TaftError, match="cannot split"):
        ModelStore(store).add(added_data, shards=10_000, backbone=bb, execution=INLINE)
    assert file_hashes(store) == hashes


def test_a_forgotten_id_is_re_added_only_deliberately_and_logged(store, data):
    bb, cf = data
    gone = [cf.ids[0], cf.ids[5]]
    ModelStore(store).forget(gone, "drop")
    hashes = file_hashes(store)
    again = cf.select(gone)
    with pytest.raises(TaftError, match="forgotten by the store.*readd_forgotten=True"):
        ModelStore(store).add(again, backbone=bb, execution=INLINE)
    assert file_hashes(store) == hashes
    result = ModelStore(store).add(again, backbone=bb, readd_forgotten=True, execution=INLINE)
    assert result.readded == sorted(gone)
    m = load_manifest(StoreLayout(store))
    assert not set(gone) & set(m.forgotten) and sorted(m.shards[-1].ids) == sorted(gone)
    assert ModelStore(store).audit()[-1]["readded"] == sorted(gone)
    assert ModelStore(store).verify().ok


# ------------------------------------------------------------------------------------------------------ import
@pytest.fixture(scope="module")
def partner(data, added_data, tmp_path_factory) -> Path:
    """Another store with the same base and recipe, trained on the new examples: its shards are importable."""
    bb, _ = data
    return create(tmp_path_factory.mktemp("partner") / "p", added_data, bb, CONFIG, shards=2)


def test_an_imported_shard_joins_and_is_drop_only_without_its_data(store, data, partner):
    bb, _ = data
    shard = ModelStore(partner).shard_path(0)
    ckpt = read_checkpoint(shard)
    result = ModelStore(store).import_checkpoints([shard])
    assert result.shards == [K] and not result.retrainable
    m = load_manifest(StoreLayout(store))
    assert m.shards[K].sha256 == load_manifest(StoreLayout(partner)).shards[0].sha256  # copied unchanged
    assert m.shards[K].ids == sorted(ckpt.ids) and m.shards[K].seed == ckpt.meta["train_config"]["seed"]
    assert m.composed.shards == list(range(K + 1)) and not m.retrainable(K)
    assert ModelStore(store).audit()[-1]["op"] == "import" and ModelStore(store).verify().ok
    r = ModelStore(store).forget([ckpt.ids[0], m.shards[0].ids[0]], "retrain", backbone=bb, execution=INLINE)
    assert r.undated == [K] and r.shards == [0, K]
    m = load_manifest(StoreLayout(store))
    assert m.shards[K].status == "dropped" and m.shards[0].status == "trained"


def test_an_import_with_its_data_is_retrained_like_any_shard(store, data, added_data, partner):
    bb, _ = data
    ModelStore(store).import_checkpoints([ModelStore(partner).shard_path(1)], features=added_data)
    m = load_manifest(StoreLayout(store))
    gone = m.shards[K].ids[:2]
    ModelStore(store).forget(gone, "retrain", backbone=bb, execution=INLINE)
    ModelStore(partner).forget(gone, "retrain", backbone=bb, execution=INLINE)
    mine = read_checkpoint(ModelStore(store).shard_path(K)).tensors  # its own seed, the same threads: identical
    assert same_tensors(mine, read_checkpoint(ModelStore(partner).shard_path(1)).tensors)


def test_import_refusals_name_what_differs_and_change_nothing(store, data, added_data, partner, tmp_path):
    bb, cf = data
    hashes = file_hashes(store)
    other_lr = create(tmp_path / "lr", added_data, bb, CONFIG.__class__(lr=2e-2, epochs=2, batch_size=4), shards=1)
    with pytest.raises(TaftError, match=r"another recipe than the store's: its lr \(0\.02, the store's 0\.01\) differs"):
        ModelStore(store).import_checkpoints([ModelStore(other_lr).shard_path(0)])
    other_head = create(tmp_path / "head", added_data, bb, CONFIG, shards=1, spec={"head_seed": 5})
    with pytest.raises(FingerprintMismatchError, match=r"another model .* its base head \(head seed\) differs"):
        ModelStore(store).import_checkpoints([ModelStore(other_head).shard_path(0)])
    with pytest.raises(TaftError, match="already in the store"):
        ModelStore(store).import_checkpoints([ModelStore(store).shard_path(0)])
    both = [ModelStore(partner).shard_path(0), ModelStore(other_lr).shard_path(0)]
    with pytest.raises(TaftError, match="differs"):
        ModelStore(store).import_checkpoints(both)
    assert file_hashes(store) == hashes


def test_a_dp_store_imports_private_checkpoints_and_keeps_their_ledgers(data, added_data, partner, tmp_path):
    from taft.privacy import DPConfig

    bb, cf = data
    dp = DPConfig(noise_multiplier=1.0, delta=1e-3, clip=1.0, accountant="rdp", seed=11)
    mine = create(tmp_path / "mine", cf, bb, CONFIG, shards=2, dp=dp)
    theirs = create(tmp_path / "theirs", added_data, bb, CONFIG, shards=1,
                    dp=DPConfig(noise_multiplier=0.8, delta=1e-3, clip=1.0, accountant="rdp", seed=3))
    hashes = file_hashes(mine)
    with pytest.raises(TaftError, match="trained without DP-SGD"):
        ModelStore(mine).import_checkpoints([ModelStore(partner).shard_path(0)])
    assert file_hashes(mine) == hashes
    with pytest.raises(TaftError, match="trained with DP-SGD, but the store has no DP"):
        ModelStore(partner).import_checkpoints([ModelStore(theirs).shard_path(0)])
    ModelStore(mine).import_checkpoints([ModelStore(theirs).shard_path(0)])
    m = load_manifest(StoreLayout(mine))
    ledger = load_manifest(StoreLayout(theirs)).shards[0].privacy
    assert m.shards[2].privacy == ledger  # kept as it was
    epsilons = [s.privacy["epsilon"] for s in m.shards]
    assert ledger["epsilon"] > max(epsilons[:2])  # less noise: the imported shard spent more
    assert m.privacy == m.guarantee() and m.privacy["epsilon"] == max(epsilons)  # parallel composition: the max


# ------------------------------------------------------------------------------------------ a store that streams
def test_a_store_streamed_with_augmentation_forgets_by_retrain_bit_identically(tmp_path):
    from dataclasses import replace

    from test_store import tiny_images

    bb, images = tiny_backbone(), tiny_images()
    config = replace(CONFIG, augment="crop-flip")
    root = create(tmp_path / "s", images, bb, config, shards=K)  # the raw dataset: every shard streams
    m = load_manifest(StoreLayout(root))
    assert m.data["features"]["streamed"] and m.train_config["augment"] == "crop-flip"
    assert read_checkpoint(ModelStore(root).shard_path(0)).meta["train_config"]["augment"] == "crop-flip"
    gone = [m.shards[0].ids[0], m.shards[2].ids[1]]
    ModelStore(root).forget(gone, "retrain", features=images, backbone=bb, execution=INLINE)
    scratch = create(tmp_path / "scratch", images.select([i for i in images.ids if i not in gone]), bb, config,
                     plan=m.plan.without(gone))
    assert same_tensors(composed_delta(root), composed_delta(scratch))
    with pytest.raises(TaftError, match="augment='crop-flip' needs the raw dataset"):
        create(tmp_path / "cached", tiny_features()[1], bb, config, shards=K)
    assert not (tmp_path / "cached").exists()
    unaugmented = create(tmp_path / "plain", images, bb, CONFIG, shards=K)
    assert not same_tensors(read_checkpoint(ModelStore(unaugmented).shard_path(1)).tensors,
                            read_checkpoint(ModelStore(root).shard_path(1)).tensors)  # the views did change training
