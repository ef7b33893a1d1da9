"""The tangent tail: the last k blocks, the final norm, pooling and the classification head, linearized at w0."""

from __future__ import annotations

import torch
from torch import nn

from taft.tangent.functional import pool
from taft.tangent.layers import TangentLayerNorm, TangentLinear, tangent_block


class TangentTail(nn.Module):
    """f_lin(h; Δw) = f(h; w0) + J(h; w0) Δw for trunk features h (B, N, D).

    `blocks` is keyed by the block's index in the full backbone, so Δw names match the plain model's
    (`blocks.11.attn.qkv.weight`, `norm.weight`, `head.weight`, ...). Pre-norm (ViT) or post-norm (BERT) blocks;
    `norm` is the final norm, None for post-norm encoders (their last block ends with one). `mask` (B, N), True =
    real token, removes padded keys from attention and padded tokens from mean pooling.

    With CLS pooling the last block is pruned (exact): only token 0 reaches the head, so that block computes the
    keys and values of every token and everything else for token 0 alone. `prune_last_block=False` runs the full
    block (the unpruned reference for tests and benchmarks); mean pooling always does.
    """

    def __init__(self, blocks: dict[int, nn.Module], norm: nn.LayerNorm | None, head: nn.Linear,
                 pooling: str = "cls", attn_impl: str = "sdpa", prune_last_block: bool = True):
        super().__init__()
        self.blocks = nn.ModuleDict({str(i): tangent_block(b, attn_impl) for i, b in blocks.items()})
        self.norm = TangentLayerNorm(norm) if norm is not None else None
        self.head = TangentLinear(head)
        self.pooling = pooling
        self.prune_last_block = prune_last_block and pooling == "cls"

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the linearized tail. Differentiable with respect to Δw (not with respect to `features`)."""
        x, x_dot = features, None  # the trunk does not depend on Δw
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks.values()):
            x, x_dot = block(x, x_dot, mask, cls_only=self.prune_last_block and i == last)
        if self.pooling == "cls":  # LayerNorm acts per token, so norm(x)[:, 0] = norm(x[:, 0]): skip the rest
            x, x_dot = x[:, 0], x_dot[:, 0]
            if self.norm is not None:
                x, x_dot = self.norm(x, x_dot)
        else:
            if self.norm is not None:
                x, x_dot = self.norm(x, x_dot)
            x, x_dot = pool(x, self.pooling, mask), pool(x_dot, self.pooling, mask)
        logits, logits_dot = self.head(x, x_dot)
        return logits + logits_dot
