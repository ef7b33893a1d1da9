"""Training: all three methods on cached trunk features, the convexity of TAFT's loss, determinism, run files,
evaluation, bad input."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import CLASSES, TINY_VIT
from reference import random_backbone
from taft import Classifier, ModelSpec, TaftError
from taft.data import ImageDataset, ImageRecord
from taft.data.images import ArrayImage
from taft.data.trunk_features import cache_features
from taft.train import TrainConfig, evaluate, fit, plan_run
from taft.train.config import DP_RECIPE, recipe, run_record
from taft.losses import classification_loss
from taft.train.examples import Examples
from taft.train.loop import lr_factor

pytestmark = pytest.mark.usefixtures("isolated_cache")

LR = {"taft": 1e-2, "nlft": 1e-2, "probe": 3e-2}  # the tiny random backbone takes larger steps than ViT-S


def separable(n_per_class: int = 12, seed: int = 0, tokens: int = 10) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Trunk-feature-like tokens: a class-specific mean pattern plus small noise."""
    gen = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(len(CLASSES), tokens, TINY_VIT.dim, generator=torch.Generator().manual_seed(123))
    labels = torch.arange(len(CLASSES)).repeat_interleave(n_per_class)
    feats = centres[labels] + 0.3 * torch.randn(len(labels), tokens, TINY_VIT.dim, generator=gen)
    return feats, labels, [f"ex{i:03d}" for i in range(len(labels))]


def config(method: str, **kw) -> TrainConfig:
    """The recipe of a small run of `method` (the method itself is the model's)."""
    return TrainConfig(lr=kw.pop("lr", LR[method]), epochs=kw.pop("epochs", 6), batch_size=8, **kw)


def model(backbone, method: str = "taft", k: int = 1, **spec) -> Classifier:
    return Classifier(backbone, CLASSES, k, method=method, **spec)


def test_config_json_round_trip_and_defaults():
    cfg = TrainConfig(loss="ce", reg=0.1, schedule="step", seed=3)
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert cfg.lr is None and cfg.resolved("nlft").lr == 1e-4 and cfg.resolved("nlft").learning_rate == 1e-4
    with pytest.raises(TaftError, match="the learning rate is not set"):
        cfg.learning_rate  # noqa: B018  (unresolved: the default depends on the model's method)
    assert TrainConfig().resolved("probe").learning_rate == 1e-2
    assert TrainConfig.from_json(cfg.resolved("nlft").to_json()) == cfg.resolved("nlft")
    # a run records the model's spec beside the recipe; each reads its own keys back
    spec = ModelSpec(method="nlft", tangent_blocks=2, pooling="mean", head_seed=4)
    record = run_record(spec, cfg.resolved("nlft"))
    assert TrainConfig.from_dict(record) == cfg.resolved("nlft") and ModelSpec.from_dict(record) == spec
    assert record["method"] == "nlft" and record["tangent_blocks"] == 2 and record["loss"] == "ce"


