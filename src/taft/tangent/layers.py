"""Tangent layers: each maps (primal x, tangent ẋ) to (primal y, tangent ẏ) in one forward pass.

A layer holds the frozen base weights w0 as buffers (`<name>_0`) and its trainable deltas Δw as parameters named
like the plain layer's weights (`weight`, `bias`, `gamma`), so `named_parameters()` is exactly Δw.

Gradients. The tangent ẏ is computed without an autograd graph. The primal is computed with the weights
`w0 + (Δw - sg(Δw))` (sg = stop-gradient): numerically w0, but its derivative with respect to Δw is the Jacobian
J(x; w0). So for a loss L(f(x; w0) + J Δw), backprop through the primal yields Jᵀ ∂L/∂f: the exact gradient
with respect to Δw, by ordinary backprop through the tail at w0 (two GEMMs per linear layer), while the tangent
forward adds two more (W ẋ and ΔW x). The output of a tail is differentiable with respect to Δw only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from taft.tangent.functional import attention_jvp, attention_probs, key_padding_bias, layer_norm_jvp


@dataclass(frozen=True)
class NormTangent:
    """ṅ = Δγ ⊙ n + Δβ, the tangent of a layer norm's output y = γ0 ⊙ n + β0 when its input has none (the first tail
    block), kept unexpanded: a linear layer W reading y then needs one GEMM for its tangent, not two, since
    ΔW y + W0 ṅ = (ΔW diag(γ0) + W0 diag(Δγ)) n + ΔW β0 + W0 Δβ."""

    n: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    weight_0: torch.Tensor
    bias_0: torch.Tensor

    def first_token(self) -> NormTangent:
        return replace(self, n=self.n[:, :1])

    def through_linear(self, d_weight: torch.Tensor, d_bias: torch.Tensor, weight_0: torch.Tensor) -> torch.Tensor:
        """ΔW y + W0 ṅ + Δb for a linear layer (W0, ΔW, Δb) applied to y, as one GEMM over the tokens."""
        weight = torch.addcmul(d_weight * self.weight_0, weight_0, self.weight)
        bias = d_bias + d_weight @ self.bias_0 + weight_0 @ self.bias
        return F.linear(self.n, weight, bias)


Tangent = torch.Tensor | NormTangent | None


def at_base(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """w0 in value; derivative 1 with respect to Δw when autograd is recording."""
    if torch.is_grad_enabled() and delta.requires_grad:
        return base + (delta - delta.detach())
    return base


def first_token(t: Tangent) -> Tangent:
    """Token 0 of (B, N, D) tokens or their tangent, kept as (B, 1, D); None stays None."""
    if isinstance(t, NormTangent):
        return t.first_token()
    return None if t is None else t[:, :1]


def add_tangents(a: Tangent, b: Tangent) -> Tangent:
    """Tangent of a sum (residual connection); None is zero."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


class TangentModule(nn.Module):
    """Base for layers with frozen base weights and zero-initialised deltas of the same shapes."""

    def add_weight(self, name: str, base: torch.Tensor) -> None:
        self.register_buffer(f"{name}_0", base.detach().clone())
        self.register_parameter(name, nn.Parameter(torch.zeros_like(base)))

    def base(self, name: str) -> torch.Tensor:
        return getattr(self, f"{name}_0")

    def primal_weight(self, name: str, rows: slice = slice(None)) -> torch.Tensor:
        return at_base(self.base(name)[rows], getattr(self, name)[rows])


