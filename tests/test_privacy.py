"""DP-SGD: per-example gradients (vmap over grad, through the tangent layers) against a loop, clipping, Poisson
sampling, the reduction to ordinary training at σ = 0 and C = ∞, fit/checkpoint/CLI wiring, parallel composition."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn


from reference import random_backbone
from taft import Classifier, TaftError
from taft.backbones.vit import ViTConfig
from taft.checkpoint import read_checkpoint_metadata
from taft.model import load_checkpoint
from taft.cli import main
from taft.cli.parser import add_dp_args, dp_config_from_args
from taft.privacy import MECHANISM, DPConfig, PrivacyLedger, describe, parallel_composition, plan_dp
from taft.privacy import ghost
from taft.privacy.dpsgd import (clip_factors, clipped_sum, manual_attention, noisy_gradient, per_example_gradients,
                                poisson_batches)
from taft.tangent.layers import TangentAttention
from taft.train import TrainConfig, fit, make_private, plan_run
from taft.losses import classification_loss
from taft.train.examples import Examples, Prepared
from taft.train.loop import train_loop

pytestmark = pytest.mark.usefixtures("isolated_cache", "one_thread")

CFG = ViTConfig(dim=16, depth=3, heads=2, mlp_hidden=32, patch_size=4, pos_grid=3)
CLASSES = ["a", "b", "c"]
TOKENS = 5


@pytest.fixture(scope="module")
def bb64():
    return random_backbone(CFG, 12, seed=0, dtype=torch.float64)


@pytest.fixture(scope="module")
def bb32():
    return random_backbone(CFG, 12, seed=0, dtype=torch.float32)


def data(n: int, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    centres = 2.0 * torch.randn(len(CLASSES), TOKENS, CFG.dim, generator=torch.Generator().manual_seed(9))
    x = (centres[labels] + 0.5 * torch.randn(n, TOKENS, CFG.dim, generator=gen)).to(dtype)
    return x, labels, [f"ex{i:03d}" for i in range(n)]


def moved(clf, scale: float = 0.05, seed: int = 1):
    """Non-zero trained tensors, so that every layer's per-example gradient is generic."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clf.tail.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return clf


# ------------------------------------------------------------------------------------- per-example gradients
@pytest.mark.parametrize("method, loss, k", [("taft", "mse", 2), ("taft", "ce", 1), ("nlft", "mse", 2),
                                             ("nlft", "ce", 1), ("probe", "mse", 1), ("probe", "ce", 1)])
def test_per_example_gradients_equal_a_loop(bb64, method, loss, k):
    clf = moved(Classifier(bb64, CLASSES, k, method=method))
    x, y, _ = data(7)
    inputs, mask = clf.train_inputs(x)
    assert mask is None
    grads, losses = per_example_gradients(clf, inputs, y, loss=loss, kappa=15.0, chunk_size=3)
    params = dict(clf.tail.named_parameters())
    assert set(grads) == set(params)
    for i in range(len(y)):  # naive: one example at a time, ordinary backward
        clf.zero_grad(set_to_none=True)
        value = classification_loss(clf.train_logits(inputs[i:i + 1]), y[i:i + 1], loss, 15.0)
        value.backward()
        assert float(losses[i]) == pytest.approx(value.item(), rel=1e-12, abs=1e-12)
        for name, p in params.items():
            assert grads[name].shape == (len(y), *p.shape)
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-10, atol=1e-12, msg=name)
    # every trainable tensor gets a non-zero gradient (the at_base trick works under torch.func.grad)
    assert all(float(g.abs().amax()) > 0 for g in grads.values())


def test_tangent_gradient_is_the_jacobian_transpose_under_vmap(bb64):
    """At Δw = 0 the taft gradient is Jᵀ r of the plain tail at w0: equal to the nlft gradient at w0."""
    x, y, _ = data(4)
    g_taft, _ = per_example_gradients(Classifier(bb64, CLASSES, 2, method="taft"), x, y)
    g_nlft, _ = per_example_gradients(Classifier(bb64, CLASSES, 2, method="nlft"), x, y)
    for name in g_nlft:
        torch.testing.assert_close(g_taft[name], g_nlft[name], rtol=1e-9, atol=1e-11, msg=name)


