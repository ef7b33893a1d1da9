"""Correctness of the tangent tail against independent references (float64 throughout), for the pre-norm ViT
(images) and the post-norm BERT encoder (padded text): torch.func.jvp of the plain tail with written-out attention,
Δw = 0 parity with the plain model, t² decay of the first-order error, linearity in Δw, vjp gradients; for text
also padded-token invariance (nothing at a padded position can change any output); and the real DINOv2 and MiniLM
weights.

Tolerances: the tangent tail and `torch.func.jvp` evaluate the same derivative with different operation orders, so
in float64 they agree to ~1e-13 relative; we allow 1e-9 (absolute, on logits of order 1), far above rounding noise
and far below any real error (a wrong term changes logits by > 1e-3).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import (random_backbone, random_text_backbone, randomize_delta, reference_linearized,
                       reference_vjp)
from taft.backbones.base import TokenBatch
from taft.backbones.bert import BertConfig
from taft.backbones.vit import ViTConfig
from taft.model import TangentModel
from taft.tangent import TangentPostNormBlock
from taft.tangent.layers import NormTangent, TangentLayerNorm, TangentLinear, first_token

TOL = 1e-9
SMALL = ViTConfig(dim=32, depth=3, heads=4, mlp_hidden=64, patch_size=4, in_chans=3, pos_grid=3, layerscale=True,
                  ln_eps=1e-6, gelu="exact")
SMALL_TEXT = BertConfig(dim=32, depth=3, heads=4, mlp_hidden=64, vocab_size=50, max_positions=16, ln_eps=1e-12)
KINDS = ["image", "text"]
LENGTHS = [5, 9, 2, 7]  # the real lengths of a text batch's examples


def make_model(cfg: ViTConfig = SMALL, k: int = 2, classes: int = 5, image: int = 12, pooling: str = "cls",
               attn_impl: str = "sdpa") -> TangentModel:
    model = TangentModel(random_backbone(cfg, image), classes, tangent_blocks=k, pooling=pooling,
                         attn_impl=attn_impl)
    return model.double()


def make_text_model(cfg: BertConfig = SMALL_TEXT, k: int = 2, classes: int = 4, pooling: str = "mean",
                    attn_impl: str = "sdpa", seed: int = 0) -> TangentModel:
    return TangentModel(random_text_backbone(cfg, seed), classes, tangent_blocks=k, pooling=pooling,
                        attn_impl=attn_impl).double()


def model_of(kind: str, **kwargs) -> TangentModel:
    return make_model(**kwargs) if kind == "image" else make_text_model(**kwargs)


def token_batch(lengths: list[int], width: int | None = None, vocab: int = 50, seed: int = 0,
                pad_id: int = 0) -> TokenBatch:
    """Random ids (≥ 1) with the given real lengths, right-padded with `pad_id` to `width`."""
    gen = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=gen)
    mask = torch.arange(width) < torch.tensor(lengths)[:, None]
    return TokenBatch(ids.masked_fill(~mask, pad_id), mask)


def inputs(kind: str, batch: int = 3, seed: int = 0) -> torch.Tensor | TokenBatch:
    """`batch` random 12 px images (float64), or `batch` random padded texts of lengths from LENGTHS."""
    if kind == "text":
        return token_batch(LENGTHS[:batch], seed=seed)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 12, 12, generator=gen, dtype=torch.float64)


def features_for(model: TangentModel, batch: int = 3, image: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return model.trunk_features(torch.randn(batch, 3, image, image, generator=gen, dtype=torch.float64))


def mask_of(x: torch.Tensor | TokenBatch) -> torch.Tensor | None:
    return x.mask if isinstance(x, TokenBatch) else None


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
@pytest.mark.parametrize("kind, pooling", [("image", "cls"), ("text", "cls"), ("text", "mean")])
def test_tail_equals_jvp_reference(kind, pooling, k, attn_impl):
    model = model_of(kind, k=k, pooling=pooling, attn_impl=attn_impl)
    randomize_delta(model, 0.05)
    x = inputs(kind, batch=4 if kind == "text" else 3)
    h = model.trunk_features(x)
    f0, jd = reference_linearized(model, h, mask_of(x))
    with torch.no_grad():
        ours = model.tail(h, mask_of(x))
    assert jd.abs().max() > 1e-2  # the tangent is not trivially zero
    torch.testing.assert_close(ours, f0 + jd, rtol=0, atol=TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_zero_delta_gives_pretrained_output(kind):
    model = model_of(kind, k=2)
    x = inputs(kind, batch=2 if kind == "image" else 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.materialize()(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_first_order_error_shrinks_as_t_squared(kind):
    """|f(w0 + tΔ) - f_lin(tΔ)| = O(t²): halving t divides the error by ~4."""
    model = model_of(kind, k=3)
    randomize_delta(model, 1.0)
    delta = model.trainable_state_dict()
    x = inputs(kind, batch=3)
    errors = []
    for t in [1e-2, 5e-3, 2.5e-3, 1.25e-3]:
        model.load_delta_state_dict({n: t * d for n, d in delta.items()}, fingerprint=model.fingerprint)
        with torch.no_grad():
            errors.append((model.materialize()(x) - model(x)).abs().max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(3.6 < r < 4.4 for r in ratios), (errors, ratios)


@pytest.mark.parametrize("kind", KINDS)
def test_linearity_in_delta(kind):
    model = model_of(kind, k=2)
    x = inputs(kind, batch=3)
    h = model.trunk_features(x)
    randomize_delta(model, 0.1, seed=1)
    d1 = model.trainable_state_dict()
    randomize_delta(model, 0.1, seed=2)
    d2 = model.trainable_state_dict()
    a = 0.3
    outs = []
    with torch.no_grad():
        for d in (d1, d2, {n: a * d1[n] + (1 - a) * d2[n] for n in d1}):
            model.load_delta_state_dict(d, fingerprint=model.fingerprint)
            outs.append(model.tail(h, mask_of(x)))
    torch.testing.assert_close(outs[2], a * outs[0] + (1 - a) * outs[1], rtol=0, atol=TOL)


@pytest.mark.parametrize("kind, k", [("image", 1), ("image", 3), ("text", 2)])
def test_gradient_equals_vjp_reference(kind, k):
    """∂/∂Δw of <c, f_lin(h; Δw)> is Jᵀc, independent of Δw."""
    model = model_of(kind, k=k, pooling="cls")
    randomize_delta(model, 0.05)
    x = inputs(kind, batch=3)
    h = model.trunk_features(x)
    c = torch.randn(h.shape[0], model.num_classes, dtype=torch.float64)
    model.zero_grad()
    (model.tail(h, mask_of(x)) * c).sum().backward()
    expected = reference_vjp(model, h, c, mask_of(x))
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
def test_image_property_matches_jvp(heads, head_dim, depth, k_from_end, grid, batch, masked, pooling, gelu,
                                    layerscale, seed):
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


def test_tail_blocks_are_post_norm_and_there_is_no_final_norm():
    model = make_text_model(k=2)
    assert all(isinstance(b, TangentPostNormBlock) for b in model.tail.blocks.values())
    assert model.tail.norm is None
    assert sorted(n for n in model.trainable_state_dict() if n.startswith("blocks.1.")) == [
        f"blocks.1.{m}.{p}" for m in ("attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2", "norm1", "norm2")
        for p in ("bias", "weight")]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padded_tokens_change_nothing(pooling):
    """Other ids at padded positions, or more padding, leave every logit (primal and tangent) unchanged."""
    model = make_text_model(k=2, pooling=pooling)
    randomize_delta(model, 0.1)
    short = token_batch([4, 6, 2], width=6, seed=3)
    other_pad = TokenBatch(short.ids.masked_fill(~short.mask, 17), short.mask)
    wider = TokenBatch(torch.cat([short.ids, torch.full((3, 5), 9)], 1),
                       torch.cat([short.mask, torch.zeros(3, 5, dtype=torch.bool)], 1))
    with torch.no_grad():
        ref = model(short)
        torch.testing.assert_close(model(other_pad), ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(model(wider), ref, rtol=0, atol=1e-12)
        alone = torch.cat([model(TokenBatch(short.ids[i:i + 1, :n], short.mask[i:i + 1, :n]))
                           for i, n in enumerate([4, 6, 2])])
        torch.testing.assert_close(alone, ref, rtol=0, atol=1e-12)


def test_without_the_mask_padding_would_matter():
    """The invariance above is not vacuous: ignoring the mask changes the logits."""
    model = make_text_model(k=2)
    batch = token_batch([3, 6], width=6)
    h = model.trunk_features(batch)
    with torch.no_grad():
        assert (model.tail(h, batch.mask) - model.tail(h)).abs().max() > 1e-3


@settings(max_examples=15, deadline=None)
@given(heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([4, 8]), depth=st.integers(1, 3),
       k_from_end=st.integers(0, 2), lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       pooling=st.sampled_from(["cls", "mean"]), gelu=st.sampled_from(["exact", "tanh"]), seed=st.integers(0, 99))
def test_text_property_matches_jvp(heads, head_dim, depth, k_from_end, lengths, pooling, gelu, seed):
    cfg = BertConfig(dim=heads * head_dim, depth=depth, heads=heads, mlp_hidden=2 * heads * head_dim,
                     vocab_size=50, max_positions=12, gelu=gelu)
    k = max(1, depth - k_from_end)
    model = make_text_model(cfg, k=k, pooling=pooling, seed=seed)
    randomize_delta(model, 0.05, seed=seed + 1)
    batch = token_batch(lengths, seed=seed)
    h = model.trunk_features(batch)
    f0, jd = reference_linearized(model, h, batch.mask)
    with torch.no_grad():
        torch.testing.assert_close(model.tail(h, batch.mask), f0 + jd, rtol=0, atol=TOL)


def test_minilm_tail_matches_jvp_reference(minilm):
    """The real MiniLM weights (float64), k = 2, real tokenized sentences of different lengths."""
    model = TangentModel(minilm, 2, tangent_blocks=2, pooling="mean").double()
    randomize_delta(model, 0.02)
    batch = minilm.tokenizer.batch(["a gripping, beautifully shot film", "dull.", "not as funny as it thinks"])
    h = model.trunk_features(batch)
    f0, jd = reference_linearized(model, h, batch.mask)
    with torch.no_grad():
        ours = model.tail(h, batch.mask)
    assert jd.abs().max() > 1e-2
    torch.testing.assert_close(ours, f0 + jd, rtol=0, atol=TOL)


def test_an_unexpanded_norm_tangent_through_a_linear_equals_the_expanded_one():
    """The first block's fold: a linear layer reading a layer norm's output (no input tangent) gives, in one GEMM,
    the tangent W0 ṅ + ΔW y + Δb of the two-GEMM path, for all rows and for a row slice, and for token 0 alone."""
    gen = torch.Generator().manual_seed(0)
    def randomized(module: torch.nn.Module) -> torch.nn.Module:
        with torch.no_grad():
            for p in module.parameters():  # the base weights w0, then (for a tangent layer) Δw
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        return module

    tnorm = randomized(TangentLayerNorm(randomized(torch.nn.LayerNorm(8).double())))
    tlin = randomized(TangentLinear(randomized(torch.nn.Linear(8, 12).double())))
    x = torch.randn(3, 5, 8, generator=gen, dtype=torch.float64)
    y, lazy = tnorm(x, None, lazy=True)
    y_full, expanded = tnorm(x, None)
    assert isinstance(lazy, NormTangent) and isinstance(expanded, torch.Tensor)
    torch.testing.assert_close(y, y_full, rtol=0, atol=0)
    for rows in (slice(None), slice(4, None)):
        for inputs, tangent in ((y, lazy), (y[:, :1], first_token(lazy))):
            _, folded = tlin(inputs, tangent, rows=rows)
            _, reference = tlin(inputs, expanded if inputs is y else expanded[:, :1], rows=rows)
            torch.testing.assert_close(folded, reference, rtol=1e-12, atol=1e-12)
