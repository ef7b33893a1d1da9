"""Tangent layers and the tangent tail: pure math, no I/O."""

from taft.tangent.layers import (TangentAttention, TangentBlock, TangentLayerNorm, TangentLayerScale, TangentLinear,
                                 TangentMlp, TangentPostNormBlock, pool, tangent_block)
from taft.tangent.tail import TangentTail

__all__ = ["TangentAttention", "TangentBlock", "TangentLayerNorm", "TangentLayerScale", "TangentLinear", "TangentMlp",
           "TangentPostNormBlock", "TangentTail", "pool", "tangent_block"]