@pytest.mark.parametrize("bad, match", [
    ({"loss": "hinge"}, "loss must be one of"),
    ({"lr": float("nan")}, "lr must be a finite number"), ({"lr": float("inf")}, "lr must be a finite"),
    ({"lr": -1.0}, "lr must be"), ({"kappa": 0}, "kappa"), ({"reg": -0.1}, "reg"), ({"batch_size": 0}, "batch_size"),
    ({"epochs": 1.5}, "epochs"), ({"schedule": "linear"}, "schedule"),
    ({"optimizer": "adam"}, "optimizer must be one of"), ({"warmup": 1.0}, "warmup must be below 1"),
    ({"momentum": -0.1}, "momentum"), ({"head_lr": 0.0}, "head_lr"), ({"min_steps": -1}, "min_steps"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(TaftError, match=match):
        TrainConfig(**bad)


@pytest.mark.parametrize("bad, match", [
    ({"method": "lora"}, "method must be one of"), ({"tangent_blocks": 0}, "tangent_blocks"),
    ({"pooling": "max"}, "pooling must be one of"), ({"head_seed": -1}, "head_seed"),
    ({"method": "probe", "head_init": "probe"}, "head_init='probe' applies"),
])
def test_spec_rejects_bad_values(bad, match):
    with pytest.raises(TaftError, match=match):
        ModelSpec(**bad)


@pytest.mark.parametrize("bad, match", [
    ({"method": "lora"}, "method must be one of"), ({"k": 0}, r"tangent_blocks \(k\) must be in 1\.\.3"),
    ({"k": 4}, r"must be in 1\.\.3"), ({"tangent_blocks": 0}, r"must be in 1\.\.3"),
    ({"method": "probe", "head_init": "probe"}, "head_init='probe' applies"),
])
def test_classifier_rejects_bad_spec_values(tiny_vit, bad, match):
    with pytest.raises(TaftError, match=match):
        Classifier(tiny_vit, CLASSES, **bad)


def test_head_lr_is_refused_for_a_probe(tiny_vit):
    with pytest.raises(TaftError, match="head_lr applies"):
        TrainConfig(head_lr=1e-2).resolved("probe")
    with pytest.raises(TaftError, match="head_lr applies"):
        fit(model(tiny_vit, "probe"), separable(2)[:2], TrainConfig(head_lr=1e-2), progress=False)


def test_config_rejects_unknown_keys_and_bad_json():
    with pytest.raises(TaftError, match="unknown training config keys \\['learning_rat'\\]"):
        TrainConfig.from_dict({"learning_rat": 1e-3})
    with pytest.raises(TaftError, match="not valid JSON"):
        TrainConfig.from_json("{method:")


@pytest.mark.parametrize("method", ["taft", "nlft", "probe"])
def test_each_method_decreases_the_loss(tiny_vit, method):
    feats, labels, ids = separable()
    result = fit(model(tiny_vit, method), (feats, labels, ids), config(method, epochs=8), progress=False)
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert result.metrics["eval_split"] == "train" and result.metrics["top1"] >= 0.9
    assert result.train_ids == ids


def test_methods_share_w0_and_start_from_the_same_function(tiny_vit):
    feats, _, _ = separable(2)
    clfs = {m: model(tiny_vit, m, head_seed=5) for m in ("taft", "nlft", "probe")}
    w0 = clfs["taft"].head_weight0
    for m in ("nlft", "probe"):  # derived models keep the base head
        assert clfs["taft"].derive(method=m).spec == clfs[m].spec
        assert torch.equal(clfs["taft"].derive(method=m).head_weight0, w0)
    assert not torch.equal(model(tiny_vit, "taft", head_seed=6).head_weight0, w0)
    assert torch.count_nonzero(w0) == w0.numel()  # a random head, never zero
    with torch.no_grad():
        ref = clfs["taft"].logits(feats)
        for m in ("nlft", "probe"):
            assert torch.equal(clfs[m].head_weight0, w0)
            torch.testing.assert_close(clfs[m].logits(feats), ref, rtol=1e-5, atol=1e-5)
    # parameters are exactly what each method trains
    names = {m: set(c.trainable_state_dict()) for m, c in clfs.items()}
    assert names["probe"] == {"head.weight", "head.bias"}
    assert names["taft"] == names["nlft"] and "blocks.2.attn.qkv.weight" in names["taft"]
    assert not any(n.startswith("blocks.1.") for n in names["taft"])
    assert all(torch.count_nonzero(t) == 0 for t in clfs["taft"].trainable_state_dict().values())  # Δw = 0


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_taft_loss_is_convex_along_random_lines(loss):
    bb = random_backbone(TINY_VIT, 12, seed=1, dtype=torch.float64)
    clf = Classifier(bb, CLASSES, 2, method="taft")
    feats, labels, _ = separable(3, seed=1)
    feats = feats.double()
    gen = torch.Generator().manual_seed(7)
    shapes = {n: t.shape for n, t in clf.trainable_state_dict().items()}

    def objective(delta: dict[str, torch.Tensor]) -> float:
        clf.load_delta_state_dict(delta)
        with torch.no_grad():
            return float(classification_loss(clf.logits(feats), labels, loss, 15.0))

    for _ in range(3):
        d1 = {n: 0.5 * torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
        d2 = {n: 0.5 * torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
        l1, l2 = objective(d1), objective(d2)
        for t in (0.1, 0.25, 0.5, 0.75, 0.9):
            mid = objective({n: (1 - t) * d1[n] + t * d2[n] for n in shapes})
            assert mid <= (1 - t) * l1 + t * l2 + 1e-9 * max(1.0, l1, l2), (t, mid, l1, l2)


def test_same_seed_is_bitwise_identical_and_another_seed_differs(tiny_vit):
    data = separable()[:2]
    cfg = config("taft", epochs=2)
    a = fit(model(tiny_vit), data, cfg, progress=False).classifier.trainable_state_dict()
    b = fit(model(tiny_vit), data, cfg, progress=False).classifier.trainable_state_dict()
    c = fit(model(tiny_vit), data, replace(cfg, seed=1), progress=False).classifier.trainable_state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


@pytest.mark.parametrize("method", ["taft", "probe"])
def test_fit_takes_and_returns_a_model(tiny_vit, tmp_path, method):
    """fit(model, ...) trains that model in place, exactly as it trains another model of the same spec; a model
    that does not match the cached features is refused before anything is written."""
    data = separable()[:2]
    cfg = config(method, epochs=2)
    fresh = fit(model(tiny_vit, method), data, cfg, progress=False).classifier
    clf = Classifier(tiny_vit, class_names=CLASSES, method=method)
    result = fit(clf, data, cfg, progress=False, run_dir=tmp_path)
    assert result.classifier is clf and clf.train_config == run_record(clf.spec, result.config)
    assert all(torch.equal(t, fresh.trainable_state_dict()[n]) for n, t in clf.trainable_state_dict().items())
    untrained = clf.derive().trainable_state_dict()
    assert any(not torch.equal(t, untrained[n]) for n, t in clf.trainable_state_dict().items())  # in place
    loaded = Classifier.load(result.checkpoint, tiny_vit)
    assert loaded.fingerprint == clf.fingerprint and loaded.train_config == clf.train_config
    cf = model(tiny_vit, method).cache_features(synthetic_images(2), progress=False)
    run = tmp_path / "refused"
    for bad, match in [(Classifier(tiny_vit, class_names=CLASSES, method=method, tangent_blocks=2),
                        "cached features are for k=1"),
                       (Classifier(tiny_vit, class_names=["x", "y", "z", "w"], method=method), "class names"),
                       (Classifier(tiny_vit, class_names=["x", "y", "z"], method=method),
                        r"labels must be in \[0, 3\)"),
                       (Classifier(random_backbone(TINY_VIT, 12, seed=1, dtype=torch.float32), class_names=CLASSES,
                                   method=method), "another backbone")]:
        with pytest.raises(TaftError, match=match):
            fit(bad, cf, cfg, progress=False, run_dir=run)
    assert not run.exists()  # refused before anything is written


def test_regularizer_pulls_towards_the_start(tiny_vit):
    data = separable()[:2]
    norms = {}
    for reg in (0.0, 10.0):
        sd = fit(model(tiny_vit), data, config("taft", epochs=3, reg=reg),
                 progress=False).classifier.trainable_state_dict()
        norms[reg] = sum(float(t.pow(2).sum()) for t in sd.values())
    assert norms[10.0] < norms[0.0]


def test_divergence_stops_with_a_clear_error(tiny_vit):
    data = separable()[:2]
    with pytest.raises(TaftError, match=r"training diverged: .* lower learning rate"):
        fit(model(tiny_vit), data, config("taft", lr=1e30, epochs=3), progress=False)


def test_schedules():
    cos, step, const = (lr_factor(s, 100) for s in ("cosine", "step", "constant"))
    assert cos(0) == 1.0 and 0 < cos(99) < 1e-3 and abs(cos(50) - 0.5) < 1e-12
    assert (step(49), step(50), step(75)) == (1.0, 0.1, pytest.approx(0.01)) and const(99) == 1.0


def test_warmup_rises_linearly_then_the_schedule_runs_over_the_remaining_steps():
    cos = lr_factor("cosine", 100, warmup_steps=10)
    assert [cos(s) for s in (0, 4, 9)] == [pytest.approx(0.1), pytest.approx(0.5), 1.0]
    assert cos(10) == 1.0 and abs(cos(55) - 0.5) < 1e-12 and 0 < cos(99) < 1e-3  # cosine over steps 10..100
    step = lr_factor("step", 100, warmup_steps=20)
    assert (step(9), step(20), step(49), step(50), step(75)) == (0.5, 1.0, 1.0, 0.1, pytest.approx(0.01))
    assert lr_factor("constant", 100, warmup_steps=4)(1) == 0.5 and lr_factor("constant", 100, 4)(4) == 1.0


def test_warmup_and_head_lr_reach_the_optimizer(tiny_vit):
    """Two groups (head at head_lr); the rate after epoch 1 of 2 (6 steps each) under a 9-step warm-up is 7/9 lr."""
    cfg = config("taft", lr=1e-3, head_lr=1e-2, warmup=0.75, schedule="constant", epochs=2).resolved("taft")
    from taft.train.examples import Prepared
    from taft.train.loop import train_loop
    from taft.train.steps import make_optimizer

    clf = model(tiny_vit)
    opt = make_optimizer(cfg, dict(clf.tail.named_parameters()))
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-2]
    assert len(opt.param_groups[1]["params"]) == 2  # the head's weight and bias Δw
    seen = []
    plan = plan_run(clf, cfg, 48)
    assert plan.config == cfg and plan.steps == 12
    train_loop(clf, plan, Prepared(clf, Examples(separable())), progress=False, on_epoch=lambda r: seen.append(r["lr"]))
    assert seen == [pytest.approx(7 / 9 * 1e-3), 1e-3]
    sgd = make_optimizer(replace(cfg, optimizer="sgd", momentum=0.5), dict(clf.tail.named_parameters()))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5


def test_a_users_loop_gets_the_recipe_fit_uses(tiny_vit):
    """plan_run fills in an unresolved config from the default image recipe (head rate, warm-up) exactly as
    `resolved("taft")` does, for train_loop as for fit; the recipe matters (without it Δw differs); make_optimizer
    and train_loop refuse an unresolved config."""
    from taft.train.examples import Prepared
    from taft.train.loop import train_loop
    from taft.train.plan import RunPlan
    from taft.train.steps import make_optimizer

    cfg = TrainConfig(epochs=2, batch_size=8)
    resolved = cfg.resolved("taft")
    plain = replace(resolved, warmup=0.0, head_lr=resolved.lr)
    deltas = []
    for c in (cfg, resolved, plain):
        clf = model(tiny_vit)
        plan = plan_run(clf, c, 48)
        assert plan.config == (plain if c is plain else resolved)
        train_loop(clf, plan, Prepared(clf, Examples(separable())), progress=False)
        deltas.append(clf.trainable_state_dict())
    assert all(torch.equal(deltas[0][n], deltas[1][n]) for n in deltas[0])
    assert not all(torch.equal(deltas[0][n], deltas[2][n]) for n in deltas[0])
    fitted = fit(model(tiny_vit), separable()[:2], cfg, progress=False).classifier.trainable_state_dict()
    assert all(torch.equal(deltas[0][n], fitted[n]) for n in fitted)  # fit's run is train_loop's
    with pytest.raises(TaftError, match=r"needs a resolved training config \(lr, optimizer, warmup unset\)"):
        make_optimizer(cfg, dict(clf.tail.named_parameters()))
    with pytest.raises(TaftError, match=r"needs a resolved training config"):
        train_loop(clf, RunPlan(cfg, 48, 8), Prepared(clf, Examples(separable())), progress=False)


def test_min_steps_raises_the_epochs_of_small_data(tiny_vit):
    cfg = config("taft", epochs=2, min_steps=30)  # batch 8
    assert cfg.epochs_for(48) == 5 and cfg.epochs_for(480) == 2 and cfg.epochs_for(48, batch_size=48) == 30
    res = fit(model(tiny_vit), separable()[:2], cfg, progress=False)
    assert res.config.epochs == 5 and len(res.history) == 5 and res.metrics["steps"] == 30


def test_defaults_come_from_the_recipe_of_the_kind_and_privacy():
    cfg = TrainConfig()
    image, text, private = (cfg.resolved("taft"), cfg.resolved("taft", text=True),
                            cfg.resolved("taft", private=True))
    assert (image.optimizer, image.lr, image.head_lr, image.warmup) == ("adamw", 1e-3, 1e-2, 0.1)
    assert (text.optimizer, text.lr, text.head_lr, text.warmup) == ("adamw", 1e-3, None, 0.0)
    assert (private.optimizer, private.lr) == (DP_RECIPE["taft"]["optimizer"], DP_RECIPE["taft"]["lr"])
    assert (image.epochs, text.epochs, private.epochs) == (10, 10, 5)  # DP-SGD: fewer epochs by default
    assert TrainConfig(epochs=3).resolved("taft", private=True).epochs == 3
    by_budget = {eps: cfg.resolved("taft", private=True, epsilon=eps).epochs for eps in (0.5, 2.99, 3.0, 8.0)}
    assert by_budget == {0.5: 5, 2.99: 5, 3.0: 10, 8.0: 10}  # more epochs only where the budget pays for them
    assert TrainConfig(epochs=3).resolved("taft", private=True, epsilon=8.0).epochs == 3  # given: kept
    assert TrainConfig(min_steps=100).resolved("taft", private=True, n=1000,
                                               batch_size=100).epochs == 10  # 10 steps/epoch
    assert recipe("probe")["head_lr"] is None and TrainConfig().resolved("probe").head_lr is None
    given = TrainConfig(lr=0.3, optimizer="adamw", warmup=0.0, head_lr=0.5).resolved("taft", private=True)
    assert (given.optimizer, given.lr, given.warmup, given.head_lr) == ("adamw", 0.3, 0.0, 0.5)  # given: kept
    assert image.resolved("taft") == image  # idempotent
    legacy = {k: v for k, v in run_record(ModelSpec(), cfg.resolved("taft")).items()
              if k not in ("optimizer", "warmup", "head_lr")}
    old = TrainConfig.from_dict(legacy)  # recorded before the recipe options: AdamW, no warm-up, one rate
    assert (old.optimizer, old.warmup, old.head_lr) == ("adamw", 0.0, old.lr) and old.resolved("taft") == old
    probe_old = TrainConfig.from_dict({**legacy, "method": "probe"})  # a probe had no head rate
    assert probe_old.head_lr is None and probe_old.resolved("probe") == probe_old


def test_evaluation_per_class_accuracy_on_a_hand_made_example(tiny_vit):
    clf = model(tiny_vit)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 0, 2])
    feats = torch.zeros(6, 10, TINY_VIT.dim)
    feats[:, 0, 0] = preds.float()  # the fake tail below reads its prediction from here
    clf.train_logits = lambda x, mask=None: 10.0 * torch.nn.functional.one_hot(x[:, 0, 0].long(), 4).float()
    ev = evaluate(clf, (feats, labels), batch_size=4)
    assert ev.top1 == pytest.approx(4 / 6)
    assert ev.per_class == [pytest.approx(2 / 3), 0.5, 1.0, None] and ev.counts == [3, 2, 1, 0]
    # mse, κ = 15, mean over 4 classes: right (10 − 15)²/4 = 6.25, wrong (10² + 15²)/4 = 81.25
    assert ev.loss == pytest.approx((4 * 6.25 + 2 * 81.25) / 6)
    d = ev.to_dict()
    assert d["per_class_accuracy"]["d"] is None and d["n"] == 6


def synthetic_images(n_per_class: int = 6) -> ImageDataset:
    """12 px RGB images whose colour depends on the class (separable), ids 'img/<i>'."""
    rng = np.random.default_rng(0)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30]])
    labels = np.repeat(np.arange(4), n_per_class)
    arr = np.clip(colours[labels][:, None, None, :] + rng.integers(-20, 20, (len(labels), 12, 12, 3)), 0, 255)
    arr = arr.astype(np.uint8)
    records = [ImageRecord(f"img/{i:03d}", int(y), ArrayImage(arr, i)) for i, y in enumerate(labels)]
    return ImageDataset(records, CLASSES, random_backbone(TINY_VIT, 12).preprocess, source_digest="synthetic-v1")


