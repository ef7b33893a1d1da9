"""Correctness of the tangent tail on post-norm BERT encoders with padded text (float64 throughout).

The same suite as the ViT's (tests/test_tangent.py, whose tolerance argument applies: 1e-9 absolute on logits of
order 1): torch.func.jvp of the plain tail with written-out attention, Δw = 0 parity with the plain model, t² decay
of the first-order error, linearity in Δw, vjp gradients; plus padded-token invariance (nothing at a padded
position can change any output) and the real MiniLM weights.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reference import random_text_backbone, randomize_delta, reference_linearized, reference_vjp
from taft.backbones.base import TokenBatch
from taft.backbones.bert import BertConfig
from taft.model import TangentModel
from taft.tangent import TangentPostNormBlock

TOL = 1e-9
SMALL = BertConfig(dim=32, depth=3, heads=4, mlp_hidden=64, vocab_size=50, max_positions=16, ln_eps=1e-12)


def make_model(cfg: BertConfig = SMALL, k: int = 2, classes: int = 4, pooling: str = "mean",
               attn_impl: str = "sdpa", seed: int = 0) -> TangentModel:
    return TangentModel(random_text_backbone(cfg, seed), classes, tangent_blocks=k, pooling=pooling,
                        attn_impl=attn_impl).double()


def token_batch(lengths: list[int], width: int | None = None, vocab: int = 50, seed: int = 0,
                pad_id: int = 0) -> TokenBatch:
    """Random ids (≥ 1) with the given real lengths, right-padded with `pad_id` to `width`."""
    gen = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=gen)
    mask = torch.arange(width) < torch.tensor(lengths)[:, None]
    return TokenBatch(ids.masked_fill(~mask, pad_id), mask)


def test_tail_blocks_are_post_norm_and_there_is_no_final_norm():
    model = make_model(k=2)
    assert all(isinstance(b, TangentPostNormBlock) for b in model.tail.blocks.values())
    assert model.tail.norm is None
    assert sorted(n for n in model.delta_state_dict() if n.startswith("blocks.1.")) == [
        f"blocks.1.{m}.{p}" for m in ("attn.proj", "attn.qkv", "mlp.fc1", "mlp.fc2", "norm1", "norm2")
        for p in ("bias", "weight")]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("attn_impl", ["sdpa", "manual"])
def test_tail_equals_jvp_reference_with_padding(k, pooling, attn_impl):
    model = make_model(k=k, pooling=pooling, attn_impl=attn_impl)
    randomize_delta(model, 0.05)
    batch = token_batch([5, 9, 2, 7])
    h = model.trunk_features(batch)
    f0, jd = reference_linearized(model, h, batch.mask)
    with torch.no_grad():
        ours = model.tail(h, batch.mask)
    assert jd.abs().max() > 1e-2  # the tangent is not trivially zero
    torch.testing.assert_close(ours, f0 + jd, rtol=0, atol=TOL)


def test_zero_delta_gives_pretrained_output():
    model = make_model(k=2)
    batch = token_batch([4, 8, 3])
    with torch.no_grad():
        torch.testing.assert_close(model(batch), model.materialize()(batch), rtol=0, atol=1e-12)


def test_first_order_error_shrinks_as_t_squared():
    """|f(w0 + tΔ) - f_lin(tΔ)| = O(t²): halving t divides the error by ~4 (same check as for the ViT)."""
    model = make_model(k=3)
    randomize_delta(model, 1.0)
    delta = model.delta_state_dict()
    batch = token_batch([6, 3, 9])
    errors = []
    for t in [1e-2, 5e-3, 2.5e-3, 1.25e-3]:
        model.load_delta_state_dict({n: t * d for n, d in delta.items()}, model.fingerprint)
        with torch.no_grad():
            errors.append((model.materialize()(batch) - model(batch)).abs().max().item())
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(3.6 < r < 4.4 for r in ratios), (errors, ratios)


def test_linearity_in_delta():
    model = make_model(k=2)
    batch = token_batch([5, 2, 8])
    randomize_delta(model, 0.1, seed=1)
    d1 = model.delta_state_dict()
    randomize_delta(model, 0.1, seed=2)
    d2 = model.delta_state_dict()
    a = 0.3
    outs = []
    with torch.no_grad():
        for d in (d1, d2, {n: a * d1[n] + (1 - a) * d2[n] for n in d1}):
            model.load_delta_state_dict(d, model.fingerprint)
            outs.append(model(batch))
    torch.testing.assert_close(outs[2], a * outs[0] + (1 - a) * outs[1], rtol=0, atol=TOL)


def test_gradient_equals_vjp_reference():
    model = make_model(k=2, pooling="cls")
    batch = token_batch([3, 7, 5])
    h = model.trunk_features(batch)
    cot = torch.randn(3, 4, dtype=torch.float64)
    (model.tail(h, batch.mask) * cot).sum().backward()
    ref = reference_vjp(model, h, cot, batch.mask)
    for name, p in model.tail.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=0, atol=TOL, msg=name)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padded_tokens_change_nothing(pooling):
    """Other ids at padded positions, or more padding, leave every logit (primal and tangent) unchanged."""
    model = make_model(k=2, pooling=pooling)
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
    model = make_model(k=2)
    batch = token_batch([3, 6], width=6)
    h = model.trunk_features(batch)
    with torch.no_grad():
        assert (model.tail(h, batch.mask) - model.tail(h)).abs().max() > 1e-3


@settings(max_examples=15, deadline=None)
@given(heads=st.sampled_from([1, 2, 4]), head_dim=st.sampled_from([4, 8]), depth=st.integers(1, 3),
       k_from_end=st.integers(0, 2), lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       pooling=st.sampled_from(["cls", "mean"]), gelu=st.sampled_from(["exact", "tanh"]), seed=st.integers(0, 99))
def test_property_matches_jvp(heads, head_dim, depth, k_from_end, lengths, pooling, gelu, seed):
    cfg = BertConfig(dim=heads * head_dim, depth=depth, heads=heads, mlp_hidden=2 * heads * head_dim,
                     vocab_size=50, max_positions=12, gelu=gelu)
    k = max(1, depth - k_from_end)
    model = make_model(cfg, k=k, pooling=pooling, seed=seed)
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
