"""Image datasets (folder, Fashion-MNIST IDX), preprocessing and id-based splits, on tiny synthetic files."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CIFAR_MINI, make_idx, write_idx, write_image
from taft.backbones.base import ImagePreprocess
from taft.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    ImageTransform,
    fashion_mnist,
    image_folder,
    preprocess_id,
    split_dataset,
    train_val_split,
)
from taft.errors import AssetMissingError, TaftError

PP = ImagePreprocess(image_size=(14, 14), patch_size=7)


def make_folder(root: Path) -> Path:
    """3 classes: mixed png/jpg/bmp, grey images, a nested folder, a non-image file and a hidden file."""
    write_image(root / "cat" / "a.png", 0)
    write_image(root / "cat" / "b.jpg", 1, grey=True)
    write_image(root / "cat" / "sub" / "c.PNG", 2)
    write_image(root / "dog" / "a.jpeg", 3)
    write_image(root / "dog" / "b.bmp", 4, grey=True, size=(5, 20))
    write_image(root / "emu" / "x.png", 5)
    write_image(root / "emu" / "y.gif", 6)
    (root / "emu" / "notes.txt").write_text("not an image")
    write_image(root / "emu" / ".hidden.png", 7)
    return root


# --- transforms -----------------------------------------------------------------------------------------------

def test_transform_normalises_constant_image():
    img = Image.new("RGB", (5, 7), (255, 0, 128))
    x = ImageTransform(PP)(img)
    assert x.shape == (3, 14, 14) and x.dtype == torch.float32
    expected = [(1.0 - 0.485) / 0.229, (0.0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    for c in range(3):
        torch.testing.assert_close(x[c], torch.full((14, 14), expected[c]))


def test_transform_grey_rectangular_and_single_channel():
    grey = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))
    x = ImageTransform(ImagePreprocess((28, 56), 14))(grey)
    assert x.shape == (3, 28, 56)
    # same grey value in every channel before normalisation
    raw = x * torch.tensor(PP.std).view(3, 1, 1) + torch.tensor(PP.mean).view(3, 1, 1)
    torch.testing.assert_close(raw[0], raw[1])
    torch.testing.assert_close(raw[0], raw[2])
    one = ImageTransform(ImagePreprocess((56, 56), 14, mean=(0.5,), std=(0.5,)))(Image.new("RGB", (28, 28)))
    assert one.shape == (1, 56, 56) and torch.all(one == -1.0)


def test_transform_is_deterministic_and_bicubic():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))
    t = ImageTransform(ImagePreprocess((56, 56), 14))
    assert torch.equal(t(img), t(img))
    ref = np.asarray(img.resize((56, 56), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    torch.testing.assert_close(t(img)[0], (torch.from_numpy(ref[..., 0]) - 0.485) / 0.229)
    near = ImageTransform(ImagePreprocess((56, 56), 14, interpolation="nearest"))
    assert not torch.equal(t(img), near(img))


def test_transform_errors():
    with pytest.raises(TaftError, match="zero-size"):
        ImageTransform(PP)(Image.new("RGB", (0, 4)))
    with pytest.raises(TaftError, match="interpolation"):
        ImageTransform(ImagePreprocess((14, 14), 7, interpolation="cubic-ish"))
    with pytest.raises(TaftError, match="channels"):
        ImageTransform(ImagePreprocess((14, 14), 7, mean=(0.5, 0.5), std=(0.5, 0.5)))
    with pytest.raises(TaftError, match="positive"):
        ImageTransform(ImagePreprocess((0, 14), 7))


def test_preprocess_id():
    pid = preprocess_id(PP)
    assert pid["image_size"] == [14, 14] and pid["augment"] is False and pid["interpolation"] == "bicubic"
    assert preprocess_id(ImagePreprocess((28, 28), 7)) != pid
    assert ImageTransform(PP).cache_id() == pid


# --- image folders --------------------------------------------------------------------------------------------

def test_image_folder_scan(tmp_path):
    ds = image_folder(make_folder(tmp_path / "data"), PP)
    assert ds.class_names == ["cat", "dog", "emu"]
    assert ds.ids == ["cat/a.png", "cat/b.jpg", "cat/sub/c.PNG", "dog/a.jpeg", "dog/b.bmp", "emu/x.png",
                      "emu/y.gif"]
    assert ds.labels == [0, 0, 0, 1, 1, 2, 2]
    for i in range(len(ds)):
        x, y, rid = ds[i]
        assert x.shape == (3, 14, 14) and x.dtype == torch.float32 and torch.isfinite(x).all()
        assert (y, rid) == (ds.labels[i], ds.ids[i])
    assert ds.transform_id() == preprocess_id(PP)


def test_image_folder_errors(tmp_path):
    with pytest.raises(TaftError, match="does not exist"):
        image_folder(tmp_path / "nope", PP)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaftError, match="no class sub-folders"):
        image_folder(tmp_path / "empty", PP)
    write_image(tmp_path / "one" / "only" / "a.png", 0)
    with pytest.raises(TaftError, match="single class"):
        image_folder(tmp_path / "one", PP)
    write_image(tmp_path / "hole" / "a" / "a.png", 0)
    (tmp_path / "hole" / "b").mkdir()
    (tmp_path / "hole" / "b" / "readme.txt").write_text("x")
    with pytest.raises(TaftError, match=r"no images .* \['b'\]"):
        image_folder(tmp_path / "hole", PP)


def test_corrupt_images_fail_or_skip(tmp_path):
    root = make_folder(tmp_path / "data")
    (root / "dog" / "broken.jpg").write_bytes(b"this is not a jpeg")
    write_image(root / "emu" / "truncated.jpg", 8, size=(64, 64))
    good = (root / "emu" / "truncated.jpg").read_bytes()
    (root / "emu" / "truncated.jpg").write_bytes(good[: len(good) * 2 // 3])  # header intact, data cut
    with pytest.raises(TaftError) as err:
        image_folder(root, PP)
    msg = str(err.value)
    assert "2 unreadable" in msg and "dog/broken.jpg" in msg and "emu/truncated.jpg" in msg
    assert "skip_corrupt=True" in msg and err.value.arguments == ("skip_corrupt",) and "\n" not in msg
    with pytest.warns(UserWarning, match="skipping 2 unreadable images"):
        ds = image_folder(root, PP, skip_corrupt=True)
    assert "dog/broken.jpg" not in ds.ids and len(ds) == 7
    # headers only: the truncated JPEG passes the scan, and fails with a named error when loaded
    with pytest.warns(UserWarning, match="skipping 1 unreadable"):
        fast = image_folder(root, PP, skip_corrupt=True, check="open")
    with pytest.raises(TaftError, match="truncated.jpg"):
        fast[fast.ids.index("emu/truncated.jpg")]


def test_many_corrupt_files_are_listed_up_to_ten(tmp_path):
    root = make_folder(tmp_path / "data")
    for i in range(12):
        (root / "dog" / f"bad{i:02d}.png").write_bytes(b"")
    with pytest.raises(TaftError, match="12 unreadable .*and 2 more") as err:
        image_folder(root, PP)
    assert "bad09.png" in str(err.value) and "bad10.png" not in str(err.value)


def test_skip_corrupt_that_empties_a_class_fails(tmp_path):
    write_image(tmp_path / "d" / "a" / "a.png", 0)
    (tmp_path / "d" / "b").mkdir()
    (tmp_path / "d" / "b" / "x.png").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(TaftError, match=r"\['b'\] have no readable"):
        image_folder(tmp_path / "d", PP, skip_corrupt=True)


@pytest.mark.parametrize("hash_mode", ["bytes", "stat"])
def test_content_hash_tracks_data(tmp_path, hash_mode):
    root = make_folder(tmp_path / "data")
    h0 = image_folder(root, PP, hash_mode=hash_mode).content_hash()
    assert image_folder(root, PP, hash_mode=hash_mode).content_hash() == h0  # stable
    assert image_folder(root, ImagePreprocess((28, 28), 7), hash_mode=hash_mode).content_hash() == h0
    write_image(root / "cat" / "a.png", 100)  # rewritten in place, same size
    h1 = image_folder(root, PP, hash_mode=hash_mode).content_hash()
    assert h1 != h0
    write_image(root / "dog" / "c.png", 101)  # added
    h2 = image_folder(root, PP, hash_mode=hash_mode).content_hash()
    assert h2 not in (h0, h1)
    (root / "dog" / "c.png").rename(root / "emu" / "c.png")  # relabelled
    assert image_folder(root, PP, hash_mode=hash_mode).content_hash() not in (h0, h1, h2)


def test_select_per_class_and_with_transform(tmp_path):
    ds = image_folder(make_folder(tmp_path / "data"), PP)
    sub = ds.select(["emu/x.png", "cat/a.png"])
    assert sub.ids == ["cat/a.png", "emu/x.png"] and sub.labels == [0, 2]  # dataset order
    assert sub.class_names == ds.class_names and sub.content_hash() != ds.content_hash()
    with pytest.raises(TaftError, match="not in the dataset"):
        ds.select(["cat/zzz.png"])
    assert ds.per_class(1).ids == ["cat/a.png", "dog/a.jpeg", "emu/x.png"]
    seeded = ds.per_class(2, seed=4)
    assert len(seeded) == 6 and seeded.ids == ds.per_class(2, seed=4).ids
    big = ds.with_transform(ImagePreprocess((28, 28), 7))
    assert big[0][0].shape == (3, 28, 28) and big.content_hash() == ds.content_hash()


# --- Fashion-MNIST IDX ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_from_idx(tmp_path, compress):
    root = make_idx(tmp_path / "fm", "test", compress=compress)
    ds = fashion_mnist(root, "test", transform=ImagePreprocess((56, 56), 14))
    assert len(ds) == 30 and ds.class_names == list(FASHION_MNIST_CLASSES)
    assert ds.ids[:3] == ["test/0", "test/1", "test/2"] and ds.labels[:3] == [0, 1, 2]
    x, y, rid = ds[4]
    assert x.shape == (3, 56, 56) and (y, rid) == (4, "test/4")
    first = fashion_mnist(root, "test", transform=PP, subset=2)
    assert len(first) == 20 and first.ids[:10] == [f"test/{i}" for i in range(10)]
    sampled = fashion_mnist(root, "test", transform=PP, subset=2, subset_seed=0)
    assert len(sampled) == 20 and sorted(set(sampled.labels)) == list(range(10))
    assert sampled.ids == fashion_mnist(root, "test", transform=PP, subset=2, subset_seed=0).ids


def test_fashion_mnist_content_hash_follows_files(tmp_path):
    root = make_idx(tmp_path / "fm")
    h0 = fashion_mnist(root, transform=PP).content_hash()
    assert fashion_mnist(root, transform=PP).content_hash() == h0
    img_path = root / "train-images-idx3-ubyte.gz"
    images = np.full((30, 28, 28), 7)
    write_idx(img_path, 0x803, images)
    assert fashion_mnist(root, transform=PP).content_hash() != h0


def test_fashion_mnist_missing_names_the_package(tmp_path):
    with pytest.raises(AssetMissingError, match="sudo apt-get install dataset-fashion-mnist") as err:
        fashion_mnist(tmp_path / "none", transform=PP)
    assert "data_dir" in str(err.value) and err.value.arguments == ("data_dir",) and isinstance(err.value, TaftError)
    with pytest.raises(TaftError, match="'train' or 'test'"):
        fashion_mnist(tmp_path, "val", transform=PP)  # type: ignore[arg-type]


def test_fashion_mnist_corrupt_files(tmp_path):
    root = make_idx(tmp_path / "fm")
    img_path = root / "train-images-idx3-ubyte.gz"
    good = img_path.read_bytes()
    write_idx(img_path, 0x801, np.zeros((30, 28, 28)))  # wrong magic
    with pytest.raises(TaftError, match="magic number"):
        fashion_mnist(root, transform=PP)
    write_idx(img_path, 0x803, np.zeros((30, 28, 27)), dims=(30, 28, 28))  # short data
    with pytest.raises(TaftError, match="corrupt or truncated"):
        fashion_mnist(root, transform=PP)
    img_path.write_bytes(good[: len(good) // 2])  # truncated gzip stream
    with pytest.raises(TaftError, match="cannot read IDX"):
        fashion_mnist(root, transform=PP)
    img_path.write_bytes(good)
    write_idx(root / "train-labels-idx1-ubyte.gz", 0x801, np.zeros(29))
    with pytest.raises(TaftError, match="30 images .* 29 labels"):
        fashion_mnist(root, transform=PP)
    write_idx(root / "train-labels-idx1-ubyte.gz", 0x801, np.full(30, 10))
    with pytest.raises(TaftError, match="expected 0..9"):
        fashion_mnist(root, transform=PP)


def test_real_fashion_mnist_debian_package():
    """Needs `sudo apt-get install dataset-fashion-mnist` (CI installs it)."""
    ds = fashion_mnist(split="test", transform=ImagePreprocess((28, 28), 14), subset=3)
    assert FASHION_MNIST_DIR.is_dir() and len(ds) == 30 and sorted(set(ds.labels)) == list(range(10))
    x, y, rid = ds[0]
    assert x.shape == (3, 28, 28) and rid.startswith("test/") and y == ds.labels[0]
    assert len(fashion_mnist(transform=PP).ids) == 60000


@pytest.mark.skipif(not CIFAR_MINI.is_dir(), reason="CIFAR-10 mini folder (../shared/data) not present")
def test_cifar10_mini_folder_scan():
    ds = image_folder(CIFAR_MINI / "test", PP, check="open", hash_mode="stat")
    assert len(ds) == 5000 and len(ds.class_names) == 10 and ds.class_names[0] == "airplane"
    assert np.bincount(ds.labels).tolist() == [500] * 10
    x, y, rid = ds[0]
    assert x.shape == (3, 14, 14) and rid.startswith("airplane/") and rid.endswith(".jpg")


# --- splits ---------------------------------------------------------------------------------------------------

def test_split_is_stratified_deterministic_and_order_free():
    ids = [f"c{c}/{i}" for c in range(3) for i in range(20)]
    labels = [c for c in range(3) for _ in range(20)]
    train, val = train_val_split(ids, labels, 0.25, seed=1)
    assert len(val) == 15 and len(train) == 45 and not set(train) & set(val)
    assert sorted(train + val) == sorted(ids)
    assert [sum(v.startswith(f"c{c}/") for v in val) for c in range(3)] == [5, 5, 5]
    pairs = list(zip(ids, labels))
    random.Random(0).shuffle(pairs)
    assert train_val_split([p[0] for p in pairs], [p[1] for p in pairs], 0.25, seed=1) == (train, val)
    assert train_val_split(ids, labels, 0.25, seed=2)[1] != val
    # removing a training example from a class leaves the other classes' split unchanged
    keep = [i for i in range(len(ids)) if ids[i] != train[0]]
    _, val2 = train_val_split([ids[i] for i in keep], [labels[i] for i in keep], 0.25, seed=1)
    cls = train[0].split("/")[0]
    assert [v for v in val2 if not v.startswith(cls)] == [v for v in val if not v.startswith(cls)]


def test_split_edge_cases():
    assert train_val_split(["a", "b"], [0, 1], 0.5) == (["a", "b"], [])  # each class keeps one example
    assert train_val_split(["a", "b", "c"], [0, 0, 1], 0.0) == (["a", "b", "c"], [])
    with pytest.raises(TaftError, match="val_fraction"):
        train_val_split(["a"], [0], 1.0)
    with pytest.raises(TaftError, match="duplicate"):
        train_val_split(["a", "a"], [0, 0], 0.5)
    with pytest.raises(TaftError, match="labels"):
        train_val_split(["a"], [0, 1])


def test_split_dataset(tmp_path):
    ds = image_folder(make_folder(tmp_path / "data"), PP)
    train, val = split_dataset(ds, 0.4, seed=0)
    assert len(train) + len(val) == len(ds) and set(train.ids).isdisjoint(val.ids)
    assert set(val.labels) <= {0, 1, 2} and train.ids == [i for i in ds.ids if i in set(train.ids)]
