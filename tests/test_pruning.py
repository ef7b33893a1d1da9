"""Exact last-block pruning with CLS pooling: the pruned tail (token 0's query, attention row and everything after
it; keys and values of every token) against the same tail run in full, in float64.

Tolerance: both sides run the same float64 operations on the same numbers, except that the pruned side splits the
fused qkv GEMM into a query GEMM and a key-value GEMM and reduces over fewer tokens afterwards; that reorders
sums only, so they agree to ~1e-15 relative. We allow 1e-11 (logits and gradients are of order 1-100), far below
what dropping a real term changes (> 1e-3): computing the pruned block's keys and values from token 0 alone fails
every exactness test here.
"""

from __future__ import annotations

import copy

import pytest
import torch


from reference import random_backbone, random_text_backbone, randomize_delta
from taft.backbones.base import Backbone
from taft.backbones.bert import BertConfig
from taft.backbones.vit import ViTConfig
from taft.model import Classifier, TangentModel
from taft.privacy.dpsgd import per_example_gradients
from taft.tails import PlainTail

pytestmark = pytest.mark.usefixtures("isolated_cache", "one_thread")

TOL = 1e-11
VIT = ViTConfig(dim=32, depth=3, heads=4, mlp_hidden=64, patch_size=4, pos_grid=3, layerscale=True)
VIT_NO_LS = ViTConfig(dim=32, depth=3, heads=4, mlp_hidden=64, patch_size=4, pos_grid=3, layerscale=False,
                      gelu="tanh")
BERT = BertConfig(dim=32, depth=3, heads=4, mlp_hidden=64, vocab_size=50, max_positions=16)
BATCH, TOKENS, CLASSES = 4, 10, 5
BACKBONES = ["vit", "vit-no-layerscale", "bert"]


def backbone(kind: str) -> Backbone:
    if kind == "bert":
        return random_text_backbone(BERT, seed=3)
    return random_backbone(VIT if kind == "vit" else VIT_NO_LS, 12, seed=2)


def features_and_mask(masked: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random trunk features (B, N, D) and, if `masked`, a padding mask with real lengths 10, 7, 3, 1 (token 0
    always real)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(BATCH, TOKENS, 32, generator=gen, dtype=torch.float64)
    if not masked:
        return h, None
    lengths = torch.tensor([10, 7, 3, 1])
    return h, torch.arange(TOKENS)[None, :] < lengths[:, None]


def tangent_pair(kind: str, k: int) -> tuple[TangentModel, TangentModel]:
    """(pruned, unpruned) tangent models with the same base weights and the same non-zero Δw."""
    bb = backbone(kind)
    pruned, full = (TangentModel(bb, CLASSES, tangent_blocks=k, seed=4, prune_last_block=p).double()
                    for p in (True, False))
    randomize_delta(pruned, 0.05)
    full.load_delta_state_dict(pruned.trainable_state_dict(), fingerprint=pruned.fingerprint)
    return pruned, full


@torch.no_grad()
def primal(model: TangentModel, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """f(h; w0): the tail's logits with Δw = 0."""
    zero = copy.deepcopy(model)
    for p in zero.tail.parameters():
        p.zero_()
    return zero.tail(h, mask)


def gradients(module: torch.nn.Module, out: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    ((out - target) ** 2).mean().backward()
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def assert_same_gradients(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=TOL, msg=name)


def test_pruning_is_on_for_cls_and_off_for_mean():
    bb = backbone("vit")
    assert TangentModel(bb, CLASSES).tail.prune_last_block
    assert not TangentModel(bb, CLASSES, pooling="mean").tail.prune_last_block
    assert not TangentModel(bb, CLASSES, prune_last_block=False).tail.prune_last_block
    assert PlainTail(bb.model, 1, torch.nn.Linear(32, CLASSES)).prune_last_block
    assert not PlainTail(bb.model, 1, torch.nn.Linear(32, CLASSES), pooling="mean").prune_last_block


def test_pruned_block_outputs_token_zero_only():
    pruned, _ = tangent_pair("vit", 1)
    h, _ = features_and_mask(False)
    block = next(iter(pruned.tail.blocks.values()))
    x, x_dot = block(h, None, cls_only=True)
    assert x.shape == x_dot.shape == (BATCH, 1, 32)


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_tangent_tail_pruned_equals_unpruned(kind, k, masked):
    """Primal f(h; w0), tangent J Δw and the gradient of a squared loss with respect to Δw."""
    pruned, full = tangent_pair(kind, k)
    h, mask = features_and_mask(masked)
    primal_pruned, primal_full = primal(pruned, h, mask), primal(full, h, mask)
    torch.testing.assert_close(primal_pruned, primal_full, rtol=0, atol=TOL)
    out_pruned, out_full = pruned.tail(h, mask), full.tail(h, mask)
    tangent = out_pruned.detach() - primal_pruned
    assert tangent.abs().max() > 1e-2  # Δw moves the logits: the tangent is not trivially zero
    torch.testing.assert_close(tangent, out_full.detach() - primal_full, rtol=0, atol=TOL)
    target = torch.randn(out_full.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    g_pruned, g_full = gradients(pruned.tail, out_pruned, target), gradients(full.tail, out_full, target)
    assert all(float(g.abs().max()) > 0 for g in g_full.values())
    assert_same_gradients(g_pruned, g_full)


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_plain_tail_pruned_equals_unpruned(kind, k, masked):
    """The NLFT tail (plain blocks, fused attention): logits and gradients with respect to every tail weight."""
    encoder = backbone(kind).model
    head = torch.nn.Linear(32, CLASSES).double()
    pruned, full = (PlainTail(encoder, k, copy.deepcopy(head), prune_last_block=p) for p in (True, False))
    h, mask = features_and_mask(masked)
    out_pruned, out_full = pruned(h, mask), full(h, mask)
    torch.testing.assert_close(out_pruned, out_full, rtol=0, atol=TOL)
    target = torch.randn(out_full.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert_same_gradients(gradients(pruned, out_pruned, target), gradients(full, out_full, target))


@pytest.mark.parametrize("method", ["taft", "nlft"])
@pytest.mark.parametrize("kind", ["vit", "bert"])
def test_dp_per_example_gradients_pruned_equal_unpruned(method, kind):
    bb = backbone(kind)
    pruned = Classifier(bb, ["a", "b", "c"], 2, method=method, pooling="cls")
    assert pruned.tail.prune_last_block
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in pruned.tail.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    full = copy.deepcopy(pruned)
    full.tail.prune_last_block = False
    h, mask = features_and_mask(kind == "bert")
    labels = torch.tensor([0, 1, 2, 1])
    g_pruned, loss_pruned = per_example_gradients(pruned, h, labels, mask=mask, chunk_size=3)
    g_full, loss_full = per_example_gradients(full, h, labels, mask=mask, chunk_size=3)
    torch.testing.assert_close(loss_pruned, loss_full, rtol=0, atol=TOL)
    assert_same_gradients(g_pruned, g_full)
    assert all(float(g.abs().max()) > 0 for g in g_full.values())
