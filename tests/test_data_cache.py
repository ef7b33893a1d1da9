"""The trunk-feature cache: hits, misses, invalidation, resumed builds, float16, clearing."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import write_image
from taft.backbones.base import ImagePreprocess
from taft.data import (
    CachedFeatures,
    FeatureCache,
    build_or_load_features,
    image_folder,
    split_dataset,
)
from taft.errors import TaftError

pytestmark = pytest.mark.usefixtures("isolated_cache")

PP = ImagePreprocess(image_size=(14, 14), patch_size=7)
KEY = {"backbone": "fake-fingerprint", "tangent_blocks": 1}
N_IMAGES = 13  # 3 classes; batch_size 4 -> 4 chunks, the last one short


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "images"
    for i in range(N_IMAGES):
        ext = "png" if i % 2 else "jpg"
        write_image(root / f"class{i % 3}" / f"img{i:02d}.{ext}", i, size=(11, 9), grey=i % 4 == 0)
    return root


class Trunk:
    """A fixed random patch conv: (B, 3, H, W) -> (B, tokens, 8). Counts calls; can fail on a given call."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=7, stride=7)
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("trunk interrupted")
        assert not torch.is_grad_enabled()
        return self.conv(x).flatten(2).transpose(1, 2)


def entries(tmp_path) -> list[Path]:
    root = tmp_path / "cache" / "features"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def test_hit_after_build(folder, tmp_path):
    ds = image_folder(folder, PP)
    trunk = Trunk()
    cf = FeatureCache().build_or_load(ds, trunk, KEY, batch_size=4, progress=False)
    assert trunk.calls == 4 and len(cf) == N_IMAGES and cf.feature_shape == (4, 8)
    assert cf.ids == ds.ids and cf.labels == ds.labels and cf.class_names == ds.class_names
    assert cf.path.parent == tmp_path / "cache" / "features" and (cf.path / "meta.json").is_file()
    assert not (cf.path / "progress.json").exists()
    with torch.no_grad():
        direct = trunk.conv(torch.stack([ds[i][0] for i in range(N_IMAGES)])).flatten(2).transpose(1, 2)
    assert cf.features.dtype == np.float16  # the default storage dtype (CACHE_DTYPE)
    # the trunk's float32 output rounded once to float16: equal up to one float16 ulp (assert_close's float16 rtol of
    # 1e-3 is one ulp), since the batches of 4 here and of all 12 above may differ in the last float32 bits
    torch.testing.assert_close(torch.from_numpy(np.array(cf.features)), direct.to(torch.float16))
    x, y, rid = cf[5]
    assert x.dtype == torch.float32 and (y, rid) == (ds.labels[5], ds.ids[5])
    assert not cf.features.flags.writeable  # opened read-only

    again = Trunk()
    cf2 = build_or_load_features(image_folder(folder, PP), again, KEY, batch_size=4, progress=False)
    assert again.calls == 0 and cf2.path == cf.path
    assert np.array_equal(cf2.features, cf.features)
    assert FeatureCache().load(ds, KEY) is not None


def test_miss_on_different_key(folder, tmp_path):
    ds = image_folder(folder, PP)
    a = FeatureCache().build_or_load(ds, Trunk(), KEY, progress=False)
    trunk = Trunk()
    b = FeatureCache().build_or_load(ds, trunk, {**KEY, "tangent_blocks": 2}, progress=False)
    assert trunk.calls == 1 and a.path != b.path and len(entries(tmp_path)) == 2
    assert FeatureCache().load(ds, {**KEY, "tangent_blocks": 3}) is None


@pytest.mark.parametrize("change", ["rewrite", "add", "remove"])
def test_invalidated_when_data_changes(folder, tmp_path, change):
    first = FeatureCache().build_or_load(image_folder(folder, PP), Trunk(), KEY, progress=False)
    if change == "rewrite":
        write_image(folder / "class1" / "img01.png", 999, size=(11, 9))  # same name, same size, new pixels
    elif change == "add":
        write_image(folder / "class2" / "new.png", 1000, size=(11, 9))
    else:
        (folder / "class0" / "img03.png").unlink()
    trunk = Trunk()
    ds = image_folder(folder, PP)
    second = FeatureCache().build_or_load(ds, trunk, KEY, progress=False)
    assert trunk.calls == 1 and second.path != first.path and second.ids == ds.ids


def test_invalidated_when_preprocessing_changes(folder):
    ds = image_folder(folder, PP)
    first = FeatureCache().build_or_load(ds, Trunk(), KEY, progress=False)
    for other in (ImagePreprocess((14, 14), 7, interpolation="bilinear"),
                  ImagePreprocess((14, 14), 7, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))):
        trunk = Trunk()
        cf = FeatureCache().build_or_load(ds.with_transform(other), trunk, KEY, progress=False)
        assert trunk.calls == 1 and cf.path != first.path
    trunk = Trunk()
    bigger = FeatureCache().build_or_load(ds.with_transform(ImagePreprocess((28, 28), 7)), trunk, KEY,
                                          progress=False)
    assert trunk.calls == 1 and bigger.feature_shape == (16, 8)


