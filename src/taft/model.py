"""The model of all three methods: inputs (images or a TokenBatch) → frozen trunk → the method's tail → logits.

The model is the single source of its structure: `Classifier(backbone, classes, k, method=..., pooling=...)` fixes
the method, k, pooling and base head w0_head (`taft.spec.ModelSpec`), builds the method's tail (`taft.tails`),
caches trunk features with its own trunk and preprocessing (`cache_features`), and saves to and loads from
checkpoint files (`taft.checkpoint`) with its fingerprint in the header. Every method consumes the same trunk
features (the first depth − k blocks), so one feature-cache entry serves all three for a given backbone and k.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from taft.backbones import load_backbone_like
from taft.backbones.base import Backbone, Preprocess, TextPreprocess, preprocess_from_dict
from taft.backbones.tokenizer import TextTokenizer
from taft.backbones.trunk import Inputs, PlainClassifier, Trunk, check_tangent_blocks, input_mask
from taft.checkpoint import ModelInfo, first_line, read_checkpoint, write_checkpoint
from taft.data.feature_cache import CachedFeatures, FeatureCache, LabelledDataset
from taft.data.feature_cache.key import CACHE_DTYPE
from taft.data.trunk_features import trunk_key
from taft.errors import FingerprintMismatchError, TaftError
from taft.fingerprint import legacy_fingerprint, model_fingerprint
from taft.precision import under_autocast
from taft.spec import SPEC_KEYS, ModelSpec, default_pooling
from taft.tails import base_head, make_tail
from taft.tensors import load_checked


def class_names_for(classes: int | Sequence[str] | None, class_names: Sequence[str] | None = None,
                    num_classes: int | None = None) -> list[str]:
    """The class names: the given names, or "0".."C-1" for a count C; checked (≥ 2, unique). `class_names` and
    `num_classes` are the older keywords: one of them may replace `classes`, and a count must agree."""
    classes = one_of("classes", classes, "class_names", class_names, num_classes)
    names = names_of(classes)
    if num_classes is not None and num_classes != len(names):
        raise TaftError(f"num_classes={num_classes} disagrees with the {len(names)} classes given")
    return names


def names_of(classes: int | Sequence[str] | None) -> list[str]:
    if classes is None or isinstance(classes, (bool, int, float)):
        if classes is None or isinstance(classes, bool) or int(classes) != classes or classes < 2:
            raise TaftError(f"the number of classes must be an integer ≥ 2, got {classes}")
        return [str(i) for i in range(int(classes))]
    names = [str(c) for c in classes]
    if len(names) < 2:
        raise TaftError(f"need at least 2 classes, got {len(names)}")
    if len(set(names)) != len(names):
        raise TaftError(f"class names are not unique: {names}")
    return names


def one_of(name: str, value: Any, alias: str, alias_value: Any, default: Any) -> Any:
    """`value` or its older keyword `alias` (one of them), else `default`."""
    if value is not None and alias_value is not None and value != alias_value:
        raise TaftError(f"give {name} or {alias}, not both")
    return value if value is not None else alias_value if alias_value is not None else default


class Classifier(nn.Module):
    """A classifier of any method: inputs → frozen trunk → the method's tail → logits. Its parameters are exactly
    what the method trains (taft: Δw, zero at construction; nlft: the tail weights, from w0; probe: the head).

    backbone: a loaded ViT (images) or BERT encoder (TokenBatch inputs); classes: the class names, or their number
    C (also `class_names=` / `num_classes=`); k: the last blocks forming the tail, 1..depth (also
    `tangent_blocks=`), with the final norm and head; method, pooling (default mean for text, cls for images),
    head_seed (also `seed=`), head_init: the `ModelSpec`. head_weight, head_bias: a given base head (never zero).
    attn_impl: taft's primal attention, "sdpa" (fused) or "manual"; prune_last_block=False runs the last block
    in full under CLS pooling (a reference: pruned is exact). `forward` / `predict` run the whole network;
    `logits(features, mask)` the tail on trunk features. `train_config` is the run record of the last `fit`.
    """

    def __init__(self, backbone: Backbone, classes: int | Sequence[str] | None = None, k: int | None = None, *,
                 method: str = "taft", pooling: str | None = None, head_seed: int | None = None, head_init: str = "random",
                 head_weight: torch.Tensor | None = None, head_bias: torch.Tensor | None = None,
                 attn_impl: str = "sdpa", prune_last_block: bool = True, class_names: Sequence[str] | None = None,
                 num_classes: int | None = None, tangent_blocks: int | None = None, seed: int | None = None):
        super().__init__()
        cfg = backbone.model.cfg
        k = one_of("k", k, "tangent_blocks", tangent_blocks, 1)
        check_tangent_blocks(k, cfg.depth)  # before ModelSpec, so that the error names the allowed range 1..depth
        self.spec = ModelSpec(method, k, pooling or default_pooling(backbone.is_text),
                              one_of("head_seed", head_seed, "seed", seed, 0), head_init)
        self.class_names = class_names_for(classes, class_names, num_classes)
        self.backbone = backbone  # not a submodule: the source of the tail's blocks and of `derive`
        self.backbone_name, self.backbone_fingerprint = backbone.name, backbone.fingerprint
        self.config = cfg
        self.train_config: dict[str, Any] | None = None
        self._attn_impl, self._prune = attn_impl, prune_last_block
        self.trunk = Trunk(backbone.model, cfg.depth - self.tangent_blocks)
        self.set_base_head(head_weight, head_bias)

    def set_base_head(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        """(Re)build the tail around the base head w0_head (`taft.tails.base_head`: seeded random unless `weight`
        is given); its trained tensors start afresh (taft: Δw = 0) and the fingerprint follows the new head."""
        encoder = self.backbone.model
        head = base_head(self.config.dim, self.num_classes, self.spec.head_seed, weight, bias)
        self.register_buffer("head_weight0", head.weight.detach().clone())
        self.register_buffer("head_bias0", head.bias.detach().clone())
        self.tail = make_tail(self.method, encoder, self.tangent_blocks, head, self.pooling, self._attn_impl,
                              self._prune)
        where = next(self.trunk.buffers())  # the model's device and dtype (the backbone's until moved)
        self.to(device=where.device, dtype=where.dtype)
        self.fingerprint = model_fingerprint(self.backbone_fingerprint, self.method, self.tangent_blocks,
                                             self.pooling, self.head_weight0, self.head_bias0)
        self.__dict__.pop("legacy_fingerprint", None)

    @classmethod
    def from_spec(cls, backbone: Backbone, classes: int | Sequence[str], spec: ModelSpec, **options: Any
                  ) -> Classifier:
        """The model `spec` describes, on `backbone` for `classes` (`options`: the other keywords, e.g. head_weight)."""
        return cls(backbone, classes, spec.tangent_blocks, method=spec.method, pooling=spec.pooling,
                   head_seed=spec.head_seed, head_init=spec.head_init, **options)

    def derive(self, **spec: Any) -> Classifier:
        """A fresh model on the same backbone and classes with some `ModelSpec` fields changed (e.g.
        `method="probe"`), and the same base head unless `head_seed` changes."""
        if set(spec) - set(SPEC_KEYS):
            raise TaftError(f"derive takes ModelSpec fields {SPEC_KEYS}, got {sorted(set(spec) - set(SPEC_KEYS))}")
        new = replace(self.spec, **spec)
        head = ((self.head_weight0, self.head_bias0) if new.head_seed == self.spec.head_seed else (None, None))
        return Classifier.from_spec(self.backbone, self.class_names, new, head_weight=head[0], head_bias=head[1],
                                    attn_impl=self._attn_impl, prune_last_block=self._prune).to(self.device)

    method = property(lambda self: self.spec.method)
    tangent_blocks = property(lambda self: self.spec.tangent_blocks)
    pooling = property(lambda self: self.spec.pooling)
    seed = property(lambda self: self.spec.head_seed)
    num_classes = property(lambda self: len(self.class_names))
    dtype = property(lambda self: self.head_weight0.dtype)
    device = property(lambda self: self.head_weight0.device)
    preprocess: Preprocess = property(lambda self: self.backbone.preprocess)  # type: ignore[assignment]
    tokenizer: TextTokenizer | None = property(lambda self: self.backbone.tokenizer)  # type: ignore[assignment]
    is_text = property(lambda self: isinstance(self.preprocess, TextPreprocess), doc="a text (BERT) model")

    # ------------------------------------------------------------------------------------------- computing
    def trunk_features(self, inputs: Inputs) -> torch.Tensor:
        """Frozen trunk output (B, N, D) for preprocessed images (B, C, H, W) or a TokenBatch; no gradient."""
        return self.trunk(inputs.to(self.device, self.dtype))

    def logits(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from trunk features (B, N, D) (e.g. cached ones) and their mask (text)."""
        return self.tail(features.to(self.device, self.dtype), None if mask is None else mask.to(self.device))

    def forward(self, inputs: Inputs) -> torch.Tensor:
        """Logits for preprocessed images or a TokenBatch (taft: of f_lin)."""
        return self.logits(self.trunk_features(inputs), input_mask(inputs))

    @torch.no_grad()
    def predict(self, inputs: Inputs) -> torch.Tensor:
        """Predicted class indices (B,) for preprocessed images (B, C, H, W) or a TokenBatch."""
        return self(inputs).argmax(-1)

    def train_inputs(self, features: torch.Tensor,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(what `train_logits` consumes, its mask) for trunk features: the features themselves, or a probe's
        pooled frozen features (computed once, no gradient, no mask)."""
        return self.tail.train_inputs(features.to(self.device, self.dtype),
                                      None if mask is None else mask.to(self.device))

    def train_logits(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from `train_inputs`."""
        return self.tail.train_logits(inputs, mask)

    def trainable_module(self) -> tuple[nn.Module, str]:
        """(the module `train_logits` calls, the prefix of its parameters' names in `tail`)."""
        return self.tail.trainable_module()

    def cache_features(self, dataset: LabelledDataset, *, autocast: str = "none", batch_size: int = 64,
                       dtype: torch.dtype = CACHE_DTYPE, root: str | Path | None = None,
                       progress: bool = True) -> CachedFeatures:
        """Trunk features of `dataset` from the feature cache, or computed once with this model's trunk on its
        device and stored. An image dataset without a transform gets this model's preprocessing. `autocast`:
        "none", "bf16" or "fp16" (`taft.precision`; part of the cache key)."""
        if getattr(dataset, "transform", ()) is None:
            dataset = dataset.with_transform(self.preprocess)
        key = trunk_key(self.backbone_fingerprint, self.config.depth - self.tangent_blocks, autocast)
        return FeatureCache(root).build_or_load(dataset, under_autocast(self.trunk, autocast, self.device), key,
                                                dtype=dtype, batch_size=batch_size, device=self.device,
                                                progress=progress)

    # ------------------------------------------------------------------------------------------- trained tensors
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors only (taft: Δw; nlft: the tail weights; probe: the head), keyed like the plain
        model's weights (`blocks.11.attn.qkv.weight`, `norm.bias`, `head.weight`)."""
        return {name: p.detach().clone() for name, p in self.tail.named_parameters()}

    @cached_property
    def legacy_fingerprint(self) -> str:
        """The fingerprint files written before the one-model redesign recorded (`taft.fingerprint`)."""
        def base() -> dict[str, torch.Tensor]:
            trained = {f"tail.{n}" for n, _ in self.tail.named_parameters()}
            return {n: t for n, t in {**self.trunk.state_dict(prefix="trunk."),
                                      **self.tail.state_dict(prefix="tail.")}.items() if n not in trained}
        return legacy_fingerprint(self.method, self.backbone_fingerprint, self.tangent_blocks, self.pooling,
                                  self.head_weight0, self.head_bias0, base, self.config.to_dict())

    def accepts_fingerprint(self, fingerprint: str) -> bool:
        """Whether tensors recorded with `fingerprint` were trained around this model's base weights."""
        return fingerprint == self.fingerprint or fingerprint == self.legacy_fingerprint

    def check_fingerprint(self, fingerprint: str) -> None:
        """`FingerprintMismatchError` unless `accepts_fingerprint(fingerprint)`."""
        if not self.accepts_fingerprint(fingerprint):
            raise FingerprintMismatchError(
                f"these tensors were trained around other base weights (fingerprint {fingerprint[:12]}…) than this "
                f"model ({self.fingerprint[:12]}…: backbone {self.backbone_name}, {self.method}, "
                f"k={self.tangent_blocks}); load them into the model they were trained with")

    def load_delta_state_dict(self, delta: Mapping[str, torch.Tensor] | str | Path, *,
                              fingerprint: str | None = None) -> None:
        """Load trained tensors (`trainable_state_dict()` of a model with the same base weights), or those of the
        checkpoint file at `delta`. The fingerprint they were made with (given, or read from the file) is checked;
        so are names, shapes and finiteness, all before anything changes."""
        if isinstance(delta, (str, Path)):
            file = read_checkpoint(delta)
            self.check_fingerprint(file.fingerprint)
            delta = file.tensors
        if fingerprint is not None:
            self.check_fingerprint(fingerprint)
        what = f"trained tensors of this {self.method} model"
        load_checked(dict(self.tail.named_parameters()), {k: t.to(self.dtype) for k, t in delta.items()}, what)

    def info(self) -> ModelInfo:
        """What identifies this model apart from its trained tensors (as checkpoints and stores record it)."""
        return ModelInfo(self.method, self.backbone_name, self.backbone_fingerprint, self.fingerprint,
                         self.tangent_blocks, self.pooling, tuple(self.class_names),
                         json.loads(json.dumps(self.preprocess.to_dict())), str(self.dtype).removeprefix("torch."))

    # ------------------------------------------------------------------------------------------- files
    def save(self, path: str | Path, *, train_ids: Sequence[str] | None = None, n_train: int | None = None,
             metrics: Mapping[str, Any] | None = None, privacy: Mapping[str, Any] | None = None) -> Path:
        """Write the trained tensors, base head and metadata (fingerprint, method, classes, preprocessing, training
        config) to the checkpoint file `path` atomically; returns the path. `train_ids`: the training examples'
        ids (kept for forgetting; None when unknown, then `n_train` gives their count). `privacy`: the privacy
        ledger of a private run."""
        return write_checkpoint(path, self.info(), self.trainable_state_dict(), self.head_weight0,
                                self.head_bias0, train_config=self.train_config or {}, ids=train_ids,
                                count=n_train, metrics=metrics, extra={"privacy": dict(privacy)} if privacy else None)

    @classmethod
    def load(cls, path: str | Path, backbone: Backbone | None = None, *,
             device: torch.device | str | None = None) -> Classifier:
        """The model saved at `path` (its metadata: `load_checkpoint`)."""
        return load_checkpoint(path, backbone, device=device).classifier

    def materialize(self) -> PlainClassifier:
        """A plain non-linear model with the trained weights (taft: w0 + Δw), same dtype and device as this one."""
        return PlainClassifier.assemble(self.trunk, self.tail.weights(), self.pooling)


TangentModel = Classifier  # the taft case: `TangentModel(backbone, num_classes, tangent_blocks)`


class LoadedCheckpoint(NamedTuple):
    classifier: Classifier
    metadata: dict[str, Any]


def checkpoint_backbone(path: Path, meta: Mapping[str, Any], backbone: Backbone | None) -> Backbone:
    """The backbone a checkpoint was trained on (`backbone`, or the one it names), with the checkpoint's
    preprocessing (image size; text: the same tokenizer, checked, at the checkpoint's max_length)."""
    try:
        preprocess = preprocess_from_dict(meta["preprocess"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TaftError(f"{path}: the preprocessing in the metadata is malformed ({first_line(e)})") from e
    want_fp = str(meta["backbone_fingerprint"])
    if backbone is None:
        try:
            backbone = load_backbone_like(meta["backbone"], preprocess)
        except TaftError as e:
            raise TaftError(f"{path} needs backbone {meta['backbone']!r}, which cannot be loaded: {e}") from e
    if backbone.fingerprint != want_fp:
        raise FingerprintMismatchError(
            f"{path} was trained on backbone {meta['backbone']!r} (fingerprint {want_fp[:12]}…), not on "
            f"{backbone.name!r} ({backbone.fingerprint[:12]}…); load it with that backbone")
    tok = backbone.tokenizer
    if isinstance(preprocess, TextPreprocess):
        if tok is None or tok.sha256 != preprocess.tokenizer:
            have = "none" if tok is None else f"{tok.sha256[:12]}…"
            raise TaftError(f"{path} was trained with tokenizer {preprocess.tokenizer[:12]}…, backbone "
                            f"{backbone.name!r} has {have}")
        if tok.max_length != preprocess.max_length:
            tok = TextTokenizer(tok.path, preprocess.max_length)
    return replace(backbone, preprocess=preprocess, tokenizer=tok)


def load_checkpoint(path: str | Path, backbone: Backbone | None = None, *,
                    device: torch.device | str | None = None) -> LoadedCheckpoint:
    """(ready classifier, metadata) from a checkpoint file. Without `backbone`, loads the one the checkpoint names
    (`load_backbone_like(name, preprocess)`); the classifier has the checkpoint's preprocessing.
    `FingerprintMismatchError` when the backbone or base weights differ; any other problem is a one-line
    `TaftError`."""
    path = Path(path)
    file = read_checkpoint(path)
    meta = file.meta
    backbone = checkpoint_backbone(path, meta, backbone)
    if not isinstance(meta["train_config"], dict):
        raise TaftError(f"{path}: the training config in the metadata is malformed")
    head_init = meta["train_config"].get("head_init", "random")
    try:
        classifier = Classifier(backbone, meta["class_names"], meta["tangent_blocks"], method=meta["method"],
                                pooling=meta["pooling"], head_weight=file.head_weight0, head_bias=file.head_bias0,
                                head_init=head_init if meta["method"] != "probe" else "random")
    except (TaftError, TypeError, ValueError) as e:
        raise TaftError(f"{path}: cannot rebuild the model: {first_line(e)}") from e
    classifier.train_config = meta["train_config"]
    if not classifier.accepts_fingerprint(str(meta["fingerprint"])):
        raise FingerprintMismatchError(
            f"{path} was trained around other base weights (model fingerprint {str(meta['fingerprint'])[:12]}…) "
            f"than backbone {backbone.name!r} with k={classifier.tangent_blocks} gives ({classifier.fingerprint[:12]}…)")
    try:
        classifier.load_delta_state_dict(file.tensors)
    except TaftError as e:
        raise TaftError(f"{path}: {e}") from e
    if device is not None:
        classifier = classifier.to(device)
    return LoadedCheckpoint(classifier.eval(), meta)
