"""Streamed trunk features (`fit(..., features="stream")`) and seeded augmentation: the same model as cached
training, nothing written to the feature cache, `auto` streaming over its budget, reproducible views, and the
errors of settings that cannot work together.

Tolerance of stream == cache: a streamed batch runs the trunk on another grouping of examples than the cache's
chunks, so a feature may differ in its last bits (measured on DINOv2 ViT-S/14 at 56 px, 2 threads, 200 Fashion-MNIST
images, batches of 32 against chunks of 64: 1.4e-5 absolute, 8.2e-7 of the largest feature). After 3 epochs the
trained models' logits differed by at most 9.5e-6 (taft, nlft, probe; AdamW and SGD; max |logit| ≈ 16) on images
and 1.9e-6 on text (MiniLM-L6, 200 Rotten Tomatoes snippets). The tests ask for 1e-4: ten times that, and far
below what a wrong feature (another trunk, a padding or masking error, an augmented view) changes. The trained
tensors themselves are not compared: AdamW turns a gradient of ~0 into a step of ±lr whose sign the last bits
decide, in directions that do not change the function (measured: taft Δw 23 % apart, its logits 7.6e-6 apart).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from helpers import CLASSES, TINY_BERT, TINY_VIT
from reference import random_text_backbone
from taft import Classifier, TaftError
from taft.backbones.assets import minilm_dir
from taft.backbones.base import Backbone
from taft.backbones.tokenizer import TextTokenizer
from taft.data import ImageDataset, ImageRecord, TextDataset
from taft.data.augment import AugmentedImages, crop_box, view_generator
from taft.data.feature_cache import FeatureCache
from taft.data.images import ArrayImage
from taft.train import TrainConfig, evaluate, fit
from taft.train.examples import Examples
from taft.train.sources import FeatureSource, entry_bytes, size_text

pytestmark = pytest.mark.usefixtures("isolated_cache", "one_thread")

LOGITS_ATOL = 1e-4  # see the module doc
F32 = torch.float32  # the cache dtype whose features a stream reproduces (the default float16 rounds them)
METHODS = ["taft", "nlft", "probe"]
LR = {"taft": 1e-2, "nlft": 1e-2, "probe": 3e-2}


def images(n_per_class: int = 5, size: tuple[int, int] = (20, 16)) -> ImageDataset:
    """RGB images of `size` (W, H) whose colour depends on the class, without a transform (the model's applies)."""
    rng = np.random.default_rng(0)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30]])
    labels = np.repeat(np.arange(4), n_per_class)
    noise = rng.integers(-40, 40, (len(labels), size[1], size[0], 3))
    arr = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    records = [ImageRecord(f"img/{i:03d}", int(y), ArrayImage(arr, i)) for i, y in enumerate(labels)]
    return ImageDataset(records, CLASSES, None, source_digest="stream-test-v1")


TEXTS = ["a gripping, beautifully shot film", "dull", "not as funny as it thinks it is, and far too long",
         "a small gem", "tedious from start to finish", "warm, witty and wise", "I wanted my two hours back",
         "one of the year's best", "flat", "an utter delight from its first frame to its very last scene"]


@pytest.fixture(scope="module")
def bert32():
    """A tiny random BERT in float32 (the dtype of the float32 caches here, so that cached and streamed features can
    be equal) with MiniLM's tokenizer at 32 tokens."""
    random = random_text_backbone(TINY_BERT, seed=0, dtype=torch.float32)
    tokenizer = TextTokenizer(minilm_dir() / "tokenizer.json", 32)
    return Backbone(name=random.name, model=random.model, preprocess=tokenizer.preprocess, tokenizer=tokenizer)


def texts(bb: Backbone) -> TextDataset:
    return TextDataset(TEXTS, [i % 2 for i in range(len(TEXTS))], [f"t{i}" for i in range(len(TEXTS))],
                       ["neg", "pos"], bb.tokenizer, "test")


def cache_entries() -> list:
    root = FeatureCache().root
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def logits_on(clf: Classifier, features: Examples) -> torch.Tensor:
    x, mask = features.rows(torch.arange(len(features)))
    with torch.no_grad():
        return clf.logits(x, mask)


def same_model(cached, streamed, features: Examples) -> None:
    """The two runs trained the same function (logits on the cached features) with the same per-epoch losses."""
    torch.testing.assert_close(logits_on(streamed.classifier, features), logits_on(cached.classifier, features),
                               rtol=0, atol=LOGITS_ATOL)
    for a, b in zip(cached.history, streamed.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=LOGITS_ATOL)


