"""Closed-form Jacobian-vector products of the transformer's non-linear pieces (pure math, no parameters), and
the masking and pooling that plain and tangent layers share (`key_padding_bias`, `pool`).

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


def key_padding_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, N) bool mask, True = real token, to an additive (B, 1, 1, N) bias: 0 where kept, -inf where padded."""
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return bias[:, None, None, :]


def pool(tokens: torch.Tensor, how: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """CLS pooling (token 0) or mean over real tokens (mask True = real); linear, so it applies to tangents too."""
    if how == "cls":
        return tokens[:, 0]
    if mask is None:
        return tokens.mean(1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1)
