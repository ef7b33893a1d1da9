"""Closed-form Jacobian-vector products of the transformer's non-linear pieces (pure math, no parameters).

Every function takes primal values (detached, no gradient needed) and tangents, and returns the tangent of the
output. `None` stands for a tangent known to be zero.
"""

from __future__ import annotations

import math

import torch

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_TANH_C = math.sqrt(2.0 / math.pi)
_TANH_A = 0.044715


def gelu_derivative(u: torch.Tensor, kind: str = "exact") -> torch.Tensor:
    """d gelu(u) / du. Exact: Φ(u) + u φ(u) (Φ from erf, never gelu(u)/u). Tanh approximation
    g = u/2 (1 + tanh(z)), z = c (u + a u³): g' = (1 + t)/2 + u (1 - t²) c (1 + 3 a u²) / 2 with t = tanh(z)."""
    if kind == "tanh":
        t = torch.tanh(_TANH_C * (u + _TANH_A * u**3))
        return 0.5 * (1 + t) + 0.5 * u * (1 - t * t) * _TANH_C * (1 + 3 * _TANH_A * u * u)
    cdf = 0.5 * (1 + torch.erf(u * _INV_SQRT_2))
    pdf = torch.exp(-0.5 * u * u) * _INV_SQRT_2PI
    return cdf + u * pdf


def layer_norm_jvp(normalized: torch.Tensor, inv_std: torch.Tensor, x_dot: torch.Tensor) -> torch.Tensor:
    """ṅ = (ẋ - mean(ẋ) - n · mean(n ẋ)) / σ, means over the feature axis."""
    centred = x_dot - x_dot.mean(-1, keepdim=True)
    return (centred - normalized * (normalized * x_dot).mean(-1, keepdim=True)) * inv_std


def attention_probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """P = softmax(Q Kᵀ / sqrt(d) + bias) for (B, H, N, d) heads; masked keys (bias -inf) get P = 0."""
    scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.shape[-1]))
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores, dim=-1)


def attention_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, probs: torch.Tensor,
                  q_dot: torch.Tensor | None, k_dot: torch.Tensor | None,
                  v_dot: torch.Tensor | None) -> torch.Tensor | None:
    """Tangent of O = P V with P = softmax(S), S = Q Kᵀ / sqrt(d):

        Ṡ = (Q̇ Kᵀ + Q K̇ᵀ) / sqrt(d),  Ṗ = P ⊙ (Ṡ - r),  r_i = Σ_j P_ij Ṡ_ij,  Ȯ = Ṗ V + P V̇.

    r is a row sum (O(N²)); this equals (P ⊙ Ṡ) V - r ⊙ O + P V̇. Masked entries have P = 0 and drop out.
    """
    out = None
    if q_dot is not None or k_dot is not None:
        scale = 1.0 / math.sqrt(q.shape[-1])
        s_dot = q_dot @ k.transpose(-2, -1) if q_dot is not None else None
        if k_dot is not None:
            qk = q @ k_dot.transpose(-2, -1)
            s_dot = qk if s_dot is None else s_dot.add_(qk)
        p_dot = s_dot.mul_(probs)  # P ⊙ Ṡ (scale applied once below)
        p_dot.sub_(probs * p_dot.sum(-1, keepdim=True))
        out = (p_dot @ v).mul_(scale)
    if v_dot is not None:
        pv = probs @ v_dot
        out = pv if out is None else out.add_(pv)
    return out