# ------------------------------------------------------------------------------------------- stream == cache
@pytest.mark.parametrize("method", METHODS)
def test_streamed_images_train_the_model_cached_features_train(tiny_vit, method):
    ds = images()
    cfg = TrainConfig(lr=LR[method], epochs=3, batch_size=4)
    cached_f = Classifier(tiny_vit, CLASSES, 1).cache_features(ds, dtype=F32, progress=False)
    cached = fit(Classifier(tiny_vit, CLASSES, 1, method=method), cached_f, cfg, progress=False)
    entries = cache_entries()
    streamed = fit(Classifier(tiny_vit, CLASSES, 1, method=method), ds, cfg, val=ds, progress=False,
                   features=FeatureSource("stream", loader_workers=0))
    same_model(cached, streamed, Examples(cached_f))
    assert streamed.metrics["compute"]["feed"] == {"train": "trunk", "val": "trunk"}
    assert cache_entries() == entries  # the streamed run wrote no cache entry
    assert streamed.history[-1]["val_top1"] == evaluate(streamed.classifier, cached_f).top1


@pytest.mark.parametrize("method", METHODS)
def test_streamed_text_trains_the_model_cached_features_train(bert32, method):
    ds = texts(bert32)
    cfg = TrainConfig(lr=LR[method], epochs=3, batch_size=4)
    cached_f = Classifier(bert32, ds.class_names, 1, pooling="mean").cache_features(ds, dtype=F32, progress=False)
    cached = fit(Classifier(bert32, ds.class_names, 1, method=method, pooling="mean"), cached_f, cfg,
                 progress=False)
    streamed = fit(Classifier(bert32, ds.class_names, 1, method=method, pooling="mean"), ds, cfg, progress=False,
                   features=FeatureSource("stream", loader_workers=0))
    same_model(cached, streamed, Examples(cached_f))
    assert cache_entries() == [cached_f.path.name]


def test_a_wrong_trunk_is_caught_by_the_tolerance(tiny_vit):
    """The comparison can fail: features of k = 2's trunk (one block fewer) trained as if they were k = 1's."""
    ds = images()
    cfg = TrainConfig(lr=LR["taft"], epochs=3, batch_size=4)
    cached_f = Classifier(tiny_vit, CLASSES, 1).cache_features(ds, dtype=F32, progress=False)
    cached = fit(Classifier(tiny_vit, CLASSES, 1), cached_f, cfg, progress=False)
    other_f = Classifier(tiny_vit, CLASSES, 2).cache_features(ds, dtype=F32, progress=False)
    wrong = fit(Classifier(tiny_vit, CLASSES, 1), (torch.from_numpy(np.array(other_f.features)), other_f.labels), cfg,
                progress=False)
    with pytest.raises(AssertionError):
        same_model(cached, wrong, Examples(cached_f))


def test_streamed_dp_sgd_draws_the_batches_of_cached_dp_sgd(tiny_vit):
    from taft.privacy import DPConfig

    ds = images()
    dp = DPConfig(noise_multiplier=0.5, delta=1e-3, expected_batch_size=4, seed=3)
    cfg = TrainConfig(lr=0.1, epochs=2, batch_size=4)
    cached_f = Classifier(tiny_vit, CLASSES, 1).cache_features(ds, dtype=F32, progress=False)
    cached = fit(Classifier(tiny_vit, CLASSES, 1), cached_f, cfg, dp=dp, progress=False)
    streamed = fit(Classifier(tiny_vit, CLASSES, 1), ds, cfg, dp=dp, progress=False,
                   features=FeatureSource("stream", loader_workers=0))
    same_model(cached, streamed, Examples(cached_f))


