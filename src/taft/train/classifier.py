"""One classifier for the three methods: inputs (images or a TokenBatch) → frozen trunk → the method's tail →
logits.

- taft:  the tangent tail of a `TangentModel` (trainable: Δw, zero at the start).
- nlft:  the same last k blocks, final norm and head as an ordinary module (trainable: all tail weights w,
         starting at w0 with the same seeded head as taft, so the two are comparable).
- probe: the frozen tail at w0 (blocks and norm as buffers) and a trainable head on its pooled features.

Every method consumes the same cached trunk features (the trunk is the first depth − k blocks), so one feature
cache entry (`cache_features`) serves all three for a given backbone and k.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from taft.backbones.base import Backbone, Preprocess
from taft.data.feature_cache import CachedFeatures, FeatureCache, LabelledDataset
from taft.devices import resolve_device
from taft.errors import TaftError
from taft.fingerprint import hash_tensors
from taft.model import Inputs, TangentModel, Trunk, input_mask, params_to_buffers
from taft.precision import check_autocast, under_autocast
from taft.tangent import pool
from taft.tensors import load_checked
from taft.train.config import TrainConfig


class PlainTail(nn.Module):
    """The last k blocks of an encoder (copies, keyed by their backbone index), the final norm (ViT; BERT has
    none), pooling and a head.

    With `train_body=False` the blocks and norm become frozen buffers (the probe's frozen network); only the
    head is a parameter. Parameter names match the plain model's (`blocks.11.attn.qkv.weight`, `head.bias`).
    With CLS pooling the last block computes token 0's output only (exact, as in `TangentTail`);
    `prune_last_block=False` runs it in full.
    """

    def __init__(self, encoder: nn.Module, tangent_blocks: int, head: nn.Linear, pooling: str = "cls",
                 train_body: bool = True, prune_last_block: bool = True):
        super().__init__()
        depth = encoder.cfg.depth
        self.blocks = nn.ModuleDict({str(i): copy.deepcopy(encoder.blocks[i])
                                     for i in range(depth - tangent_blocks, depth)})
        self.norm = copy.deepcopy(encoder.norm)
        body = [m for m in (self.blocks, self.norm) if m is not None]
        for m in body:
            if train_body:
                m.requires_grad_(True)
            else:
                params_to_buffers(m)
        self.head = head
        self.pooling = pooling
        self.prune_last_block = prune_last_block and pooling == "cls"

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.norm is None else self.norm(x)

    def pooled(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled, final-normed features (B, D) of trunk features (B, N, D)."""
        x = features
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks.values()):
            x = block(x, mask, cls_only=self.prune_last_block and i == last)
        if self.pooling == "cls":  # LayerNorm is per token: norm(x)[:, 0] = norm(x[:, 0])
            return self._norm(x[:, 0])
        return pool(self._norm(x), self.pooling, mask)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.pooled(features, mask))


def feature_key(backbone: Backbone, tangent_blocks: int, autocast: str = "none") -> dict:
    """Feature-cache key of the trunk for (backbone, k): the trunk is the first depth − k blocks. A trunk run under
    autocast (bf16 / fp16) gives other features, hence another key; "none" adds nothing (the key stays as before)."""
    depth = backbone.model.cfg.depth
    _check_k(tangent_blocks, depth)
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


