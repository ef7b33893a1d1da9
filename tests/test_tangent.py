"""Correctness of the tangent tail against independent references (float64 throughout).

Tolerances: the tangent tail and `torch.func.jvp` evaluate the same derivative with different operation orders, so
in float64 they agree to ~1e-13 relative; we allow 1e-9 (absolute, on logits of order 1), far above rounding noise
and far below any real error (a wrong term changes logits by > 1e-3).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import random_backbone, randomize_delta, reference_linearized, reference_vjp
from taft.backbones.vit import ViTConfig
from taft.model import TangentModel

TOL = 1e-9
SMALL = ViTConfig(dim=32, depth=3, heads=4, mlp_hidden=64, patch_size=4, in_chans=3, pos_grid=3, layerscale=True,
                  ln_eps=1e-6, gelu="exact")


def make_model(cfg: ViTConfig = SMALL, k: int = 2, classes: int = 5, image: int = 12, pooling: str = "cls",
               attn_impl: str = "sdpa") -> TangentModel:
    model = TangentModel(random_backbone(cfg, image), classes, tangent_blocks=k, pooling=pooling,
                         attn_impl=attn_impl)
    return model.double()


def features_for(model: TangentModel, batch: int = 3, image: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return model.trunk_features(torch.randn(batch, 3, image, image, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_tail_equals_jvp_reference(k, attn_impl):
    model = make_model(k=k, attn_impl=attn_impl)
    randomize_delta(model, 0.05)
    h = features_for(model)
    f0, jd = reference_linearized(model, h)
    with torch.no_grad():
        ours = model.tail(h)
    assert jd.abs().max() > 1e-2  # the tangent is not trivially zero
    torch.testing.assert_close(ours, f0 + jd, rtol=0, atol=TOL)


def test_zero_delta_gives_pretrained_output():
    model = make_model(k=2)
    images = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model.materialize()(images), rtol=0, atol=1e-12)


def test_first_order_error_shrinks_as_t_squared():
    """|f(w0 + tΔ) - f_lin(tΔ)| = O(t²): halving t divides the error by ~4."""
    model = make_model(k=3)
    randomize_delta(model, 1.0)
    delta = model.delta_state_dict()
    images = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    errors = []
    for t in [1e-2, 5e-3, 2.5e-3, 1.25e-3]:
        model.load_delta_state_dict({n: t * d for n, d in delta.items()}, model.fingerprint)
        with torch.no_grad():
            errors.append((model.materialize()(images) - model(images)).abs().max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(3.6 < r < 4.4 for r in ratios), (errors, ratios)


def test_linearity_in_delta():
    model = make_model(k=2)
    h = features_for(model)
    randomize_delta(model, 0.1, seed=1)
    d1 = model.delta_state_dict()
    randomize_delta(model, 0.1, seed=2)
    d2 = model.delta_state_dict()
    a = 0.3
    outs = []
    with torch.no_grad():
        for d in (d1, d2, {n: a * d1[n] + (1 - a) * d2[n] for n in d1}):
            model.load_delta_state_dict(d, model.fingerprint)
            outs.append(model.tail(h))
    torch.testing.assert_close(outs[2], a * outs[0] + (1 - a) * outs[1], rtol=0, atol=TOL)


@pytest.mark.parametrize("k", [1, 3])
def test_gradient_equals_vjp_reference(k):
    """∂/∂Δw of <c, f_lin(h; Δw)> is Jᵀc, independent of Δw."""
    model = make_model(k=k)
    randomize_delta(model, 0.05)
    h = features_for(model)
    c = torch.randn(h.shape[0], model.num_classes, dtype=torch.float64)
    model.zero_grad()
    (model.tail(h) * c).sum().backward()
    expected = reference_vjp(model, h, c)
    for name, p in model.tail.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=0, atol=TOL, msg=name)


def test_gradient_of_squared_loss_matches_autograd_through_jvp():
    """A full training loss: our gradient equals reverse-mode AD through the torch.func.jvp linearization."""
    model = make_model(k=2)
    randomize_delta(model, 0.05)
    h = features_for(model)
    target = torch.randn(h.shape[0], model.num_classes, dtype=torch.float64)
    model.zero_grad()
    ((model.tail(h) - target) ** 2).mean().backward()
    delta = {n: p.detach().clone().requires_grad_(True) for n, p in model.tail.named_parameters()}
    from reference import PlainTail, base_and_delta
    from torch.func import functional_call, jvp
    tail = PlainTail(model)
    base, _ = base_and_delta(model)
    f0, jd = jvp(lambda w: functional_call(tail, w, (h,)), (base,), (delta,))
    ((f0 + jd - target) ** 2).mean().backward()
    for name, p in model.tail.named_parameters():
        torch.testing.assert_close(p.grad, delta[name].grad, rtol=0, atol=TOL, msg=name)


def random_mask(batch: int, tokens: int, seed: int) -> torch.Tensor:
    """Key-padding mask, True = real token; token 0 (CLS) and at least one more are always real."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, tokens + 1, (batch,), generator=gen)
    return torch.arange(tokens)[None, :] < lengths[:, None]


@settings(max_examples=25, deadline=None)
@given(heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([4, 8]), depth=st.integers(1, 3),
       k_from_end=st.integers(0, 2), grid=st.integers(1, 3), batch=st.integers(1, 3), masked=st.booleans(),
       pooling=st.sampled_from(["cls", "mean"]), gelu=st.sampled_from(["exact", "tanh"]),
       layerscale=st.booleans(), seed=st.integers(0, 10_000))
def test_property_matches_jvp(heads, head_dim, depth, k_from_end, grid, batch, masked, pooling, gelu, layerscale,
                              seed):
    cfg = ViTConfig(dim=heads * head_dim, depth=depth, heads=heads, mlp_hidden=2 * heads * head_dim, patch_size=2,
                    in_chans=3, pos_grid=2, layerscale=layerscale, ln_eps=1e-6, gelu=gelu)
    k = max(1, depth - k_from_end)
    model = TangentModel(random_backbone(cfg, 2 * grid, seed=seed), 3, tangent_blocks=k, pooling=pooling,
                         seed=seed).double()
    randomize_delta(model, 0.05, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed)
    h = model.trunk_features(torch.randn(batch, 3, 2 * grid, 2 * grid, generator=gen, dtype=torch.float64))
    mask = random_mask(batch, h.shape[1], seed) if masked else None
    f0, jd = reference_linearized(model, h, mask)
    with torch.no_grad():
        ours = model.tail(h, mask)
    torch.testing.assert_close(ours, f0 + jd, rtol=0, atol=TOL)
    if mask is not None:  # padded tokens contribute nothing: changing them changes no output
        h2 = torch.where(mask[..., None], h, torch.randn_like(h))
        with torch.no_grad():
            torch.testing.assert_close(model.tail(h2, mask), ours, rtol=0, atol=TOL)


def test_dinov2_tail_matches_jvp_reference(dinov2_56):
    """The real pretrained ViT-S/14 at 56 px (17 tokens), k = 2, in float64."""
    model = TangentModel(dinov2_56, 10, tangent_blocks=2).double()
    randomize_delta(model, 0.01)
    h = model.trunk_features(torch.randn(2, 3, 56, 56, dtype=torch.float64))
    f0, jd = reference_linearized(model, h)
    with torch.no_grad():
        ours = model.tail(h)
    assert jd.abs().max() > 1e-3
    torch.testing.assert_close(ours, f0 + jd, rtol=0, atol=TOL)