def test_manual_attention_is_temporary(bb64):
    clf = Classifier(bb64, CLASSES, method="taft")
    attn = [m for m in clf.modules() if isinstance(m, TangentAttention)]
    with manual_attention(clf.tail):
        assert all(m.impl == "manual" for m in attn)
    assert all(m.impl == "sdpa" for m in attn)


def test_clipped_contributions_are_bounded_and_chunking_does_not_matter(bb64):
    clf = moved(Classifier(bb64, CLASSES, 2, method="taft"), scale=0.2)
    x, y, _ = data(9)
    grads, _ = per_example_gradients(clf, x, y)
    clip = 0.5
    factor, norms = clip_factors(grads, clip)
    assert float(norms.min()) > clip  # the clipping is active here
    clipped_norms = torch.sqrt(sum((factor.view(-1, *[1] * (g.dim() - 1)) * g).flatten(1).pow(2).sum(1)
                                   for g in grads.values()))
    assert float(clipped_norms.max()) <= clip * (1 + 1e-9)
    expected = {n: torch.tensordot(factor, g, dims=1) for n, g in grads.items()}
    for chunk in (2, 9):
        total, _, got_norms = clipped_sum(clf, x, y, clip, chunk_size=chunk)
        torch.testing.assert_close(got_norms, norms, rtol=1e-10, atol=0)
        for n in expected:
            torch.testing.assert_close(total[n], expected[n], rtol=1e-10, atol=1e-12)
    # a norm smaller than C is left alone; an empty batch sums to zero
    big, _, _ = clipped_sum(clf, x, y, 1e9)
    for n, g in grads.items():
        torch.testing.assert_close(big[n], g.sum(0), rtol=1e-10, atol=1e-12)
    empty, losses, _ = clipped_sum(clf, x[:0], y[:0], clip)
    assert len(losses) == 0 and all(float(v.abs().max()) == 0 for v in empty.values())


@pytest.mark.parametrize("tokens", [5, 25])  # Gram form (5 tokens) and formed gradients (25) in ghost._outer_sq_norms
@pytest.mark.parametrize("method, loss, k, prune", [("taft", "mse", 1, True), ("taft", "ce", 2, True),
                                                    ("taft", "mse", 2, False), ("nlft", "mse", 1, True),
                                                    ("nlft", "ce", 2, False), ("probe", "mse", 1, True)])
