"""The tangent tail: the last k blocks, the final norm, pooling and the classification head, linearized at w0.

Every method's tail (`taft.tails` has the other two) follows one protocol, `FeatureTail`: `forward(features, mask)`
gives logits from trunk features; `train_inputs` computes once what does not change in training, `train_logits`
maps it to logits through `trainable_module()`; `weights()` are the plain model's weights of the tail.
"""

from __future__ import annotations

import torch
from torch import nn

from taft.tangent.functional import pool
from taft.tangent.layers import TangentLayerNorm, TangentLinear, tangent_block


class FeatureTail(nn.Module):
    """The tail protocol, as a tail that trains on the trunk features themselves (taft, nlft): `prepares_inputs`
    is False (`train_inputs` returns them unchanged)."""

    prepares_inputs = False

    def train_inputs(self, features: torch.Tensor,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(what `train_logits` consumes, its mask): here the trunk features and their mask, unchanged."""
        return features, mask

    def train_logits(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from `train_inputs`; differentiable with respect to the trainable tensors."""
        return self(inputs, mask)

    def trainable_module(self) -> tuple[nn.Module, str]:
        """(the module `train_logits` calls, the prefix of its parameters' names in the tail)."""
        return self, ""

    def weights(self) -> dict[str, torch.Tensor]:
        """The plain model's weights of the tail, keyed like the plain model (`blocks.11.attn.qkv.weight`)."""
        return {n: t.detach() for n, t in self.state_dict().items()}


class TangentTail(FeatureTail):
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

    def weights(self) -> dict[str, torch.Tensor]:
        """w0 + Δw for every trained tensor."""
        return {name: self.get_buffer(f"{name}_0") + delta.detach() for name, delta in self.named_parameters()}
