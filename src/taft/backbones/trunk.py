"""The frozen parts of an encoder that every method shares: its trunk (embedding and the first depth − k blocks),
and the plain model a trained tail turns back into (`PlainClassifier`)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from taft.backbones.base import TokenBatch
from taft.errors import TaftError
from taft.tangent import pool

Inputs = torch.Tensor | TokenBatch  # preprocessed images (B, C, H, W), or padded token ids with their mask


def params_to_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of `module` into a buffer of the same name (frozen, still moved by .to())."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, param.detach())
    return module


def check_tangent_blocks(k: int, depth: int) -> None:
    """`TaftError` unless k is an integer in 1..depth."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or int(k) != k or not 1 <= k <= depth:
        raise TaftError(f"tangent_blocks (k) must be in 1..{depth} for this backbone, got {k!r}")


def input_mask(inputs: Inputs) -> torch.Tensor | None:
    """The key-padding mask (B, N) of text inputs (True = real token); None for images (no padding)."""
    return inputs.mask if isinstance(inputs, TokenBatch) else None


def encode(encoder: nn.Module, inputs: Inputs) -> torch.Tensor:
    """Run a ViT on images or a BertEncoder on a TokenBatch: its final tokens (B, N, D)."""
    if isinstance(inputs, TokenBatch):
        return encoder(inputs.ids, inputs.mask)
    return encoder(inputs)


class Trunk(nn.Module):
    """Embedding and blocks 0..L-k-1 of an encoder (ViT or BERT), run without gradients. Output: tokens (B, N, D);
    padded positions of text hold values that nothing downstream reads (the mask removes them)."""

    def __init__(self, encoder: nn.Module, n_blocks: int):
        super().__init__()
        trunk = copy.deepcopy(encoder)
        trunk.blocks = trunk.blocks[:n_blocks]
        if isinstance(getattr(trunk, "norm", None), nn.Module):
            del trunk.norm
        self.encoder = params_to_buffers(trunk)

    @torch.no_grad()
    def forward(self, inputs: Inputs) -> torch.Tensor:
        mask = input_mask(inputs)
        tokens = self.encoder.embed(inputs.ids, mask) if isinstance(inputs, TokenBatch) else self.encoder.embed(inputs)
        for block in self.encoder.blocks:
            tokens = block(tokens, mask)
        return tokens


class PlainClassifier(nn.Module):
    """A plain (non-linear) encoder with a pooled linear head: what `Classifier.materialize()` returns."""

    def __init__(self, encoder: nn.Module, head: nn.Linear, pooling: str):
        super().__init__()
        self.encoder, self.head, self.pooling = encoder, head, pooling

    @classmethod
    def assemble(cls, trunk: Trunk, tail_weights: dict[str, torch.Tensor], pooling: str) -> PlainClassifier:
        """The plain model whose encoder has the trunk's weights and the tail's (`head.*` the head's), on the
        trunk's device and in the tail weights' dtype."""
        state = {k[len("encoder."):]: v for k, v in trunk.state_dict().items()}
        state.update(tail_weights)
        head_state = {k[len("head."):]: state.pop(k) for k in list(state) if k.startswith("head.")}
        like = head_state["weight"]
        model = cls(type(trunk.encoder)(trunk.encoder.cfg), nn.Linear(like.shape[1], like.shape[0]), pooling)
        model.to(device=like.device, dtype=like.dtype)  # before loading, so that nothing is rounded on the way
        model.encoder.load_state_dict(state)
        model.head.load_state_dict(head_state)
        return model.eval()

    def forward(self, inputs: Inputs) -> torch.Tensor:
        return self.head(pool(encode(self.encoder, inputs), self.pooling, input_mask(inputs)))