class TangentLinear(TangentModule):
    """y = W0 x + b0;  ẏ = W0 ẋ + ΔW x + Δb (W0 ẋ skipped when ẋ is zero; folded into one GEMM when ẋ is a
    `NormTangent`). `rows` restricts the outputs to those rows of W and b (e.g. the keys and values of a fused qkv
    layer)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.add_weight("weight", linear.weight)
        self.add_weight("bias", linear.bias)

    def forward(self, x: torch.Tensor, x_dot: Tangent, *,
                rows: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        y = F.linear(x, self.primal_weight("weight", rows), self.primal_weight("bias", rows))
        with torch.no_grad():
            if isinstance(x_dot, NormTangent):
                return y, x_dot.through_linear(self.weight[rows], self.bias[rows], self.weight_0[rows])
            y_dot = F.linear(x.detach(), self.weight[rows], self.bias[rows])
            if x_dot is not None:  # accumulate W0 ẋ in place (one GEMM with beta = 1, no extra pass); in-place
                # ops are not autocast: under it y_dot is in the low precision and the operands follow it
                low = y_dot.dtype
                y_dot.view(-1, y_dot.shape[-1]).addmm_(x_dot.reshape(-1, x_dot.shape[-1]).to(low),
                                                       self.weight_0[rows].t().to(low))
        return y, y_dot


class TangentLayerNorm(TangentModule):
    """y = γ0 n + β0;  ẏ = γ0 ṅ + Δγ n + Δβ with ṅ from `layer_norm_jvp`. With `lazy` and no input tangent, ẏ is
    returned unexpanded as a `NormTangent` (for a consumer that is a `TangentLinear`, or `first_token` of one)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.eps = norm.eps
        self.add_weight("weight", norm.weight)
        self.add_weight("bias", norm.bias)

    def forward(self, x: torch.Tensor, x_dot: Tangent, *, lazy: bool = False) -> tuple[torch.Tensor, Tangent]:
        y, mean, inv_std = torch.native_layer_norm(x, x.shape[-1:], self.primal_weight("weight"),
                                                   self.primal_weight("bias"), self.eps)
        with torch.no_grad():
            inv_std = inv_std.detach()
            n = (x.detach() - mean.detach()).mul_(inv_std)
            if lazy and x_dot is None:
                return y, NormTangent(n, self.weight, self.bias, self.weight_0, self.bias_0)
            y_dot = torch.addcmul(self.bias, n, self.weight)
            if x_dot is not None:
                y_dot.add_(layer_norm_jvp(n, inv_std, x_dot).mul_(self.weight_0))
        return y, y_dot


