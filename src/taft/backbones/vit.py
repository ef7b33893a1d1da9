"""Our own Vision Transformer (pre-norm, optional LayerScale), the plain non-linear reference for taft.

State-dict names follow timm's layout: `patch_embed.proj`, `cls_token`, `pos_embed` (CLS position first, then the
pretraining grid row by row), `blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}`,
`norm`. The fused `qkv` weight stacks query, key, value rows in that order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from taft.errors import TaftError
from taft.tangent.functional import attention_probs, key_padding_bias


def check_block_shape(dim: int, heads: int, gelu: str) -> None:
    """What every transformer config here needs: heads dividing the width, an exact or tanh GELU."""
    if dim % heads:
        raise TaftError(f"width {dim} is not divisible by {heads} heads")
    if gelu not in ("exact", "tanh"):
        raise TaftError(f"gelu must be 'exact' or 'tanh', got {gelu!r}")


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ViT. `pos_grid` is the side of the square position-embedding grid it was trained with."""

    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_hidden: int = 1536
    patch_size: int = 14
    in_chans: int = 3
    pos_grid: int = 37
    layerscale: bool = True
    ln_eps: float = 1e-6
    gelu: str = "exact"  # "exact" or "tanh"

    def __post_init__(self) -> None:
        check_block_shape(self.dim, self.heads, self.gelu)

    def to_dict(self) -> dict:
        return asdict(self)


def gelu(x: torch.Tensor, kind: str) -> torch.Tensor:
    return F.gelu(x, approximate="tanh" if kind == "tanh" else "none")


def manual_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(Q Kᵀ / sqrt(d) + bias) V, written out (differentiable by forward- and reverse-mode AD); the same
    softmax the tangent layers use (`taft.tangent.functional.attention_probs`)."""
    return attention_probs(q, k, bias) @ v


class FusedLinear(nn.Linear):
    """`nn.Linear` whose outputs can be cut to rows R of W and b, y = x W[R]ᵀ + b[R] (the query, or the keys and
    values, of a fused qkv projection), through the module so that module hooks see every use."""

    def forward(self, x: torch.Tensor, *, rows: slice = slice(None)) -> torch.Tensor:
        return F.linear(x, self.weight[rows], None if self.bias is None else self.bias[rows])


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, impl: str = "sdpa"):
        super().__init__()
        self.heads = heads
        self.impl = impl
        self.qkv = FusedLinear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cls_only: bool = False) -> torch.Tensor:
        """(B, N, D) tokens → (B, N, D); with `cls_only` only token 0's output (B, 1, D): its query against the
        keys and values of every token (padded keys masked), the exact token-0 row of the full output."""
        B, N, D = x.shape
        H = self.heads
        if cls_only:  # split the fused weight: one query row, keys and values of all tokens
            q = self.qkv(x[:, :1], rows=slice(0, D)).view(B, 1, H, D // H).transpose(1, 2)
            k, v = self.qkv(x, rows=slice(D, None)).view(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = self.qkv(x).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
        bias = key_padding_bias(mask, x.dtype)
        if self.impl == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            o = manual_attention(q, k, v, bias)
        return self.proj(o.transpose(1, 2).reshape(B, q.shape[2], D))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, gelu_kind: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.gelu_kind = gelu_kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu(self.fc1(x), self.gelu_kind))


class Block(nn.Module):
    """Pre-norm block: x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(·)))."""

    def __init__(self, cfg: ViTConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg.dim, cfg.heads, attn_impl)
        self.ls1 = LayerScale(cfg.dim) if cfg.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.dim, cfg.mlp_hidden, cfg.gelu)
        self.ls2 = LayerScale(cfg.dim) if cfg.layerscale else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cls_only: bool = False) -> torch.Tensor:
        """(B, N, D) → (B, N, D); with `cls_only` token 0's output only, (B, 1, D) (see `Attention`)."""
        a = self.ls1(self.attn(self.norm1(x), mask, cls_only))
        x = (x[:, :1] if cls_only else x) + a
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """ViT encoder. `forward` returns the final-normed tokens (B, 1 + H/p * W/p, dim), CLS first."""

    def __init__(self, cfg: ViTConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg, attn_impl) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)

    def check_input(self, x: torch.Tensor) -> None:
        p, c = self.cfg.patch_size, self.cfg.in_chans
        if x.dim() != 4:
            raise TaftError(f"expected images of shape (batch, {c}, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != c:
            raise TaftError(f"expected {c} channels, got {x.shape[1]} (input shape {tuple(x.shape)})")
        h, w = x.shape[-2:]
        if h % p or w % p:
            raise TaftError(f"image size {h}x{w} is not a multiple of the patch size {p}")

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings for a (grid_h, grid_w) patch grid: bicubic resize (align_corners=False) of the
        pretraining grid to that explicit size; the CLS position is unchanged."""
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        g = self.cfg.pos_grid
        if (grid_h, grid_w) != (g, g):
            grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
            grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([cls_pos, grid], dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens with CLS prepended and position embeddings added."""
        self.check_input(x)
        p = self.cfg.patch_size
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.position_embedding(x.shape[-2] // p, x.shape[-1] // p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)
