"""Trunk features through the feature cache: the frozen first depth − k blocks of a backbone, run once per
dataset and reused by every method, epoch, shard and run (`taft.data.feature_cache` stores them)."""

from __future__ import annotations

from pathlib import Path

import torch

from taft.backbones.base import Backbone
from taft.data.feature_cache import CachedFeatures, FeatureCache, LabelledDataset
from taft.devices import resolve_device
from taft.model import Classifier, Trunk, check_tangent_blocks
from taft.precision import check_autocast, under_autocast


def feature_key(backbone: Backbone, tangent_blocks: int, autocast: str = "none") -> dict:
    """Feature-cache key of the trunk for (backbone, k): the trunk is the first depth − k blocks. A trunk run under
    autocast (bf16 / fp16) gives other features, hence another key; "none" adds nothing (the key stays as before)."""
    depth = backbone.model.cfg.depth
    check_tangent_blocks(tangent_blocks, depth)
    return autocast_key({"backbone": backbone.fingerprint, "trunk_blocks": depth - tangent_blocks}, autocast)


def autocast_key(key: dict, autocast: str) -> dict:
    """`key` for features computed under `autocast`: unchanged for "none", else with an "autocast" entry."""
    check_autocast(autocast)
    return key if autocast == "none" else {**key, "autocast": autocast}


def cache_features(dataset: LabelledDataset, backbone: Backbone, tangent_blocks: int, *,
                   root: str | Path | None = None, dtype: torch.dtype = torch.float32, batch_size: int = 64,
                   num_workers: int = 0, device: torch.device | str | None = None, autocast: str = "none",
                   progress: bool = True) -> CachedFeatures:
    """Trunk features of `dataset` for (backbone, k), from the feature cache or computed once and stored.
    `device`: where the trunk runs (default: the backbone's); `autocast`: "none", "bf16" or "fp16" (see
    `taft.precision`; part of the cache key, the stored dtype stays `dtype`)."""
    key = feature_key(backbone, tangent_blocks, autocast)
    trunk = Trunk(backbone.model, key["trunk_blocks"]).eval()
    where = resolve_device(device) if device is not None else backbone.device
    trunk = trunk.to(where)
    return FeatureCache(root).build_or_load(dataset, under_autocast(trunk, autocast, where), key, dtype=dtype,
                                            batch_size=batch_size, num_workers=num_workers, device=where,
                                            progress=progress)


def model_features(model: Classifier, dataset: LabelledDataset, *, autocast: str = "none",
                   progress: bool = True) -> CachedFeatures:
    """Trunk features of `dataset` through the feature cache, computed with `model`'s own trunk on its device
    (the same cache entry `cache_features(dataset, backbone, k, autocast=autocast)` uses), so no second backbone
    is loaded."""
    key = {"backbone": model.backbone_fingerprint, "trunk_blocks": model.config.depth - model.tangent_blocks}
    trunk = under_autocast(model.trunk, autocast, model.device)
    return FeatureCache().build_or_load(dataset, trunk, autocast_key(key, autocast), device=model.device,
                                        progress=progress)
