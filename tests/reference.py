"""Independent references for the tangent tail: the plain (non-fused) tail as a function of its weights,
differentiated by torch.func (forward-mode `jvp`, reverse-mode `vjp`)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp

from taft.backbones.base import Backbone, ImagePreprocess, TextPreprocess
from taft.backbones.bert import BertConfig, BertEncoder
from taft.backbones.vit import ViT, ViTConfig
from taft.model import TangentModel
from taft.tangent import pool


class PlainTail(nn.Module):
    """The last k blocks, final norm (if any), pooling and head of a ViT or BERT, written-out softmax attention."""

    def __init__(self, model: TangentModel):
        super().__init__()
        plain = model.materialize()
        for block in plain.encoder.blocks:
            block.attn.impl = "manual"
        first = model.config.depth - model.tangent_blocks
        self.blocks = nn.ModuleDict({str(i): plain.encoder.blocks[i] for i in range(first, model.config.depth)})
        self.norm, self.head, self.pooling = plain.encoder.norm, plain.head, model.pooling

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = features
        for block in self.blocks.values():
            x = block(x, mask)
        if self.norm is not None:
            x = self.norm(x)
        return self.head(pool(x, self.pooling, mask))


def base_and_delta(model: TangentModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """w0 and Δw of the tail, keyed by the plain tail's parameter names."""
    base = {n: model.tail.get_buffer(f"{n}_0") for n, _ in model.tail.named_parameters()}
    return base, model.trainable_state_dict()


def reference_linearized(model: TangentModel, features: torch.Tensor,
                         mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(h; w0), J(h; w0) Δw) by torch.func.jvp of the plain tail."""
    tail = PlainTail(model)
    base, delta = base_and_delta(model)

    def f(weights):
        return functional_call(tail, weights, (features, mask))

    return jvp(f, (base,), (delta,))


def reference_vjp(model: TangentModel, features: torch.Tensor, cotangent: torch.Tensor,
                  mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """J(h; w0)ᵀ c by torch.func.vjp of the plain tail."""
    tail = PlainTail(model)
    base, _ = base_and_delta(model)
    _, pullback = vjp(lambda w: functional_call(tail, w, (features, mask)), base)
    return pullback(cotangent)[0]


def _randomize(encoder: nn.Module, seed: int, dtype: torch.dtype) -> nn.Module:
    """Random weights of realistic scale (non-trivial norms and LayerScale), frozen, in `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    vit = encoder.to(dtype)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=dtype))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen, dtype=dtype))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                scale = 0.1 if p.dim() == 1 else 1 / fan_in**0.5
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=dtype))
    return vit.eval().requires_grad_(False)


def random_backbone(cfg: ViTConfig, image: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Backbone:
    """A ViT with random weights of realistic scale (non-trivial norms and LayerScale), frozen."""
    return Backbone(name=f"random-{seed}", model=_randomize(ViT(cfg), seed, dtype),
                    preprocess=ImagePreprocess((image, image), cfg.patch_size))


def random_text_backbone(cfg: BertConfig, seed: int = 0, dtype: torch.dtype = torch.float64) -> Backbone:
    """A BERT encoder with random weights of realistic scale, frozen (no tokenizer: feed TokenBatch inputs)."""
    return Backbone(name=f"random-bert-{seed}", model=_randomize(BertEncoder(cfg), seed, dtype),
                    preprocess=TextPreprocess(tokenizer="none", max_length=cfg.max_positions))


def randomize_delta(model: TangentModel, scale: float, seed: int = 1) -> None:
    """Δw ~ scale · N(0, 1) · |w0| + scale · N(0,1)·0.1 (relative perturbation, so every layer moves)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.tail.named_parameters():
            base = model.tail.get_buffer(f"{name}_0")
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            p.copy_(scale * noise * (base.abs() + 0.1))
