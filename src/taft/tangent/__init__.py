"""Tangent layers and the tangent tail: pure math, no I/O."""

from taft.tangent.layers import (TangentAttention, TangentBlock, TangentLayerNorm, TangentLayerScale, TangentLinear,
                                 TangentMlp, TangentPostNormBlock, tangent_block)
from taft.tangent.functional import key_padding_bias, pool
from taft.tangent.tail import FeatureTail, TangentTail

__all__ = ["FeatureTail", "TangentAttention", "TangentBlock", "TangentLayerNorm", "TangentLayerScale", "TangentLinear", "TangentMlp",
           "TangentPostNormBlock", "TangentTail", "key_padding_bias", "pool", "tangent_block"]