def test_ghost_clipping_equals_clipping_formed_per_example_gradients(bb64, method, loss, k, prune, tokens):
    """Ghost clipping (the default) against the clipped sum of vmap's per-example gradients (themselves checked
    against a loop above), with C at the median norm so that some examples are clipped and some are not. Both are
    float64 sums of the same products in another order: they agree to rounding (1e-15 observed; 1e-10 allowed)."""
    clf = moved(Classifier(bb64, CLASSES, k, method=method), scale=0.2)
    clf.tail.prune_last_block = prune
    x, y, _ = data(9)
    x = x.repeat(1, tokens // TOKENS, 1)
    inputs, _ = clf.train_inputs(x)
    grads, _ = per_example_gradients(clf, inputs, y, loss=loss, chunk_size=4)
    clip = float(clip_factors(grads, 1.0)[1].median())
    expected, expected_losses, expected_norms = clipped_sum(clf, inputs, y, clip, loss=loss, chunk_size=4, via="vmap")
    total, losses, norms = clipped_sum(clf, inputs, y, clip, loss=loss, chunk_size=4)
    assert 0 < int((norms > clip).sum()) < len(y)
    torch.testing.assert_close(norms, expected_norms, rtol=1e-10, atol=0)
    torch.testing.assert_close(losses, expected_losses, rtol=1e-10, atol=1e-12)
    assert set(total) == set(expected)
    for n in expected:
        torch.testing.assert_close(total[n], expected[n], rtol=1e-10, atol=1e-12, msg=n)


def test_ghost_clipping_covers_the_tails_and_refuses_what_it_cannot_do(bb64):
    for method in ("taft", "nlft", "probe"):
        clf = Classifier(bb64, CLASSES, 2, method=method)
        module, _ = clf.trainable_module()
        layers = ghost.trained_layers(module)
        assert layers is not None
        covered = {prefix + n for prefix, layer in layers.items() for n, _ in layer.named_parameters(recurse=False)}
        assert covered == {n for n, _ in module.named_parameters()}
    assert ghost.trained_layers(nn.Sequential(nn.Linear(3, 3), nn.Conv1d(3, 3, 1))) is None  # → vmap
    twice = nn.Linear(3, 3)
    layers = ghost.trained_layers(twice)
    with pytest.raises(TaftError, match="used twice on the same rows"):
        ghost.clipped_sum_chunk(lambda h: twice(twice(h)).sum(-1, keepdim=True), layers, (torch.randn(2, 3),),
                                torch.zeros(2, 1), lambda z, t: (z - t).pow(2).sum(-1), 1.0,
                                dict(twice.named_parameters()))
    clf = Classifier(bb64, CLASSES, method="probe")
    x, y, _ = data(3)
    with pytest.raises(TaftError, match="via must be one of"):
        clipped_sum(clf, clf.train_inputs(x)[0], y, 1.0, via="loop")


def test_noise_has_the_planned_scale(bb32):
    clf = Classifier(bb32, CLASSES, method="probe")
    x, y, _ = data(0, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    g, _ = noisy_gradient(clf, clf.train_inputs(x)[0], y, clip=2.0, noise_multiplier=3.0, expected_batch_size=4,
                          generator=gen)
    flat = torch.cat([v.flatten() for v in g.values()])  # empty batch: pure noise N(0, (σC/B)²)
    assert float(flat.std()) == pytest.approx(3.0 * 2.0 / 4, rel=0.1)


def test_poisson_batches_are_seeded_and_have_rate_q():
    draws = list(poisson_batches(1000, 0.05, 200, torch.Generator().manual_seed(3)))
    again = list(poisson_batches(1000, 0.05, 200, torch.Generator().manual_seed(3)))
    assert all(torch.equal(a, b) for a, b in zip(draws, again))
    sizes = torch.tensor([len(b) for b in draws], dtype=torch.float64)
    assert float(sizes.mean()) == pytest.approx(50, rel=0.05)
    assert float(sizes.std()) == pytest.approx(math.sqrt(1000 * 0.05 * 0.95), rel=0.2)  # variable batch size
    assert all(len(torch.unique(b)) == len(b) for b in draws)


# ---------------------------------------------------------------------------- σ = 0, C = ∞: ordinary training
@pytest.mark.parametrize("method, reg, loss", [("taft", 0.0, "mse"), ("taft", 0.05, "ce"), ("nlft", 0.0, "mse"),
                                               ("probe", 0.0, "mse")])
def test_no_noise_and_no_clipping_is_ordinary_training(bb64, method, reg, loss):
    n, batch, epochs = 12, 4, 2
    x, y, ids = data(n)
    cfg = TrainConfig(lr=1e-2, batch_size=batch, epochs=epochs, seed=5, reg=reg, loss=loss,
                      schedule="cosine").resolved(method)
    ref = Classifier(bb64, CLASSES, 1, method=method)
    ex = Examples((x, y, ids))
    train_loop(ref, plan_run(ref, cfg, n), Prepared(ref, ex), progress=False)
    gen = torch.Generator().manual_seed(cfg.seed)  # the non-private loop's batch schedule
    batches = [b for _ in range(epochs) for b in torch.randperm(n, generator=gen).split(batch)]

    dp = DPConfig(noise_multiplier=0.0, clip=math.inf, delta=1e-3, chunk_size=4, expected_batch_size=batch)
    clf = Classifier(bb64, CLASSES, 1, method=method)
    plan = plan_run(clf, cfg, n, dp)
    assert plan.private and plan.config == cfg  # the same recipe as the ordinary run
    assert plan.steps == plan.dp.steps == len(batches) and plan.dp.epsilon is None
    history = train_loop(clf, plan, Prepared(clf, ex), progress=False, batches=batches)
    ledger = plan.ledger()
    assert not ledger.private and len(history) == epochs
    start = Classifier(bb64, CLASSES, 1, method=method).trainable_state_dict()
    for (name, p), q in zip(clf.tail.named_parameters(), ref.tail.parameters()):
        assert not torch.equal(p.detach(), start[name]), name  # training moved it
        if name.endswith("attn.qkv.bias"):
            # The key bias has zero true gradient (softmax ignores a constant per query row): its gradient is
            # rounding noise (~1e-17), which Adam turns into arbitrary small steps in both paths. Compare the rest.
            keep = torch.ones_like(p, dtype=torch.bool)
            keep[CFG.dim:2 * CFG.dim] = False
            p, q = p[keep], q[keep]
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)


def test_dp_training_is_reproducible_with_a_seed_and_moves_with_noise(bb32):
    x, y, ids = data(24, dtype=torch.float32)
    cfg = TrainConfig(lr=1e-2, batch_size=12, epochs=1).resolved("taft")
    ex = Examples((x, y, ids))

    def run(seed):
        dp = DPConfig(noise_multiplier=1.0, clip=1.0, delta=1e-3, seed=seed, expected_batch_size=12)
        clf = Classifier(bb32, CLASSES, method="taft")
        plan = plan_run(clf, cfg, 24, dp)
        assert plan.dp == plan_dp(dp, 24, 1, 12)
        hist = train_loop(clf, plan, Prepared(clf, ex), progress=False)
        return clf.trainable_state_dict(), hist, plan.ledger()

    a, hist, ledger = run(7)
    b, _, _ = run(7)
    c, _, _ = run(8)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    assert ledger.seeded and ledger.private and ledger.steps == 2 and ledger.sample_rate == 0.5
    assert hist[0]["mean_batch_size"] >= 0 and {"train_loss", "val_top1", "lr"} <= set(hist[0])


@pytest.mark.parametrize("method", ["taft", "probe"])
def test_make_private_in_a_user_loop_equals_fit_with_dp(bb32, method):
    """A user's own loop over `make_private`'s loader and step trains bit-identically the tensors
    `fit(dp=...)` trains with the same seed (same Poisson batches, clipping, noise and optimizer), and its ledger
    is fit's."""
    n, epochs = 24, 2
    x, y, ids = data(n, dtype=torch.float32)
    cfg = TrainConfig(lr=0.05, optimizer="sgd", momentum=0.5, schedule="constant", batch_size=6, epochs=epochs)
    dp = DPConfig(noise_multiplier=1.0, clip=1.0, delta=1e-3, seed=11, expected_batch_size=6, chunk_size=4)
    with pytest.warns(UserWarning, match="optimizer steps"):
        result = fit(Classifier(bb32, CLASSES, method=method), (x, y, ids), cfg, dp=dp, progress=False)

    model = Classifier(bb32, CLASSES, method=method)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    inputs, mask = model.train_inputs(x)
    assert mask is None
    private = make_private(model, optimizer, (inputs, y), dp, cfg)
    assert private.epochs == epochs and private.plan.config == result.config
    steps = 0
    for _ in range(private.epochs):
        for xb, yb, mb in private.loader:
            private.step(xb, yb, mb)
            steps += 1
    assert steps == len(private.loader) * epochs == result.privacy["steps"]
    trained = model.trainable_state_dict()
    start = Classifier(bb32, CLASSES, method=method).trainable_state_dict()
    assert all(not torch.equal(trained[name], t) for name, t in start.items())  # training moved every tensor
    for name, t in result.classifier.trainable_state_dict().items():
        assert torch.equal(trained[name], t), name
    assert private.ledger().to_dict() == result.privacy
    other = Classifier(bb32, CLASSES, method=method)
    again = make_private(other, torch.optim.SGD(other.parameters(), lr=0.05, momentum=0.5),
                         (other.train_inputs(x)[0], y), replace(dp, seed=12), cfg)
    for _ in range(again.epochs):
        for xb, yb, mb in again.loader:
            again.step(xb, yb, mb)
    assert any(not torch.equal(other.trainable_state_dict()[k], v) for k, v in trained.items())  # another seed


def test_make_private_checks_its_input(bb32):
    model = Classifier(bb32, CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y, _ = data(10, dtype=torch.float32)
    dp, one = DPConfig(noise_multiplier=1.0, delta=1e-3), TrainConfig(epochs=1)
    with pytest.raises(TaftError, match="different numbers of rows"):
        make_private(model, opt, (x, y[:5]), dp, one)
    with pytest.raises(TaftError, match="data must be a tuple"):
        make_private(model, opt, x, dp, one)
    with pytest.raises(TaftError, match="delta"):
        make_private(model, opt, (x, y), replace(dp, delta=0.5), one)
    with pytest.raises(TaftError, match="exactly one"):
        make_private(model, opt, (x, y), DPConfig(delta=1e-3), one)
    with pytest.raises(TaftError, match="head_init='probe'"):  # a probe fitted on the private data without noise
        make_private(model.derive(head_init="probe"), opt, (x, y), dp, one)


# ---------------------------------------------------------------------------------- fit, checkpoint, refusals
def test_fit_with_dp_writes_the_ledger_into_the_checkpoint(bb32, tmp_path, capsys):
    x, y, ids = data(30, dtype=torch.float32)
    xv, yv, idv = data(9, seed=1, dtype=torch.float32)
    cfg = TrainConfig(lr=1e-2, batch_size=10, epochs=2)
    dp = DPConfig(epsilon=8.0, delta=1e-3, clip=1.0, accountant="rdp")
    res = fit(Classifier(bb32, CLASSES, method="taft"), (x, y, ids), cfg, val=(xv, yv, idv), run_dir=tmp_path / "run",
              progress=False, dp=dp)
    led = PrivacyLedger.from_dict(res.privacy)
    assert led.mechanism == MECHANISM and led.n == 30 and led.steps == 6 and led.sample_rate == pytest.approx(1 / 3)
    assert 0.99 * 8.0 <= led.epsilon <= 8.0 and led.target_epsilon == 8.0 and not led.seeded
    assert {"opacus", "taft"} <= set(led.libraries) and led.accountant == "rdp" and led.clip == 1.0
    meta = read_checkpoint_metadata(res.checkpoint)
    assert meta["privacy"] == res.privacy
    assert "final_train_loss" not in meta["metrics"] and meta["metrics"]["eval_split"] == "val"
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["privacy"]["epsilon"] == led.epsilon and saved["steps"] == 6
    loaded, _ = load_checkpoint(res.checkpoint, bb32)
    for n, t in res.classifier.trainable_state_dict().items():
        torch.testing.assert_close(loaded.trainable_state_dict()[n], t)
    assert main(["info", str(res.checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "privacy      (ε=" in out and "DP-SGD (Poisson, Gaussian)" in out and "rdp accountant" in out

    # without validation data, no statistic of the private training data goes into the checkpoint
    res2 = fit(Classifier(bb32, CLASSES, method="taft"), (x, y, ids), replace(cfg, epochs=1),
               run_dir=tmp_path / "run2", progress=False, dp=replace(dp, epsilon=None, noise_multiplier=2.0))
    assert read_checkpoint_metadata(res2.checkpoint)["metrics"] is None
    assert res2.privacy["epsilon"] > 0 and res2.privacy["target_epsilon"] is None


def test_fit_refuses_what_breaks_the_guarantee(bb32, tmp_path):
    x, y, ids = data(30, dtype=torch.float32)
    dp = DPConfig(noise_multiplier=1.0, delta=1e-3)
    with pytest.raises(TaftError, match="head_init='probe'"):
        fit(Classifier(bb32, CLASSES, head_init="probe"), (x, y, ids), TrainConfig(batch_size=8),
            run_dir=tmp_path / "r", progress=False, dp=dp)
    with pytest.raises(TaftError, match="not below 1/n"):
        fit(Classifier(bb32, CLASSES), (x, y, ids), TrainConfig(batch_size=8), run_dir=tmp_path / "r",
            progress=False, dp=replace(dp, delta=0.05))
    with pytest.raises(TaftError, match="exceeds the 30"):
        fit(Classifier(bb32, CLASSES), (x, y, ids), TrainConfig(batch_size=8), run_dir=tmp_path / "r",
            progress=False, dp=replace(dp, expected_batch_size=31))
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.parametrize("kw, match", [
    ({"epsilon": 0.0, "delta": 1e-5}, "epsilon must be"), ({"epsilon": -1.0, "delta": 1e-5}, "epsilon must be"),
    ({"epsilon": 1.0, "delta": 0.0}, "delta must be"), ({"epsilon": 1.0, "delta": -1e-5}, "delta must be"),
    ({"epsilon": 1.0}, "delta is required"), ({"delta": 1e-5}, "exactly one"),
    ({"epsilon": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}, "exactly one"),
    ({"noise_multiplier": 0.1, "delta": 1e-5}, "noise multiplier must be"),
    ({"noise_multiplier": 1.0, "delta": 1e-5, "clip": math.inf}, "clip=inf"),
    ({"noise_multiplier": 1.0, "delta": 1e-5, "clip": 0.0}, "clip must be"),
    ({"noise_multiplier": 1.0, "delta": 1e-5, "accountant": "gdp"}, "accountant must be"),
    ({"noise_multiplier": 1.0, "delta": 1e-5, "chunk_size": 0}, "chunk_size"),
])
def test_bad_dp_configs_are_named(kw, match):
    with pytest.raises(TaftError, match=match):
        DPConfig(**kw)


def test_plan_refuses_impossible_budgets():
    with pytest.raises(TaftError, match="not below 1/n"):
        plan_dp(DPConfig(epsilon=1.0, delta=1e-3, expected_batch_size=10), n=1000, epochs=1, batch_size=10)
    with pytest.raises(TaftError, match="exceeds"):
        plan_dp(DPConfig(epsilon=1.0, delta=1e-5, expected_batch_size=200), n=100, epochs=1, batch_size=200)
    with pytest.raises(TaftError, match="unreachable"):  # RDP cannot certify ε this small at any σ in range
        plan_dp(DPConfig(epsilon=0.01, delta=1e-6, accountant="rdp", expected_batch_size=100), n=1000, epochs=1, batch_size=100)
    with pytest.raises(TaftError, match="least noise"):  # so large that even σ = 0.3 spends less
        plan_dp(DPConfig(epsilon=500.0, delta=1e-6, accountant="rdp", expected_batch_size=100), n=1000, epochs=1, batch_size=100)
    plan = plan_dp(DPConfig(noise_multiplier=1.0, delta=1e-6, accountant="rdp", expected_batch_size=30), n=1000, epochs=3, batch_size=30)
    assert plan.steps == 3 * 34 and plan.sample_rate == 0.03 and 0 < plan.epsilon < 10


# ----------------------------------------------------------------------------------------------------- ledgers
def ledger(eps, delta=1e-5, n=100, **kw):
    return PrivacyLedger(epsilon=eps, delta=delta, n=n, noise_multiplier=1.0, sample_rate=0.1, steps=50, clip=1.0,
                         accountant="prv", expected_batch_size=10, libraries={"opacus": "1.6.0"}, **kw)


def test_parallel_composition_takes_the_max():
    parts = [ledger(1.0, 1e-6, 100), ledger(2.5, 1e-5, 200).to_dict(), ledger(0.5, 1e-7, 50)]
    whole = parallel_composition(parts)
    assert whole.epsilon == 2.5 and whole.delta == 1e-5 and whole.n == 350 and len(whole.components) == 3
    assert whole.private and "3 shards" in whole.summary()
    assert PrivacyLedger.from_dict(json.loads(json.dumps(whole.to_dict()))) == whole
    assert parallel_composition([whole]).epsilon == 2.5  # a composed store composes again
    assert not parallel_composition([ledger(1.0), ledger(None)]).private
    with pytest.raises(TaftError, match="both hold"):
        parallel_composition(parts[:2], shard_ids=[["a", "b"], ["b", "c"]])
    assert parallel_composition(parts[:2], shard_ids=[["a", "b"], ["c"]]).epsilon == 2.5
    with pytest.raises(TaftError, match="at least one"):
        parallel_composition([])
    with pytest.raises(TaftError, match="lacks"):
        parallel_composition([{"epsilon": 1.0}])


def test_ledger_json_round_trip_and_summary():
    led = ledger(2.0, target_epsilon=2.0)
    d = json.loads(json.dumps(led.to_dict(), allow_nan=False))
    assert PrivacyLedger.from_dict(d) == led
    text = describe(d)
    assert text.startswith("(ε=2, δ=1e-05)-DP") and "σ=1" in text and "opacus 1.6.0" in text
    off = PrivacyLedger(epsilon=math.inf, delta=1e-5, n=3, clip=math.inf, noise_multiplier=0.0, sample_rate=0.5,
                        steps=2, accountant="prv")
    d = json.loads(json.dumps(off.to_dict(), allow_nan=False))
    assert d["epsilon"] is None and PrivacyLedger.from_dict(d).clip == math.inf
    assert describe(d).startswith("not private")


# --------------------------------------------------------------------------------------------------------- CLI
def parse(argv):
    p = argparse.ArgumentParser()
    add_dp_args(p)
    return dp_config_from_args(p.parse_args(argv))


def test_cli_options():
    assert parse([]) is None
    dp = parse(["--dp", "--epsilon", "3", "--delta", "1e-5", "--clip", "0.5", "--accountant", "rdp",
                "--expected-batch-size", "64", "--dp-chunk-size", "8"])
    assert dp == DPConfig(epsilon=3.0, delta=1e-5, clip=0.5, accountant="rdp", expected_batch_size=64, chunk_size=8)
    assert parse(["--dp", "--noise-multiplier", "1.2", "--delta", "1e-6"]).noise_multiplier == 1.2
    with pytest.raises(TaftError, match="add --dp"):
        parse(["--epsilon", "3"])
    with pytest.raises(TaftError, match="exactly one"):
        parse(["--dp", "--delta", "1e-5"])


def test_cli_train_dp_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--dp", "--epsilon", "3", "--delta", "1e-5", "--head-init",
                 "probe", "--quiet"]) == 2
    assert "not allowed with --dp" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "--epsilon", "3", "--quiet"]) == 2
    assert "add --dp" in capsys.readouterr().err


def test_cli_train_with_dp_end_to_end(tmp_path, capsys):
    from helpers import make_classes

    data = make_classes(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--val-fraction", "0.34", "--image-size", "28",
                 "--epochs", "1", "--lr", "1e-3", "--quiet", "--dp", "--epsilon", "8", "--delta", "1e-2",
                 "--clip", "0.5", "--expected-batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "privacy: (ε=" in printed and "target ε=8" in printed
    meta = read_checkpoint_metadata(out / "checkpoint.safetensors")
    led = meta["privacy"]
    assert led["mechanism"] == MECHANISM and led["clip"] == 0.5 and led["accountant"] == "prv"
    assert 0.99 * 8 <= led["epsilon"] <= 8 and led["n"] == 8 and led["steps"] == 2
    assert main(["info", str(out / "checkpoint.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["privacy"] == led
