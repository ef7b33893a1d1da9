"""Trunk features through the feature cache: the frozen first depth − k blocks of a backbone, run once per
dataset and reused by every method, epoch, shard and run (`taft.data.feature_cache` stores them).
`Classifier.cache_features` runs a model's own trunk under the same key."""

from __future__ import annotations

from pathlib import Path

import torch

from taft.backbones.base import Backbone
from taft.backbones.trunk import Trunk, check_tangent_blocks
from taft.data.feature_cache import CachedFeatures, FeatureCache, LabelledDataset
from taft.data.feature_cache.key import CACHE_DTYPE
from taft.devices import resolve_device
from taft.precision import check_autocast, under_autocast


def trunk_key(backbone_fingerprint: str, trunk_blocks: int, autocast: str = "none") -> dict:
    """Feature-cache key of a trunk: the backbone's fingerprint and the number of blocks it runs. A trunk run
    under autocast (bf16 / fp16) gives other features, hence another key; "none" adds nothing."""
    check_autocast(autocast)
    key = {"backbone": backbone_fingerprint, "trunk_blocks": trunk_blocks}
    return key if autocast == "none" else {**key, "autocast": autocast}


def feature_key(backbone: Backbone, tangent_blocks: int, autocast: str = "none") -> dict:
    """Feature-cache key of the trunk for (backbone, k): the trunk is the first depth − k blocks."""
    depth = backbone.model.cfg.depth
    check_tangent_blocks(tangent_blocks, depth)
    return trunk_key(backbone.fingerprint, depth - tangent_blocks, autocast)


def cache_features(dataset: LabelledDataset, backbone: Backbone, tangent_blocks: int, *,
                   root: str | Path | None = None, dtype: torch.dtype = CACHE_DTYPE, batch_size: int = 64,
                   num_workers: int = 0, device: torch.device | str | None = None, autocast: str = "none",
                   progress: bool = True) -> CachedFeatures:
    """Trunk features of `dataset` for (backbone, k), from the feature cache or computed once and stored.
    `device`: where the trunk runs (default: the backbone's); `autocast`: "none", "bf16" or "fp16" (see
    `taft.precision`; part of the cache key, the stored dtype stays `dtype`)."""
    key = feature_key(backbone, tangent_blocks, autocast)
    where = resolve_device(device) if device is not None else backbone.device
    trunk = Trunk(backbone.model, key["trunk_blocks"]).eval().to(where)
    return FeatureCache(root).build_or_load(dataset, under_autocast(trunk, autocast, where), key, dtype=dtype,
                                            batch_size=batch_size, num_workers=num_workers, device=where,
                                            progress=progress)
