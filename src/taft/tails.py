"""The method registry: each method is a tail built from an encoder's last k blocks, final norm and a head, and
all three follow `taft.tangent.FeatureTail`'s protocol (`forward`, `train_inputs`, `train_logits`,
`trainable_module`, `weights`).

- taft:  `TangentTail`, f_lin(h; Δw) = f(h; w0) + J(h; w0) Δw (trainable: Δw, zero at the start).
- nlft:  `PlainTail`, the same blocks, norm and head as an ordinary module (trainable: all of them, from w0).
- probe: `ProbeTail`, the frozen tail at w0 (blocks and norm as buffers) with a trainable head; it trains on the
         pooled frozen features, computed once (`train_inputs`).

With CLS pooling every tail's last block computes token 0's output only (exact); `prune_last_block=False` runs it
in full. All three start from the same base head w0_head (`base_head`), so they are comparable.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from taft.backbones.trunk import params_to_buffers
from taft.errors import TaftError
from taft.tangent import FeatureTail, TangentTail, pool


def random_head(dim: int, num_classes: int, seed: int) -> nn.Linear:
    """Seeded head: W ~ U(-1/sqrt(dim), 1/sqrt(dim)) (PyTorch's Linear default scale), b = 0."""
    head = nn.Linear(dim, num_classes)
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(dim)
    with torch.no_grad():
        head.weight.copy_(torch.rand(num_classes, dim, generator=gen) * 2 * bound - bound)
        head.bias.zero_()
    return head


def base_head(dim: int, num_classes: int, seed: int, weight: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> nn.Linear:
    """The base head w0_head: `random_head(dim, C, seed)` unless `weight` (and optionally `bias`, default 0) is
    given. Never zero: with W0_head = 0 every block tangent J·Δw would vanish."""
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


class PlainTail(FeatureTail):
    """The last k blocks of an encoder (copies, keyed by their backbone index), the final norm (ViT; BERT has
    none), pooling and a head. Parameter names match the plain model's (`blocks.11.attn.qkv.weight`,
    `head.bias`). With `train_body=False` the blocks and norm become frozen buffers; only the head is trained."""

    def __init__(self, encoder: nn.Module, tangent_blocks: int, head: nn.Linear, pooling: str = "cls",
                 train_body: bool = True, prune_last_block: bool = True):
        super().__init__()
        depth = encoder.cfg.depth
        self.blocks = nn.ModuleDict({str(i): copy.deepcopy(encoder.blocks[i])
                                     for i in range(depth - tangent_blocks, depth)})
        self.norm = copy.deepcopy(encoder.norm)
        for m in (self.blocks, self.norm):
            if m is not None and train_body:
                m.requires_grad_(True)
            elif m is not None:
                params_to_buffers(m)
        self.head = head
        self.pooling = pooling
        self.prune_last_block = prune_last_block and pooling == "cls"

    def pooled(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled, final-normed features (B, D) of trunk features (B, N, D)."""
        x = features
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks.values()):
            x = block(x, mask, cls_only=self.prune_last_block and i == last)
        norm = (lambda t: t) if self.norm is None else self.norm
        if self.pooling == "cls":  # LayerNorm is per token: norm(x)[:, 0] = norm(x[:, 0])
            return norm(x[:, 0])
        return pool(norm(x), self.pooling, mask)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.pooled(features, mask))


class ProbeTail(PlainTail):
    """The probe: `PlainTail` with a frozen body, trained on its pooled features (computed once, no gradient)."""

    prepares_inputs = True

    def __init__(self, encoder: nn.Module, tangent_blocks: int, head: nn.Linear, pooling: str = "cls",
                 prune_last_block: bool = True):
        super().__init__(encoder, tangent_blocks, head, pooling, train_body=False, prune_last_block=prune_last_block)

    @torch.no_grad()
    def train_inputs(self, features: torch.Tensor,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the pooled frozen features (B, D), None: nothing is left to mask)."""
        return self.pooled(features, mask), None

    def train_logits(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(inputs)

    def trainable_module(self) -> tuple[nn.Module, str]:
        return self.head, "head."


TailBuilder = Callable[[nn.Module, int, nn.Linear, str, str, bool], nn.Module]
TAILS: dict[str, TailBuilder] = {
    "taft": lambda enc, k, head, pooling, attn, prune: TangentTail(
        {i: enc.blocks[i] for i in range(enc.cfg.depth - k, enc.cfg.depth)}, enc.norm, head, pooling, attn, prune),
    "nlft": lambda enc, k, head, pooling, attn, prune: PlainTail(enc, k, head, pooling, True, prune),
    "probe": lambda enc, k, head, pooling, attn, prune: ProbeTail(enc, k, head, pooling, prune),
}


def key_bias_rows(tail: nn.Module) -> dict[str, slice]:
    """{name in `tail.named_parameters()`: the key rows} of every trainable fused qkv bias (rows D:2D of q, k, v).

    Softmax attention is blind to the key bias b_k: q·(k_j + b_k) = q·k_j + q·b_k shifts every score of a query by
    the same amount, so f (and its tangent J Δw) does not depend on it, and its gradient is rounding noise. Adam
    divides that noise by its own running size and moves b_k about one learning rate per step, which changes the
    trained weights (never the function) with every kernel, device or compiler. `AutogradStep` zeroes these rows'
    gradients; DP-SGD leaves them, as its gradient is noisy in every row by design."""
    rows = {}
    for name, module in tail.named_modules():
        bias = getattr(getattr(module, "qkv", None), "bias", None)
        if isinstance(bias, nn.Parameter) and bias.requires_grad:
            dim = bias.shape[0] // 3
            rows[f"{name}.qkv.bias" if name else "qkv.bias"] = slice(dim, 2 * dim)
    return rows


def make_tail(method: str, encoder: nn.Module, tangent_blocks: int, head: nn.Linear, pooling: str = "cls",
              attn_impl: str = "sdpa", prune_last_block: bool = True) -> nn.Module:
    """The tail of `method` (a key of `TAILS`) over `encoder`'s last `tangent_blocks` blocks, around `head`.
    `attn_impl` ("sdpa" or "manual") applies to taft's tangent attention."""
    return TAILS[method](encoder, tangent_blocks, head, pooling, attn_impl, prune_last_block)