class TangentLayerScale(TangentModule):
    """y = λ0 ⊙ x;  ẏ = λ0 ⊙ ẋ + Δλ ⊙ x."""

    def __init__(self, scale: nn.Module):
        super().__init__()
        self.add_weight("gamma", scale.gamma)

    def forward(self, x: torch.Tensor, x_dot: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        y = x * self.primal_weight("gamma")
        with torch.no_grad():
            y_dot = x.detach() * self.gamma
            if x_dot is not None:
                y_dot.addcmul_(x_dot, self.gamma_0)
        return y, y_dot


class TangentMlp(nn.Module):
    """fc2(gelu(fc1(x))); the GELU tangent is gelu'(u) ⊙ u̇."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gelu_kind = mlp.gelu_kind
        self.fc1 = TangentLinear(mlp.fc1)
        self.fc2 = TangentLinear(mlp.fc2)

    def forward(self, x: torch.Tensor, x_dot: Tangent) -> tuple[torch.Tensor, torch.Tensor]:
        u, u_dot = self.fc1(x, x_dot)
        approximate = "tanh" if self.gelu_kind == "tanh" else "none"
        g = F.gelu(u, approximate=approximate)
        with torch.no_grad():  # ġ = gelu'(u) u̇, one fused pass (the kernel autograd uses for GELU)
            g_dot = torch.ops.aten.gelu_backward(u_dot, u.detach(), approximate=approximate)
        return self.fc2(g, g_dot)


def split_heads(t: torch.Tensor, parts: int, heads: int) -> torch.Tensor:
    """(B, n, parts·D) projections → (parts, B, heads, n, D/heads), a view."""
    B, n, width = t.shape
    return t.view(B, n, parts, heads, width // (parts * heads)).permute(2, 0, 3, 1, 4)


class TangentAttention(nn.Module):
    """Multi-head softmax attention. The primal uses fused SDPA (`impl="sdpa"`) or a written-out softmax
    (`impl="manual"`); the tangent uses `attention_jvp` with P recomputed without a graph. With `cls_only`, only
    token 0's output row (B, 1, D): its query against the keys and values (and tangents) of every token."""

    def __init__(self, attn: nn.Module, impl: str = "sdpa"):
        super().__init__()
        self.heads = attn.heads
        self.impl = impl
        self.qkv = TangentLinear(attn.qkv)
        self.proj = TangentLinear(attn.proj)

    def forward(self, x: torch.Tensor, x_dot: Tangent, mask: torch.Tensor | None = None,
                cls_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        B, N, D = x.shape
        if cls_only:  # (projection, its tangent, how many of q/k/v it holds)
            q, q_dot = self.qkv(x[:, :1], first_token(x_dot), rows=slice(0, D))
            kv, kv_dot = self.qkv(x, x_dot, rows=slice(D, None))
            groups = [(q, q_dot, 1), (kv, kv_dot, 2)]
        else:
            qkv, qkv_dot = self.qkv(x, x_dot)
            groups = [(qkv, qkv_dot, 3)]
        q, k, v = (h for y, _, parts in groups for h in split_heads(y, parts, self.heads))
        bias = key_padding_bias(mask, x.dtype)
        with torch.no_grad():  # head-major contiguous copies, so every product below is a plain batched GEMM
            qd, kd, vd = (h for y, _, parts in groups
                          for h in split_heads(y.detach(), parts, self.heads).contiguous())
            q_dot, k_dot, v_dot = (h for _, y_dot, parts in groups
                                   for h in split_heads(y_dot, parts, self.heads).contiguous())
            probs = attention_probs(qd, kd, bias)
            o_dot = attention_jvp(qd, kd, vd, probs, q_dot, k_dot, v_dot)
            o_dot = o_dot.transpose(1, 2).reshape(B, -1, D)
        if self.impl == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        elif torch.is_grad_enabled():
            o = attention_probs(q, k, bias) @ v
        else:
            o = probs @ vd
        return self.proj(o.transpose(1, 2).reshape(B, -1, D), o_dot)


class TangentBlock(nn.Module):
    """Pre-norm transformer block; residual tangents add. With `cls_only`, token 0's output only (B, 1, D):
    keys and values come from every token, everything after attention from token 0 (exact for that token)."""

    def __init__(self, block: nn.Module, attn_impl: str = "sdpa"):
        super().__init__()
        self.norm1 = TangentLayerNorm(block.norm1)
        self.attn = TangentAttention(block.attn, attn_impl)
        self.ls1 = TangentLayerScale(block.ls1) if hasattr(block.ls1, "gamma") else None
        self.norm2 = TangentLayerNorm(block.norm2)
        self.mlp = TangentMlp(block.mlp)
        self.ls2 = TangentLayerScale(block.ls2) if hasattr(block.ls2, "gamma") else None

    def forward(self, x: torch.Tensor, x_dot: Tangent, mask: torch.Tensor | None = None,
                cls_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        a, a_dot = self.attn(*self.norm1(x, x_dot, lazy=True), mask, cls_only)  # attention reads it via qkv
        if self.ls1 is not None:
            a, a_dot = self.ls1(a, a_dot)
        if cls_only:
            x, x_dot = x[:, :1], first_token(x_dot)
        x, x_dot = x + a, add_tangents(x_dot, a_dot)
        m, m_dot = self.mlp(*self.norm2(x, x_dot))
        if self.ls2 is not None:
            m, m_dot = self.ls2(m, m_dot)
        return x + m, add_tangents(x_dot, m_dot)


class TangentPostNormBlock(nn.Module):
    """Post-norm (BERT) block: h = norm1(x + attn(x)), out = norm2(h + mlp(h)); residual tangents add before
    each norm's tangent. `cls_only` as in `TangentBlock`."""

    def __init__(self, block: nn.Module, attn_impl: str = "sdpa"):
        super().__init__()
        self.attn = TangentAttention(block.attn, attn_impl)
        self.norm1 = TangentLayerNorm(block.norm1)
        self.mlp = TangentMlp(block.mlp)
        self.norm2 = TangentLayerNorm(block.norm2)

    def forward(self, x: torch.Tensor, x_dot: Tangent, mask: torch.Tensor | None = None,
                cls_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        a, a_dot = self.attn(x, x_dot, mask, cls_only)
        if cls_only:
            x, x_dot = x[:, :1], first_token(x_dot)
        x, x_dot = self.norm1(x + a, add_tangents(x_dot, a_dot))
        m, m_dot = self.mlp(x, x_dot)
        return self.norm2(x + m, add_tangents(x_dot, m_dot))


def tangent_block(block: nn.Module, attn_impl: str = "sdpa") -> TangentBlock | TangentPostNormBlock:
    """The tangent version of a plain block: post-norm when the block says so (`post_norm = True`), else pre-norm."""
    if getattr(block, "post_norm", False):
        return TangentPostNormBlock(block, attn_impl)
    return TangentBlock(block, attn_impl)
