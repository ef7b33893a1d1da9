"""TangentModel: a frozen trunk plus a tangent tail, f_lin(x; Δw) = f(x; w0) + J(x; w0) Δw."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from taft.backbones.base import Backbone, TokenBatch
from taft.errors import FingerprintMismatchError, TaftError
from taft.fingerprint import hash_tensors
from taft.tensors import load_checked
from taft.tangent import TangentTail, pool

POOLINGS = ("cls", "mean")


def params_to_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of `module` into a buffer of the same name (frozen, still moved by .to())."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, param.detach())
    return module


Inputs = torch.Tensor | TokenBatch  # preprocessed images (B, C, H, W), or padded token ids with their mask


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
    """A plain (non-linear) encoder with a pooled linear head: what `TangentModel.materialize()` returns."""

    def __init__(self, encoder: nn.Module, head: nn.Linear, pooling: str):
        super().__init__()
        self.encoder, self.head, self.pooling = encoder, head, pooling

    def forward(self, inputs: Inputs) -> torch.Tensor:
        return self.head(pool(encode(self.encoder, inputs), self.pooling, input_mask(inputs)))


def random_head(dim: int, num_classes: int, seed: int) -> nn.Linear:
    """Seeded head: W ~ U(-1/sqrt(dim), 1/sqrt(dim)) (PyTorch's Linear default scale), b = 0."""
    head = nn.Linear(dim, num_classes)
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(dim)
    with torch.no_grad():
        head.weight.copy_(torch.rand(num_classes, dim, generator=gen) * 2 * bound - bound)
        head.bias.zero_()
    return head


class TangentModel(nn.Module):
    """Linearized fine-tuning model. Its parameters are exactly Δw (zero at construction).

    Args:
        backbone: a loaded backbone (`taft.load_backbone`): a ViT (images) or a BERT encoder (TokenBatch inputs).
        num_classes: number of classes (≥ 2).
        tangent_blocks: k, how many of the last blocks are linearized (1..depth); the final norm and head always are.
        seed: seeds the random base head w0_head (used when `head_weight` is not given).
        head_weight, head_bias: base head weights (num_classes, dim) and (num_classes,), e.g. a linear-probe
            solution. Never zero: with W0_head = 0 every block tangent J·Δw would vanish.
        pooling: "cls" (token 0) or "mean".
        attn_impl: "sdpa" (fused primal attention) or "manual" (written-out softmax).
        prune_last_block: with CLS pooling, the last block computes token 0's output only (exact; see
            `TangentTail`). False runs it in full (a reference for tests and benchmarks).
    """

    def __init__(self, backbone: Backbone, num_classes: int, tangent_blocks: int = 1, seed: int = 0,
                 head_weight: torch.Tensor | None = None, head_bias: torch.Tensor | None = None,
                 pooling: str = "cls", attn_impl: str = "sdpa", prune_last_block: bool = True):
        super().__init__()
        encoder = backbone.model
        cfg = encoder.cfg
        if int(num_classes) != num_classes or num_classes < 2:
            raise TaftError(f"num_classes must be an integer ≥ 2, got {num_classes}")
        if int(tangent_blocks) != tangent_blocks or not 1 <= tangent_blocks <= cfg.depth:
            raise TaftError(f"tangent_blocks (k) must be in 1..{cfg.depth} for this backbone, got {tangent_blocks}")
        if pooling not in POOLINGS:
            raise TaftError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.backbone_name = backbone.name
        self.preprocess = backbone.preprocess
        self.config = cfg
        self.num_classes, self.tangent_blocks, self.seed, self.pooling = num_classes, tangent_blocks, seed, pooling
        first_tail = cfg.depth - tangent_blocks
        head = self._base_head(cfg.dim, num_classes, seed, head_weight, head_bias)
        self.trunk = Trunk(encoder, first_tail)
        self.tail = TangentTail({i: encoder.blocks[i] for i in range(first_tail, cfg.depth)}, encoder.norm, head,
                                pooling, attn_impl, prune_last_block)
        base = {k: v for k, v in self.state_dict().items() if k not in dict(self.named_parameters())}
        self.fingerprint = hash_tensors(base, extra=[f"k={tangent_blocks}", f"pooling={pooling}",
                                                     *(f"{k}={v}" for k, v in sorted(cfg.to_dict().items()))])

    @staticmethod
    def _base_head(dim: int, num_classes: int, seed: int, weight: torch.Tensor | None,
                   bias: torch.Tensor | None) -> nn.Linear:
        head = random_head(dim, num_classes, seed)
        if weight is None:
            if bias is not None:
                raise TaftError("head_bias given without head_weight")
            return head
        if tuple(weight.shape) != (num_classes, dim):
            raise TaftError(f"head_weight must have shape ({num_classes}, {dim}), got {tuple(weight.shape)}")
        if not torch.any(weight != 0):
            raise TaftError("head_weight is all zeros: a zero base head makes every block's tangent vanish")
        if bias is not None and tuple(bias.shape) != (num_classes,):
            raise TaftError(f"head_bias must have shape ({num_classes},), got {tuple(bias.shape)}")
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias if bias is not None else torch.zeros(num_classes))
        return head

    def trunk_features(self, inputs: Inputs) -> torch.Tensor:
        """Frozen trunk output (B, N, D) for preprocessed images (B, C, H, W) or a TokenBatch; no gradient,
        cacheable."""
        return self.trunk(inputs)

    def forward(self, inputs: Inputs) -> torch.Tensor:
        """Logits of f_lin for preprocessed images or a TokenBatch."""
        return self.tail(self.trunk_features(inputs), input_mask(inputs))

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """Δw only, keyed like the plain model's weights (`blocks.11.attn.qkv.weight`, `norm.bias`, `head.weight`)."""
        return {name: p.detach().clone() for name, p in self.tail.named_parameters()}

    def load_delta_state_dict(self, delta: dict[str, torch.Tensor], fingerprint: str) -> None:
        """Load Δw saved from a model whose `fingerprint` is given; checks everything before changing anything."""
        if fingerprint != self.fingerprint:
            raise FingerprintMismatchError(
                f"this Δw was trained around other base weights (fingerprint {fingerprint[:12]}…) than this model "
                f"({self.fingerprint[:12]}…: backbone {self.backbone_name}, k={self.tangent_blocks}); "
                "load it into the model it was trained with")
        load_checked(dict(self.tail.named_parameters()), delta, "Δw tensors")

    def materialize(self) -> PlainClassifier:
        """A plain non-linear model with weights w0 + Δw (same dtype and device as this model)."""
        state = {k[len("encoder."):]: v for k, v in self.trunk.state_dict().items()}
        for name, delta in self.tail.named_parameters():
            state[name] = self.tail.get_buffer(f"{name}_0") + delta.detach()
        head_state = {k[len("head."):]: state.pop(k) for k in list(state) if k.startswith("head.")}
        ref = next(self.trunk.buffers())
        encoder = type(self.trunk.encoder)(self.config).to(device=ref.device, dtype=ref.dtype)
        encoder.load_state_dict(state)
        head = nn.Linear(self.config.dim, self.num_classes).to(device=ref.device, dtype=ref.dtype)
        head.load_state_dict(head_state)
        return PlainClassifier(encoder, head, self.pooling).eval()
