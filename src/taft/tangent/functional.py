"""Closed-form Jacobian-vector products of the transformer's non-linear pieces (pure math, no parameters).

Every function takes primal values (detached, no gradient needed) and tangents, and returns the tangent of the
output. `None` stands for a tangent known to be zero. The GELU tangent gelu'(u) u̇ uses PyTorch's fused derivative
kernel (`aten.gelu_backward`, exact or tanh form) directly in `TangentMlp`.
"""

from __future__ import annotations

import math

import torch


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