# ------------------------------------------------------------------------------------------- auto
def test_auto_caches_within_the_budget_and_streams_over_it_saying_so(tiny_vit):
    ds = images()
    clf = Classifier(tiny_vit, CLASSES, 1)
    size = entry_bytes(clf, ds.with_transform(clf.preprocess), torch.float16)  # the default cache dtype
    cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        streamed = fit(Classifier(tiny_vit, CLASSES, 1), ds, cfg, progress=False,
                       features=FeatureSource("auto", cache_max=size // 2, loader_workers=0))
    said = [str(w.message) for w in caught if "streaming trunk features" in str(w.message)]
    assert len(said) == 1 and said[0].endswith(f"would take {size_text(size)}, over the budget cache_max "
                                               f"(--cache-max) of {size_text(size // 2)}") and "\n" not in said[0]
    assert streamed.metrics["compute"]["feed"] == {"train": "trunk"} and cache_entries() == []

    cached = fit(Classifier(tiny_vit, CLASSES, 1), ds, cfg, progress=False,
                 features=FeatureSource("auto", cache_max=size))
    assert cached.metrics["compute"]["feed"] == {"train": "host"} and len(cache_entries()) == 1
    entry = clf.cache_features(ds, progress=False)
    # the size "auto" weighs is the entry's: n × tokens × width × 2 bytes (float16, the default)
    assert size == entry.features.nbytes == len(ds) * 10 * TINY_VIT.dim * 2


def test_auto_measures_text_at_its_longest_example(bert32):
    ds = texts(bert32)
    clf = Classifier(bert32, ds.class_names, 1)
    assert entry_bytes(clf, ds, torch.float16) == clf.cache_features(ds, dtype=torch.float16,
                                                                      progress=False).features.nbytes


# ------------------------------------------------------------------------------------------- augmentation
def test_views_depend_on_seed_epoch_and_id_only(tiny_vit):
    ds = images().with_transform(tiny_vit.preprocess)
    view = AugmentedImages(ds, "crop-flip", seed=0, epoch=1)
    again = AugmentedImages(ds, "crop-flip", seed=0, epoch=1)
    assert all(torch.equal(view[i][0], again[i][0]) for i in range(len(ds)))
    other_seed = AugmentedImages(ds, "crop-flip", seed=1, epoch=1)
    other_epoch = AugmentedImages(ds, "crop-flip", seed=0, epoch=2)
    assert any(not torch.equal(view[i][0], other_seed[i][0]) for i in range(len(ds)))
    assert any(not torch.equal(view[i][0], other_epoch[i][0]) for i in range(len(ds)))
    # a selection (another position of the same example) gives the example the same view
    picked = ds.select([ds.ids[7]])
    assert torch.equal(AugmentedImages(picked, "crop-flip", seed=0, epoch=1)[0][0], view[7][0])
    assert view[0][0].shape == ds[0][0].shape


def test_flip_views_are_the_image_or_its_mirror_both_seen(tiny_vit):
    ds = images().with_transform(tiny_vit.preprocess)
    view = AugmentedImages(ds, "flip", seed=0, epoch=1)
    flipped = []
    for i in range(len(ds)):
        plain, seen = ds[i][0], view[i][0]
        assert torch.equal(seen, plain) or torch.equal(seen, plain.flip(-1))
        flipped.append(not torch.equal(seen, plain))
    assert any(flipped) and not all(flipped)


def test_crop_boxes_keep_the_scale_and_ratio_ranges():
    for i in range(200):
        left, top, right, bottom = crop_box(40, 30, view_generator(0, 1, f"x{i}"))
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 30
        assert 0.08 * 1200 * 0.9 <= w * h <= 1200  # rounding to whole pixels moves the area a little
        assert 3 / 4 * 0.85 <= w / h <= 4 / 3 / 0.85
    # a 1-pixel-high strip cannot hold a box of ratio ≤ 4/3 above 8 % of its area: the central fallback
    assert crop_box(100, 1, view_generator(0, 1, "strip")) == (49, 0, 50, 1)


def test_augmented_runs_repeat_exactly_differ_by_seed_and_never_augment_evaluation(tiny_vit):
    ds = images()
    source = FeatureSource("stream", loader_workers=0)
    cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=4, augment="crop-flip")
    first = fit(Classifier(tiny_vit, CLASSES, 1), ds, cfg, progress=False, features=source)
    again = fit(Classifier(tiny_vit, CLASSES, 1), ds, cfg, progress=False, features=source)
    state, same = first.classifier.trainable_state_dict(), again.classifier.trainable_state_dict()
    assert all(torch.equal(state[k], same[k]) for k in state)
    plain = fit(Classifier(tiny_vit, CLASSES, 1), ds, TrainConfig(lr=1e-2, epochs=2, batch_size=4), progress=False,
                features=source)
    assert first.history[0]["train_loss"] != plain.history[0]["train_loss"]  # it did augment
    seeded = fit(Classifier(tiny_vit, CLASSES, 1), ds, TrainConfig(lr=1e-2, epochs=2, batch_size=4, seed=1,
                                                                   augment="crop-flip"), progress=False,
                 features=source)
    other = seeded.classifier.trainable_state_dict()
    assert any(not torch.equal(state[k], other[k]) for k in state)
    # the final metrics (on the training data, no validation data) are of the unaugmented images
    ev = evaluate(first.classifier, first.classifier.cache_features(ds, dtype=F32, progress=False))
    assert first.metrics["top1"] == ev.top1 and first.metrics["loss"] == pytest.approx(ev.loss, abs=LOGITS_ATOL)
    assert first.config.augment == "crop-flip" and first.classifier.train_config["augment"] == "crop-flip"


def test_loader_workers_give_the_views_of_the_main_process(tiny_vit):
    ds = images()
    cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=4, augment="crop-flip")
    runs = [fit(Classifier(tiny_vit, CLASSES, 1), ds, cfg, progress=False,
                features=FeatureSource("stream", loader_workers=w)) for w in (0, 2)]
    a, b = (r.classifier.trainable_state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------- errors
def test_settings_that_cannot_work_together_are_one_line_errors(tiny_vit, bert32):
    ds = images()
    clf = Classifier(tiny_vit, CLASSES, 1)
    cached_f = clf.cache_features(ds, progress=False)
    crop = TrainConfig(lr=1e-2, epochs=1, augment="crop-flip")
    cases = [
        (lambda: fit(clf, cached_f, crop, progress=False), "augment='crop-flip' needs streamed trunk features"),
        (lambda: fit(clf, ds, crop, features="cache", progress=False),
         "holds one fixed view of each image): use features='stream'"),
        (lambda: fit(clf, cached_f, TrainConfig(epochs=1), features="stream", progress=False),
         "features='stream' needs the raw dataset"),
        (lambda: fit(Classifier(bert32, ["neg", "pos"], 1), texts(bert32), crop, progress=False),
         "applies to images"),
        (lambda: TrainConfig(augment="rotate"), "augment must be one of none, flip, crop-flip"),
        (lambda: FeatureSource("disk"), "features must be one of auto, cache, stream"),
        (lambda: FeatureSource(cache_max=-1), "cache_max must be an integer ≥ 0"),
        (lambda: FeatureSource(loader_workers=-2), "loader_workers must be an integer ≥ 0"),
    ]
    for call, message in cases:
        with pytest.raises(TaftError) as e:
            call()
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert cache_entries() == [cached_f.path.name]  # nothing else was cached on the way to an error


# ------------------------------------------------------------------------------------------- command line
def test_cli_streams_augments_and_says_why(tmp_path, capsys):
    import json

    from helpers import bad, make_classes
    from taft.cli import main

    data = make_classes(tmp_path / "data", per_class=4)
    fast = ["--data", str(data), "--image-size", "28", "--epochs", "1", "--quiet", "--loader-workers", "0"]
    out = tmp_path / "run"
    assert main(["train", *fast, "--out", str(out), "--features", "stream", "--augment", "crop-flip"]) == 0
    assert json.loads((out / "config.json").read_text())["augment"] == "crop-flip"
    assert json.loads((out / "metrics.json").read_text())["compute"]["feed"] == {"train": "trunk", "val": "trunk"}
    assert cache_entries() == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", *fast, "--out", str(tmp_path / "auto"), "--cache-max", "1K"]) == 0
    said = [str(w.message) for w in caught if "streaming" in str(w.message)]  # one line, for both splits
    assert said == [said[0]] and said[0].startswith("training data: streaming trunk features") and \
        said[0].endswith("over the budget cache_max (--cache-max) of 1 KiB") and cache_entries() == []
    bad(capsys, ["train", *fast, "--out", str(tmp_path / "bad"), "--features", "cache", "--augment", "flip"],
        "--augment flip needs streamed trunk features (a cache entry holds one fixed view of each image): use "
        "--features stream")
    with pytest.raises(SystemExit):
        main(["train", *fast, "--cache-max", "4X"])
    assert "argument --cache-max: must be a size such as 4G, 512MiB or 20GB, got '4X'" in capsys.readouterr().err


def test_sizes_read_binary_and_decimal_units():
    from taft.cli.types import byte_size

    assert [byte_size(s) for s in ("0", "1024", "4G", "4GiB", "512MiB", "20GB", "1.5k", "1e9")] == \
        [0, 1024, 4 * 2**30, 4 * 2**30, 512 * 2**20, 20 * 10**9, 1536, 10**9]


def test_evaluate_takes_the_raw_dataset_cached_or_streamed(tiny_vit):
    ds = images()
    model = Classifier(tiny_vit, CLASSES, 1)
    fit(model, model.cache_features(ds, dtype=F32, progress=False), TrainConfig(lr=1e-2, epochs=2, batch_size=4),
        progress=False)
    want = evaluate(model, model.cache_features(ds, dtype=F32, progress=False))
    entries = cache_entries()
    streamed = evaluate(model, ds, features="stream")
    assert cache_entries() == entries  # nothing written
    assert streamed.top1 == want.top1 and streamed.loss == pytest.approx(want.loss, rel=LOGITS_ATOL)
    cached = evaluate(model, ds, features=FeatureSource("cache", cache_dtype=F32))
    assert cached.top1 == want.top1 and cached.loss == pytest.approx(want.loss, rel=1e-6)  # the same entry