def test_interrupted_build_resumes(folder, tmp_path):
    ds = image_folder(folder, PP)
    cache = FeatureCache()
    with pytest.raises(RuntimeError, match="interrupted"):
        cache.build_or_load(ds, Trunk(fail_on_call=3), KEY, batch_size=4, progress=False)
    (entry,) = entries(tmp_path)
    assert not (entry / "meta.json").exists()
    assert json.loads((entry / "progress.json").read_text())["done"] == [0, 1]
    assert cache.load(ds, KEY) is None  # a partial entry is never complete
    with pytest.raises(TaftError, match="not a complete"):
        CachedFeatures(entry)

    trunk = Trunk()  # a different batch size: the build keeps the chunking it started with
    resumed = cache.build_or_load(ds, trunk, KEY, batch_size=5, progress=False)
    assert trunk.calls == 2 and resumed.path == entry

    fresh = FeatureCache(tmp_path / "other").build_or_load(ds, Trunk(), KEY, batch_size=4, progress=False)
    assert (entry / "features.npy").read_bytes() == (fresh.path / "features.npy").read_bytes()
    assert resumed.ids == fresh.ids and resumed.labels == fresh.labels


def test_broken_partial_state_restarts(folder, tmp_path):
    ds = image_folder(folder, PP)
    with pytest.raises(RuntimeError):
        FeatureCache().build_or_load(ds, Trunk(fail_on_call=2), KEY, batch_size=4, progress=False)
    (entry,) = entries(tmp_path)
    (entry / "features.npy").write_bytes(b"garbage")
    (entry / "meta.json").write_text("{not json")
    trunk = Trunk()
    cf = FeatureCache().build_or_load(ds, trunk, KEY, batch_size=4, progress=False)
    assert trunk.calls == 4 and len(cf) == N_IMAGES


def test_float16(folder, tmp_path):
    ds = image_folder(folder, PP)
    f32 = FeatureCache().build_or_load(ds, Trunk(), KEY, dtype=torch.float32, progress=False)
    trunk = Trunk()
    f16 = FeatureCache().build_or_load(ds, trunk, KEY, dtype=torch.float16, progress=False)
    assert trunk.calls == 1 and f16.path != f32.path
    assert f16.features.dtype == np.float16 and f16.meta["dtype"] == "float16"
    x16, y, _ = f16[0]
    assert x16.dtype == torch.float32 and y == f32[0][1]
    torch.testing.assert_close(x16, f32[0][0], atol=1e-2, rtol=1e-3)
    assert (f16.path / "features.npy").stat().st_size < (f32.path / "features.npy").stat().st_size
    with pytest.raises(TaftError, match="float16 overflow"):
        FeatureCache().build_or_load(ds.with_transform(ImagePreprocess((28, 28), 7)),
                                     lambda x: Trunk()(x) * 1e6, KEY, dtype=torch.float16, progress=False)
    with pytest.raises(TaftError, match="float32 or torch.float16"):
        FeatureCache().build_or_load(ds, Trunk(), KEY, dtype=torch.bfloat16, progress=False)


def test_refusals(folder):
    ds = image_folder(folder, PP)
    custom = ds.with_transform(lambda im: torch.zeros(3, 14, 14))
    with pytest.raises(TaftError, match=r"key\['preprocess'\]"):
        FeatureCache().build_or_load(custom, Trunk(), KEY)
    cf = FeatureCache().build_or_load(custom, Trunk(), {**KEY, "preprocess": "zeros"}, progress=False)
    assert len(cf) == N_IMAGES
    with pytest.raises(TaftError, match="plain JSON"):
        FeatureCache().build_or_load(ds, Trunk(), {"backbone": object()})
    with pytest.raises(TaftError, match="for a batch of 4"):
        FeatureCache().build_or_load(ds, lambda x: Trunk()(x)[:2], KEY, batch_size=4, progress=False)
    with pytest.raises(TaftError, match="must return a Tensor"):
        FeatureCache().build_or_load(ds, lambda x: x.numpy(), KEY, progress=False)
    with pytest.raises(TaftError, match="empty"):
        FeatureCache().build_or_load(ds.select([]), Trunk(), KEY)


def test_clear(folder, tmp_path):
    ds = image_folder(folder, PP)
    cache = FeatureCache()
    cache.build_or_load(ds, Trunk(), KEY, progress=False)
    cache.build_or_load(ds, Trunk(), {**KEY, "tangent_blocks": 2}, progress=False)
    assert cache.clear(ds, KEY) == 1 and cache.load(ds, KEY) is None
    assert cache.load(ds, {**KEY, "tangent_blocks": 2}) is not None
    assert cache.clear() == 1 and entries(tmp_path) == []
    assert cache.clear() == 0
    trunk = Trunk()
    cache.build_or_load(ds, trunk, KEY, progress=False)
    assert trunk.calls == 1


def test_cached_features_select_split_and_pickle(folder):
    ds = image_folder(folder, PP)
    cf = FeatureCache().build_or_load(ds, Trunk(), KEY, progress=False)
    train, val = split_dataset(cf, 0.34, seed=0)
    assert len(train) + len(val) == N_IMAGES and set(train.ids).isdisjoint(val.ids)
    ref_train, _ = split_dataset(ds, 0.34, seed=0)
    assert train.ids == ref_train.ids and train.labels == ref_train.labels
    i = cf.ids.index(val.ids[0])
    assert torch.equal(val[0][0], cf[i][0])
    sub = val.select(val.ids[1:])
    assert sub.ids == val.ids[1:] and torch.equal(sub[0][0], cf[cf.ids.index(val.ids[1])][0])
    feats, labels = train.as_tensors()
    assert feats.shape == (len(train), 4, 8) and labels.dtype == torch.int64
    with pytest.raises(TaftError, match="not in the cached features"):
        cf.select(["nope"])
    clone = pickle.loads(pickle.dumps(val))
    assert len(pickle.dumps(val)) < 2000 and torch.equal(clone[0][0], val[0][0])