def test_fit_on_cached_features_writes_the_run_files(tiny_vit, tmp_path):
    ds = synthetic_images()
    clf = model(tiny_vit)
    cf = clf.cache_features(ds, dtype=torch.float32, progress=False)  # float32: the trunk's own output, see below
    cfg = config("taft", epochs=3)
    result = fit(clf, cf, cfg, val=cf, run_dir=tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert TrainConfig.from_json((run / "config.json").read_text()) == cfg.resolved("taft")
    assert json.loads((run / "config.json").read_text()) == run_record(clf.spec, cfg.resolved("taft"))
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    assert {"train_loss", "val_top1", "val_loss", "wall_time_s", "examples_per_s", "lr"} <= set(lines[0])
    final = json.loads((run / "metrics.json").read_text())
    assert final["eval_split"] == "val" and final["epochs"] == 3 and set(final["per_class_accuracy"]) == set(CLASSES)
    assert final["top1"] == result.metrics["top1"] and final["wall_time_s"] > 0 and final["examples_per_s"] > 0
    assert result.checkpoint == run / "checkpoint.safetensors" and result.checkpoint.is_file()
    assert result.train_ids == ds.ids
    # features from the images equal the cached ones, so predictions from images match
    images = torch.stack([ds[i][0] for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(result.classifier(images), result.classifier.logits(cf.as_tensors()[0][:4]))


def test_features_cached_for_another_trunk_are_refused(tiny_vit):
    cf = cache_features(synthetic_images(2), tiny_vit, 2, progress=False)
    same = model(tiny_vit, k=2).cache_features(synthetic_images(2), progress=False)  # the same cache entry
    assert same.meta == cf.meta and np.array_equal(np.asarray(same.features), np.asarray(cf.features))
    with pytest.raises(TaftError, match="cached features are for k=2 .* this model has k=1"):
        fit(model(tiny_vit), cf, config("taft"), progress=False)
    other = random_backbone(TINY_VIT, 12, seed=3, dtype=torch.float32)
    with pytest.raises(TaftError, match="another backbone"):
        fit(model(other, k=2), cf, config("taft"), progress=False)


def test_bad_training_data_is_named(tiny_vit):
    feats, labels, _ = separable(2)
    with pytest.raises(TaftError, match="labels must be in \\[0, 4\\)"):
        fit(model(tiny_vit), (feats, labels + 1), config("taft"), progress=False)
    with pytest.raises(TaftError, match="width 16"):
        fit(model(tiny_vit), (feats[..., :16], labels), config("taft"), progress=False)
    with pytest.raises(TaftError, match="8 feature rows but 7 labels"):
        Examples((feats, labels[:7]))
    with pytest.raises(TaftError, match="labels must be in \\[0, 3\\)"):  # the model's classes bound the labels
        fit(Classifier(tiny_vit, ["a", "b", "c"]), (feats, labels), config("taft"), progress=False)
    clf = model(tiny_vit)
    with pytest.raises(TaftError, match="evaluation data: labels must be in"):
        evaluate(clf, (feats, labels + 4))


def test_head_init_probe(tiny_vit):
    feats, labels, ids = separable()
    result = fit(model(tiny_vit, head_init="probe"), (feats, labels, ids), config("taft", epochs=3),
                 progress=False)
    random_w0 = model(tiny_vit).head_weight0
    assert not torch.equal(result.classifier.head_weight0, random_w0)
    assert result.metrics["head_probe"]["lr"] == 1e-2


def test_an_image_dataset_without_a_transform_gets_the_models_preprocessing(tiny_vit):
    ds = synthetic_images(2)
    bare = ImageDataset(ds.records, CLASSES, None, source_digest="synthetic-v1")
    with pytest.raises(TaftError, match="no preprocessing"):
        bare[0]  # noqa: B018
    clf = model(tiny_vit)
    implicit, explicit = clf.cache_features(bare, progress=False), clf.cache_features(ds, progress=False)
    assert implicit.path == explicit.path  # the same preprocessing: the same cache entry
    torch.testing.assert_close(implicit.as_tensors()[0], explicit.as_tensors()[0], rtol=0, atol=0)
    assert bare.transform is None  # the caller's dataset is left as it was


def test_a_run_whose_loss_rises_warns_once_and_a_learning_one_does_not(tiny_vit):
    feats, labels, ids = separable(4)
    with pytest.warns(UserWarning, match=r"training loss rose over the run \(.* in the first epoch"):
        fit(model(tiny_vit, "taft"), (feats, labels, ids),  # SGD at lr 3: the loss grows ×10 an epoch here
            config("taft", lr=3.0, epochs=3, optimizer="sgd", schedule="constant", warmup=0.0), progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model(tiny_vit, "taft"), (feats, labels, ids), config("taft", epochs=3), progress=False)
    assert not [w for w in caught if "loss rose" in str(w.message)]


def test_a_second_run_into_a_busy_run_directory_fails_at_once(tiny_vit, tmp_path):
    """Two runs into one directory would interleave metrics.jsonl: the second is refused, naming the holder. (flock
    locks belong to open files, so a lock held here through another open file blocks `fit` as another process's
    would.)"""
    import os

    from taft.fileio import exclusive_lock

    out = tmp_path / "run"
    with exclusive_lock(out / ".lock", "held by the test"):
        with pytest.raises(TaftError, match=rf"run directory {out} is in use by another process \(pid {os.getpid()}\)"):
            fit(model(tiny_vit), separable(2), config("taft", epochs=1), run_dir=out, progress=False)
        assert not (out / "config.json").exists()  # refused before anything was written
    fit(model(tiny_vit), separable(2), config("taft", epochs=1), run_dir=out, progress=False)  # free again
    assert (out / "checkpoint.safetensors").is_file()


def test_the_dp_rate_follows_the_expected_batch():
    """1.0 from an expected batch of 1,000 on; (B/1000)^1.5 of it below; a given rate is kept."""
    rate = lambda b, **kw: TrainConfig(**kw).resolved("taft", private=True, batch_size=b).lr  # noqa: E731
    assert rate(1000) == rate(5000) == 1.0 and rate(None) == 1.0
    assert rate(100) == pytest.approx(0.1 ** 1.5, rel=1e-12) and rate(32) == pytest.approx(0.032 ** 1.5, rel=1e-12)
    assert rate(32, lr=0.5) == 0.5 and TrainConfig().resolved("taft", batch_size=32).lr == 1e-3  # not private