class Classifier(nn.Module):
    """A trained (or trainable) classifier of any method. Its parameters are exactly what the method trains.

    `forward(inputs)` / `predict(inputs)` run the whole network on preprocessed images or a TokenBatch;
    `logits(features, mask)` runs only the tail on cached trunk features. `trained_state_dict()` is what a
    checkpoint stores.
    """

    def __init__(self, method: str, trunk: Trunk, tail: nn.Module, *, backbone: Backbone,
                 class_names: Sequence[str], config: TrainConfig, fingerprint: str, head_weight0: torch.Tensor,
                 head_bias0: torch.Tensor):
        super().__init__()
        self.method = method
        self.trunk, self.tail = trunk, tail
        self.backbone_name = backbone.name
        self.backbone_fingerprint = backbone.fingerprint
        self.preprocess: Preprocess = backbone.preprocess
        self.tokenizer = backbone.tokenizer
        self.class_names = [str(c) for c in class_names]
        self.num_classes = len(self.class_names)
        self.tangent_blocks = config.tangent_blocks
        self.pooling = config.pooling
        self.train_config = config
        self.fingerprint = fingerprint
        self.feature_key = feature_key(backbone, config.tangent_blocks)
        self.register_buffer("head_weight0", head_weight0.detach().clone())
        self.register_buffer("head_bias0", head_bias0.detach().clone())

    @property
    def dtype(self) -> torch.dtype:
        return self.head_weight0.dtype

    @property
    def device(self) -> torch.device:
        return self.head_weight0.device

    def trunk_features(self, inputs: Inputs) -> torch.Tensor:
        """Frozen trunk output (B, N, D) for preprocessed images or a TokenBatch; no gradient, cacheable."""
        return self.trunk(inputs.to(self.device, self.dtype))

    def cached_features(self, dataset: LabelledDataset, *, autocast: str = "none",
                        progress: bool = True) -> CachedFeatures:
        """Trunk features of `dataset` through the feature cache, computed with this classifier's own trunk on its
        device (the same cache entry `cache_features(dataset, backbone, k, autocast=autocast)` uses), so no second
        backbone is loaded."""
        trunk = under_autocast(self.trunk, autocast, self.device)
        return FeatureCache().build_or_load(dataset, trunk, autocast_key(self.feature_key, autocast),
                                            device=self.device, progress=progress)

    def logits(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from trunk features (B, N, D) (e.g. cached ones)."""
        return self.tail(features.to(self.device, self.dtype), mask)

    def forward(self, inputs: Inputs) -> torch.Tensor:
        mask = input_mask(inputs)
        return self.logits(self.trunk_features(inputs), None if mask is None else mask.to(self.device))

    @torch.no_grad()
    def predict(self, inputs: Inputs) -> torch.Tensor:
        """Predicted class indices (B,) for preprocessed images (B, C, H, W) or a TokenBatch."""
        return self(inputs).argmax(-1)

    # What the trainer uses: inputs that do not change during training are computed once.
    def train_inputs(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """What `train_logits` consumes: the pooled frozen features for a probe (no gradient), else the trunk
        features themselves (with their `mask`, passed to `train_logits` too)."""
        features = features.to(self.device, self.dtype)
        if self.method == "probe":
            with torch.no_grad():
                return self.tail.pooled(features, None if mask is None else mask.to(self.device))
        return features

    def train_logits(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.tail.head(inputs) if self.method == "probe" else self.tail(inputs, mask)

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors only (taft: Δw; nlft: the tail weights; probe: the head), plain-model names."""
        return {name: p.detach().clone() for name, p in self.tail.named_parameters()}

    def load_trained_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load `trained_state_dict()` tensors; checks names, shapes and finiteness before changing anything."""
        load_checked(dict(self.tail.named_parameters()), state, f"trained tensors of this {self.method} model")


def _check_k(k: int, depth: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= depth:
        raise TaftError(f"tangent_blocks (k) must be in 1..{depth} for this backbone, got {k!r}")


def build_classifier(config: TrainConfig, backbone: Backbone, class_names: Sequence[str], *,
                     head_weight: torch.Tensor | None = None,
                     head_bias: torch.Tensor | None = None) -> Classifier:
    """A fresh classifier for `config.method` around `backbone`'s pretrained weights w0.

    The base head w0_head is `random_head(dim, C, config.head_seed)` unless `head_weight` (and optionally
    `head_bias`) is given, identically for all methods. Same device and dtype as the backbone.
    """
    encoder = backbone.model
    cfg = encoder.cfg
    if len(class_names) < 2:
        raise TaftError(f"need at least 2 classes, got {len(class_names)}")
    if len(set(class_names)) != len(class_names):
        raise TaftError(f"class names are not unique: {list(class_names)}")
    k = config.tangent_blocks
    _check_k(k, cfg.depth)
    n_cls = len(class_names)
    if config.method == "taft":
        model = TangentModel(backbone, n_cls, tangent_blocks=k, seed=config.head_seed, head_weight=head_weight,
                             head_bias=head_bias, pooling=config.pooling)
        trunk, tail, fingerprint = model.trunk, model.tail, model.fingerprint
        w0, b0 = tail.head.weight_0, tail.head.bias_0
    else:
        head = TangentModel._base_head(cfg.dim, n_cls, config.head_seed, head_weight, head_bias)
        w0, b0 = head.weight.detach().clone(), head.bias.detach().clone()
        trunk = Trunk(encoder, cfg.depth - k)
        tail = PlainTail(encoder, k, head, config.pooling, train_body=config.method == "nlft")
        fingerprint = hash_tensors({"head.weight": w0, "head.bias": b0},
                                   extra=[f"backbone={backbone.fingerprint}", f"k={k}", f"pooling={config.pooling}"])
    clf = Classifier(config.method, trunk, tail, backbone=backbone, class_names=class_names, config=config,
                     fingerprint=fingerprint, head_weight0=w0, head_bias0=b0)
    return clf.to(device=backbone.device, dtype=backbone.dtype).eval()
