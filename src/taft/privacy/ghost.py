"""Clipped sums of per-example gradients without per-example gradients ("ghost clipping"), for a module whose every
trainable tensor belongs to a linear, layer-norm or layer-scale layer: the tails of taft, nlft and probe.

For such a layer the gradient of example i's loss depends only on the layer's input x (T tokens; T = 1 for a pooled
input) and the gradient G = ∂L_i/∂y of its output (for rows R of a fused weight, such as the pruned attention's query
and key-value parts):

    linear       ∂W[R] = Σ_t G_t x_tᵀ     ∂b[R] = Σ_t G_t
    layer norm   ∂γ = Σ_t G_t ⊙ n_t        ∂β = Σ_t G_t        (n: x normalised, no affine)
    layer scale  ∂λ = Σ_t G_t ⊙ x_t

One forward pass records x and y of every such layer (forward hooks); one backward pass gives every G
(`torch.autograd.grad` with respect to the outputs: no parameter gradient is formed). Then per example

    ‖g_i‖² = Σ over layers and tensors of ‖∂‖², where a linear weight's ‖Σ_t G_t x_tᵀ‖² = ⟨G Gᵀ, X Xᵀ⟩ (two T × T
             Gram matrices; the d_out × d_in gradient is formed instead where that is cheaper, T (d_in + d_out) >
             d_in d_out),

and the clipped sum Σ_i c_i g_i, c_i = min(1, C/‖g_i‖), is the same formulas with G scaled by c_i: one GEMM per
linear weight. Exact, not an approximation: the tests check it against per-example gradients from vmap.

For taft the tangent layers' primal runs at w0 + (Δw − sg(Δw)) (see `taft.tangent.layers`), so the recorded primal
input and output gradient are exactly those of J(x; w0)ᵀ r: the formulas hold for Δw unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from taft.backbones.vit import LayerScale
from taft.errors import TaftError
from taft.tangent.layers import TangentLayerNorm, TangentLayerScale, TangentLinear

LINEAR, NORM, SCALE = "linear", "norm", "scale"
_KINDS: tuple[tuple[tuple[type, ...], str], ...] = (
    ((nn.Linear, TangentLinear), LINEAR), ((nn.LayerNorm, TangentLayerNorm), NORM),
    ((LayerScale, TangentLayerScale), SCALE))


def layer_kind(module: nn.Module) -> str | None:
    """"linear", "norm" or "scale" for the layers whose per-example gradients this module computes; None else."""
    return next((kind for types, kind in _KINDS if isinstance(module, types)), None)


def trained_layers(module: nn.Module) -> dict[str, nn.Module] | None:
    """{name prefix: layer} of every sub-module of `module` that owns a trainable tensor, or None when one of them
    is not a supported layer (then per-example gradients must be formed: `taft.privacy.dpsgd` uses vmap)."""
    layers = {}
    for name, sub in module.named_modules():
        if any(p.requires_grad for p in sub.parameters(recurse=False)):
            if layer_kind(sub) is None:
                return None
            layers[f"{name}." if name else ""] = sub
    return layers


@dataclass
class _Use:
    """One call of a trained layer: its primal input and output (rows `rows` of the weight's outputs)."""

    prefix: str
    layer: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    rows: slice


@contextmanager
def _recording(layers: dict[str, nn.Module]) -> Iterator[list[_Use]]:
    """Record every call of `layers` made inside the block (primal input, primal output, `rows` keyword)."""
    uses: list[_Use] = []

    def hook_for(prefix: str) -> Callable:
        def hook(layer: nn.Module, args: tuple, kwargs: dict, output) -> None:
            y = output if isinstance(output, torch.Tensor) else output[0]
            uses.append(_Use(prefix, layer, args[0], y, kwargs.get("rows", slice(None))))
        return hook

    handles = [layer.register_forward_hook(hook_for(prefix), with_kwargs=True) for prefix, layer in layers.items()]
    try:
        yield uses
    finally:
        for h in handles:
            h.remove()


def _check_rows_used_once(uses: Sequence[_Use]) -> None:
    """`TaftError` when a layer is called twice on overlapping rows (its per-example gradient would need the cross
    terms between the calls, which this module does not form)."""
    taken: dict[int, set[int]] = {}
    for use in uses:
        size = use.layer.weight.shape[0] if getattr(use.layer, "weight", None) is not None else 1
        rows = set(range(*use.rows.indices(size)))
        seen = taken.setdefault(id(use.layer), set())
        if seen & rows:
            raise TaftError(f"layer {use.prefix or '(root)'} is used twice on the same rows; ghost clipping needs "
                            "each trained tensor used once (per-example gradients via vmap handle it)")
        seen |= rows


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., d) → (B, T, d) with T the product of the middle dimensions (1 for (B, d))."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _pieces(use: _Use, g: torch.Tensor) -> Iterator[tuple[str, slice, str, torch.Tensor, torch.Tensor | None]]:
    """(tensor name, rows, form, A, X) per trained tensor of one use, given the output gradient g.

    form "outer": the per-example gradient is Σ_t A_t X_tᵀ (A (B, T, d_out), X (B, T, d_in));
    form "rows": it is A (B, d) itself (biases, norm and scale weights), already summed over tokens.
    """
    layer, G = use.layer, _tokens(g)
    kind = layer_kind(layer)
    if kind == LINEAR:
        if layer.weight.requires_grad:
            yield "weight", use.rows, "outer", G, _tokens(use.x)
        if layer.bias is not None and layer.bias.requires_grad:
            yield "bias", use.rows, "rows", G.sum(1), None
        return
    x = _tokens(use.x)
    if kind == NORM:
        n = F.layer_norm(x, x.shape[-1:], eps=layer.eps)
        if layer.weight is not None and layer.weight.requires_grad:
            yield "weight", slice(None), "rows", (G * n).sum(1), None
        if layer.bias is not None and layer.bias.requires_grad:
            yield "bias", slice(None), "rows", G.sum(1), None
    else:
        yield "gamma", slice(None), "rows", (G * x).sum(1), None


