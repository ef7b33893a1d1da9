"""Our own BERT encoder (post-norm blocks), the plain non-linear reference for text backbones such as MiniLM.

State-dict names: `embeddings.{word,position,token_type}.weight`, `embeddings.norm`,
`blocks.{i}.{attn.qkv,attn.proj,norm1,mlp.fc1,mlp.fc2,norm2}`. The fused `qkv` weight stacks the query, key and
value rows in that order (as in `taft.backbones.vit.Attention`, which it reuses, with the MLP). There is no final
norm: every post-norm block ends with one. Inputs are single segments, so the token-type id is 0 everywhere.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from taft.backbones.vit import Attention, Mlp, check_block_shape
from taft.errors import TaftError


@dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT encoder (defaults: all-MiniLM-L6-v2)."""

    dim: int = 384
    depth: int = 6
    heads: int = 12
    mlp_hidden: int = 1536
    vocab_size: int = 30522
    max_positions: int = 512
    type_vocab_size: int = 2
    ln_eps: float = 1e-12
    gelu: str = "exact"  # "exact" or "tanh"

    def __post_init__(self) -> None:
        check_block_shape(self.dim, self.heads, self.gelu)

    def to_dict(self) -> dict:
        return asdict(self)


class PostNormBlock(nn.Module):
    """BERT block: h = norm1(x + attn(x)), out = norm2(h + mlp(h)); padded keys (mask False) are ignored."""

    post_norm = True

    def __init__(self, cfg: BertConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.attn = Attention(cfg.dim, cfg.heads, attn_impl)
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.dim, cfg.mlp_hidden, cfg.gelu)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cls_only: bool = False) -> torch.Tensor:
        """(B, N, D) → (B, N, D); with `cls_only` token 0's output only, (B, 1, D) (see `Attention`)."""
        a = self.attn(x, mask, cls_only)
        x = self.norm1((x[:, :1] if cls_only else x) + a)
        return self.norm2(x + self.mlp(x))


class BertEmbeddings(nn.Module):
    """norm(word[id] + position[j] + token_type[0]) for token j."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.position = nn.Embedding(cfg.max_positions, cfg.dim)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = self.position.weight[: ids.shape[1]]
        return self.norm(self.word(ids) + positions + self.token_type.weight[0])


class BertEncoder(nn.Module):
    """BERT encoder. `forward(ids, mask)` returns the last block's tokens (B, N, dim); `norm` is None."""

    norm = None

    def __init__(self, cfg: BertConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.blocks = nn.ModuleList(PostNormBlock(cfg, attn_impl) for _ in range(cfg.depth))

    def check_input(self, ids: torch.Tensor, mask: torch.Tensor | None) -> None:
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise TaftError(f"expected integer token ids of shape (batch, length), got {ids.dtype} "
                            f"{tuple(ids.shape)}")
        if ids.shape[1] > self.cfg.max_positions:
            raise TaftError(f"sequence of {ids.shape[1]} tokens is longer than the model's "
                            f"{self.cfg.max_positions} positions; tokenize with a smaller max_length")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise TaftError(f"token ids must be in [0, {self.cfg.vocab_size}), found {int(ids.min())}.."
                            f"{int(ids.max())}")
        if mask is not None and (mask.shape != ids.shape or mask.dtype != torch.bool):
            raise TaftError(f"mask must be a bool tensor of the ids' shape {tuple(ids.shape)}, got {mask.dtype} "
                            f"{tuple(mask.shape)}")

    def embed(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embedded tokens (B, N, dim) of token ids (B, N)."""
        self.check_input(ids, mask)
        return self.embeddings(ids)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.embed(ids, mask)
        for block in self.blocks:
            tokens = block(tokens, mask)
        return tokens
