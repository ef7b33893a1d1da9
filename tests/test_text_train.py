"""Training, caching, composition and DP-SGD on text: masks and dynamic padding through every path.

A small random BERT (float64) with the real MiniLM tokenizer, so tokenization, the cache's token lengths and the
trainer's per-batch padding are the real ones while the model stays tiny.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import TINY_BERT
from taft.backbones.base import Backbone
from taft.backbones.tokenizer import TextTokenizer
from taft.backbones.assets import minilm_dir
from taft.data import TextDataset
from taft.privacy.dpsgd import clipped_sum, per_example_gradients
from taft.data.trunk_features import cache_features
from taft.model import Classifier
from taft.parallel import Execution
from taft.store import ModelStore
from taft.train import TrainConfig, evaluate, fit, plan_run
from taft.losses import classification_loss
from taft.train.examples import Examples, Prepared
from taft.train.loop import train_loop

pytestmark = pytest.mark.usefixtures("isolated_cache", "one_thread")

TEXTS = ["a gripping, beautifully shot film", "dull", "not as funny as it thinks it is, and far too long",
         "a small gem", "tedious from start to finish", "warm, witty and wise", "I wanted my two hours back",
         "one of the year's best", "flat", "an utter delight from its first frame to its very last scene",
         "mediocre at best", "superb acting"]
LABELS = [1, 0, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
F32 = torch.float32  # the tests comparing cached features with the trunk's own output (the default float16 rounds)


def dataset(bb: Backbone, n: int = len(TEXTS)) -> TextDataset:
    return TextDataset(TEXTS[:n], LABELS[:n], [f"t{i:02d}" for i in range(n)], ["neg", "pos"], bb.tokenizer, "test")


def test_cache_stores_lengths_and_batches_are_cut_to_their_longest_text(tiny_bert):
    ds = dataset(tiny_bert)
    cf = Classifier(tiny_bert, ds.class_names, 1).cache_features(ds, progress=False, batch_size=5, dtype=F32)
    assert cf.meta == cache_features(ds, tiny_bert, 1, progress=False, dtype=F32).meta  # the model's trunk: its entry
    assert cf.lengths == ds.lengths and cf.feature_shape == (ds.width, TINY_BERT.dim)
    stored = torch.from_numpy(np.asarray(cf.features, dtype=np.float64))
    for i, n in enumerate(ds.lengths):  # each text alone (no padding at all) gives the stored row; zeros after it
        alone = tiny_bert.tokenizer.batch([TEXTS[i]])
        trunk = Classifier(tiny_bert, ds.class_names, 1).trunk
        torch.testing.assert_close(stored[i, :n], trunk(alone)[0].float().double(), rtol=0, atol=0)
        assert not stored[i, n:].any()
    ex = Examples(cf)
    x, mask = ex.rows(torch.tensor([1, 8]))  # "dull", "flat": 3 tokens each
    assert x.shape == (2, 3, TINY_BERT.dim) and mask.all()
    x, mask = ex.rows(torch.tensor([1, 2]))
    assert x.shape[1] == ds.lengths[2] and mask.sum(1).tolist() == [ds.lengths[1], ds.lengths[2]]


@pytest.mark.parametrize("method", ["taft", "nlft", "probe"])
def test_cached_training_path_equals_the_whole_model_on_raw_text(tiny_bert, method):
    """Logits from cached, per-batch padded features equal the classifier run on freshly tokenized text."""
    ds = dataset(tiny_bert)
    clf = Classifier(tiny_bert, ds.class_names, 2, method=method, pooling="mean")
    cf = clf.cache_features(ds, progress=False, dtype=F32)
    cfg = TrainConfig(epochs=3, batch_size=4, lr=1e-2)
    result = fit(clf, cf, cfg, progress=False)
    assert result.classifier is clf
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    with torch.no_grad():
        direct = clf(tiny_bert.tokenizer.batch(TEXTS))
    ex = Examples(cf)
    x, mask = ex.rows(torch.arange(len(ds)))
    with torch.no_grad():
        cached = clf.train_logits(*clf.train_inputs(x, mask))
    # the cache stores float32 features of this float64 model: their rounding (2^-24 relative) reaches the logits
    # as ~1e-7 (measured 9.7e-8); a padding or masking error moves them by > 1e-3
    torch.testing.assert_close(cached, direct, rtol=0, atol=1e-6)
    ev = evaluate(clf, cf)
    assert ev.top1 == float((direct.argmax(-1) == torch.tensor(LABELS)).double().mean())


def test_composed_text_store_equals_the_mean_of_its_shards(tiny_bert, tmp_path):
    ds = dataset(tiny_bert)
    model = Classifier(tiny_bert, ds.class_names, 1, method="taft", pooling="mean")
    cf = model.cache_features(ds, progress=False)
    cfg = TrainConfig(epochs=2, batch_size=3, lr=1e-2)
    store = ModelStore.create(tmp_path / "s", cf, model, cfg, shards=3, min_steps=0,
                              execution=Execution("inline", progress=False))
    batch = tiny_bert.tokenizer.batch(TEXTS)
    with torch.no_grad():
        composed = store.load_composed(tiny_bert).classifier(batch)
        shards = torch.stack([store.load_shard(i, tiny_bert).classifier(batch) for i in range(3)])
    torch.testing.assert_close(composed, shards.mean(0), rtol=1e-10, atol=1e-10)
    assert (shards[0] - shards[1]).abs().max() > 1e-3  # the shards differ: the check is not vacuous


def moved_and_padded(bb: Backbone, method: str, pooling: str):
    """A k = 2 classifier with non-zero trained tensors, and a padded batch of 5 texts: (clf, x, mask, y, lengths)."""
    ds = dataset(bb, 5)
    clf = Classifier(bb, ds.class_names, 2, method=method, pooling=pooling)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in clf.tail.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    cf = clf.cache_features(ds, progress=False)
    x, y, mask = Examples(cf).batch(torch.arange(5), torch.device("cpu"), torch.float64)
    return clf, x, mask, y, cf.lengths


@pytest.mark.parametrize("method", ["taft", "nlft"])
def test_per_example_gradients_with_padding_equal_each_text_alone(tiny_bert, method):
    """vmap per-example gradients on a padded batch = ordinary backward on each text cut to its own length."""
    clf, x, mask, y, lengths = moved_and_padded(tiny_bert, method, "mean")
    grads, losses = per_example_gradients(clf, x, y, mask=mask, chunk_size=2)
    params = dict(clf.tail.named_parameters())
    for i, n in enumerate(lengths):
        clf.zero_grad(set_to_none=True)
        alone = classification_loss(clf.train_logits(x[i:i + 1, :n]), y[i:i + 1])
        alone.backward()
        assert float(losses[i]) == pytest.approx(alone.item(), rel=1e-10)
        for name, p in params.items():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("method, pooling", [("taft", "mean"), ("taft", "cls"), ("nlft", "cls")])
def test_ghost_clipping_with_padding_equals_clipping_each_text_alone(tiny_bert, method, pooling):
    """DP's clipped sum on a padded batch (ghost clipping) = Σ_i min(1, C/‖g_i‖) g_i with g_i from an ordinary
    backward on each text cut to its own length; C at the median norm (some clipped, some not)."""
    clf, x, mask, y, lengths = moved_and_padded(tiny_bert, method, pooling)
    params = dict(clf.tail.named_parameters())
    alone = []
    for i, n in enumerate(lengths):
        clf.zero_grad(set_to_none=True)
        classification_loss(clf.train_logits(x[i:i + 1, :n]), y[i:i + 1]).backward()
        alone.append({name: p.grad.clone() for name, p in params.items()})
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in grads.values())) for grads in alone])
    clip = float(norms.median())
    total, _, got_norms = clipped_sum(clf, x, y, clip, mask=mask, chunk_size=2)
    torch.testing.assert_close(got_norms, norms, rtol=1e-9, atol=0)
    for name in params:
        expected = sum(min(1.0, clip / float(nrm)) * grads[name] for nrm, grads in zip(norms, alone))
        torch.testing.assert_close(total[name], expected, rtol=1e-9, atol=1e-12, msg=name)


def test_text_features_are_cached_per_tokenization(tiny_bert):
    """Another max_length is another cache entry (the key names the tokenization)."""
    ds = dataset(tiny_bert)
    short = TextTokenizer(minilm_dir() / "tokenizer.json", 6)
    with pytest.warns(UserWarning, match="truncated"):
        ds_short = TextDataset(TEXTS, LABELS, ds.ids, ds.class_names, short, "test")
    model = Classifier(tiny_bert, ds.class_names, 1)
    a = model.cache_features(ds, progress=False)
    b = model.cache_features(ds_short, progress=False)
    assert a.path != b.path and max(b.lengths) == 6 and np.asarray(b.features).shape[1] == 6


def test_text_backbones_default_to_the_text_learning_rates(tiny_bert):
    cf = cache_features(dataset(tiny_bert), tiny_bert, 1, progress=False)
    for method, lr in (("taft", 1e-3), ("nlft", 1e-4), ("probe", 1e-2)):
        result = fit(Classifier(tiny_bert, cf.class_names, 1, method=method), cf, TrainConfig(epochs=1),
                     progress=False)
        assert result.config.lr == lr and result.metrics["lr"] == lr
    explicit = fit(Classifier(tiny_bert, cf.class_names, 1), cf, TrainConfig(epochs=1, lr=3e-4), progress=False)
    assert explicit.config.lr == 3e-4
    # a user's own loop fills in the same text recipe (not the image one, whose head rate and warm-up differ)
    cfg = TrainConfig(epochs=1, batch_size=4)
    deltas = []
    for c in (cfg, cfg.resolved("taft", text=True), cfg.resolved("taft", text=False)):
        clf = Classifier(tiny_bert, cf.class_names, 1)
        train_loop(clf, plan_run(clf, c, len(cf)), Prepared(clf, Examples(cf)), progress=False)
        deltas.append(clf.trainable_state_dict())
    assert all(torch.equal(deltas[0][n], deltas[1][n]) for n in deltas[0])
    assert not all(torch.equal(deltas[0][n], deltas[2][n]) for n in deltas[0])