def _outer_sq_norms(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """‖Σ_t a_t x_tᵀ‖² per example, by the cheaper of the Gram form ⟨A Aᵀ, X Xᵀ⟩ and the formed gradient."""
    tokens, d_out, d_in = a.shape[1], a.shape[2], x.shape[2]
    if tokens == 1:
        return a.square().sum((1, 2)) * x.square().sum((1, 2))
    if tokens * (d_in + d_out) <= d_in * d_out:
        return (a @ a.transpose(1, 2)).mul_(x @ x.transpose(1, 2)).sum((1, 2))
    return torch.linalg.vector_norm(a.transpose(1, 2) @ x, dim=(1, 2)).square()


def clipped_sum_chunk(module: nn.Module, layers: dict[str, nn.Module], args: tuple, targets: torch.Tensor,
                      example_losses: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], clip: float,
                      params: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """({name: Σ_i c_i g_i} over `params` (names in `module`), per-example losses (b,), per-example gradient norms
    ‖g_i‖ (b,)) for one chunk: `module(*args)` gives the logits, `example_losses(logits, targets)` the losses,
    `layers` is `trained_layers(module)`, c_i = min(1, C/‖g_i‖)."""
    with torch.enable_grad(), _recording(layers) as uses:
        losses = example_losses(module(*args), targets)
    _check_rows_used_once(uses)
    grads = torch.autograd.grad(losses.sum(), [u.y for u in uses], allow_unused=True)
    pieces = [(use.prefix + name, rows, form, a.detach(), None if x is None else x.detach())
              for use, g in zip(uses, grads) if g is not None
              for name, rows, form, a, x in _pieces(use, g)]
    sq = torch.zeros(len(losses), dtype=losses.dtype, device=losses.device)
    for _, _, form, a, x in pieces:
        sq += _outer_sq_norms(a, x) if form == "outer" else a.square().sum(1)
    norms = sq.sqrt()
    factor = (clip / norms).clamp(max=1.0)  # ‖g‖ = 0 gives C/0 = inf → 1
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for name, rows, form, a, x in pieces:
        if form == "outer":
            scaled = (a * factor.view(-1, 1, 1).to(a.dtype)).reshape(-1, a.shape[-1])
            total[name][rows].add_(scaled.t() @ x.reshape(-1, x.shape[-1]))
        else:
            total[name][rows].add_(factor.to(a.dtype) @ a)
    return total, losses.detach(), norms
