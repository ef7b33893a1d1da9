"""The model of all three methods: inputs (images or a TokenBatch) → frozen trunk → the method's tail → logits.

- taft:  the tangent tail, f_lin(h; Δw) = f(h; w0) + J(h; w0) Δw (trainable: Δw, zero at the start).
- nlft:  the same last k blocks, final norm and head as an ordinary module (trainable: all tail weights w,
         starting at w0 with the same seeded head as taft, so the two are comparable).
- probe: the frozen tail at w0 (blocks and norm as buffers) and a trainable head on its pooled features.

Every method consumes the same trunk features (the trunk is the first depth − k blocks), so one feature cache
entry serves all three for a given backbone and k. `Classifier` (alias `TangentModel`, whose default method is
taft) saves to and loads from checkpoint files (`taft.checkpoint`) with its fingerprint in the header.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from taft.backbones import load_backbone_like
from taft.backbones.base import Backbone, Preprocess, TextPreprocess, TokenBatch, preprocess_from_dict
from taft.backbones.tokenizer import TextTokenizer
from taft.checkpoint import ModelInfo, first_line, read_checkpoint, write_checkpoint
from taft.errors import FingerprintMismatchError, TaftError
from taft.fingerprint import hash_tensors
from taft.tangent import TangentTail, pool
from taft.tensors import load_checked

METHODS = ("taft", "nlft", "probe")
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
    """A plain (non-linear) encoder with a pooled linear head: what `Classifier.materialize()` returns."""

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


def check_tangent_blocks(k: int, depth: int) -> None:
    """`TaftError` unless k is an integer in 1..depth."""
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= depth:
        raise TaftError(f"tangent_blocks (k) must be in 1..{depth} for this backbone, got {k!r}")


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


def model_fingerprint(backbone_fingerprint: str, method: str, tangent_blocks: int, pooling: str,
                      head_weight0: torch.Tensor, head_bias0: torch.Tensor) -> str:
    """The model's fingerprint: a hash of the backbone's fingerprint, the method, k, the pooling and the base head
    w0_head, i.e. of everything a trained tensor is relative to."""
    return hash_tensors({"head.weight": head_weight0, "head.bias": head_bias0},
                        extra=[f"backbone={backbone_fingerprint}", f"method={method}", f"k={tangent_blocks}",
                               f"pooling={pooling}"])


def class_names_for(num_classes: int | None, class_names: Sequence[str] | None) -> list[str]:
    """The class names: `class_names`, or "0".."C-1" for `num_classes` C; checked (≥ 2, unique, agreeing)."""
    if class_names is None:
        if num_classes is None or int(num_classes) != num_classes or num_classes < 2:
            raise TaftError(f"num_classes must be an integer ≥ 2, got {num_classes}")
        return [str(i) for i in range(int(num_classes))]
    names = [str(c) for c in class_names]
    if len(names) < 2:
        raise TaftError(f"need at least 2 classes, got {len(names)}")
    if len(set(names)) != len(names):
        raise TaftError(f"class names are not unique: {names}")
    if num_classes is not None and num_classes != len(names):
        raise TaftError(f"num_classes={num_classes} but {len(names)} class names")
    return names


class Classifier(nn.Module):
    """A classifier of any method (see the module doc). Its parameters are exactly what the method trains (taft: Δw,
    zero at construction; nlft: the tail weights; probe: the head).

    Args:
        backbone: a loaded backbone (`taft.load_backbone`): a ViT (images) or a BERT encoder (TokenBatch inputs).
        num_classes: number of classes (≥ 2); or give `class_names`.
        tangent_blocks: k, how many of the last blocks form the tail (1..depth); the final norm and head always do.
        seed: seeds the random base head w0_head (used when `head_weight` is not given).
        head_weight, head_bias: base head weights (num_classes, dim) and (num_classes,), e.g. a linear-probe
            solution. Never zero: with W0_head = 0 every block tangent J·Δw would vanish.
        pooling: "cls" (token 0) or "mean".
        attn_impl: taft's tangent attention: "sdpa" (fused primal attention) or "manual" (written-out softmax).
        prune_last_block: with CLS pooling, the last block computes token 0's output only (exact; see
            `TangentTail`). False runs it in full (a reference for tests and benchmarks).
        method: "taft" (default), "nlft" or "probe".
        class_names: the classes' names (default "0".."C-1").
        train_config: the training recipe (`TrainConfig.to_dict()`), kept as metadata (checkpoints store it).

    `forward(inputs)` / `predict(inputs)` run the whole network on preprocessed images or a TokenBatch;
    `logits(features, mask)` runs only the tail on (cached) trunk features. Same device and dtype as the backbone.
    """

    def __init__(self, backbone: Backbone, num_classes: int | None = None, tangent_blocks: int = 1, seed: int = 0,
                 head_weight: torch.Tensor | None = None, head_bias: torch.Tensor | None = None,
                 pooling: str = "cls", attn_impl: str = "sdpa", prune_last_block: bool = True, *,
                 method: str = "taft", class_names: Sequence[str] | None = None,
                 train_config: Mapping[str, Any] | None = None):
        super().__init__()
        encoder = backbone.model
        cfg = encoder.cfg
        if method not in METHODS:
            raise TaftError(f"method must be one of {METHODS}, got {method!r}")
        names = class_names_for(num_classes, class_names)
        check_tangent_blocks(tangent_blocks, cfg.depth)
        if pooling not in POOLINGS:
            raise TaftError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.method = method
        self.backbone_name = backbone.name
        self.backbone_fingerprint = backbone.fingerprint
        self.preprocess: Preprocess = backbone.preprocess
        self.tokenizer = backbone.tokenizer
        self.config = cfg
        self.class_names = names
        self.num_classes, self.tangent_blocks, self.seed, self.pooling = len(names), int(tangent_blocks), seed, pooling
        self.train_config = dict(train_config) if train_config is not None else None
        head = base_head(cfg.dim, len(names), seed, head_weight, head_bias)
        self.register_buffer("head_weight0", head.weight.detach().clone())
        self.register_buffer("head_bias0", head.bias.detach().clone())
        first_tail = cfg.depth - self.tangent_blocks
        self.trunk = Trunk(encoder, first_tail)
        if method == "taft":
            self.tail: nn.Module = TangentTail({i: encoder.blocks[i] for i in range(first_tail, cfg.depth)},
                                               encoder.norm, head, pooling, attn_impl, prune_last_block)
        else:
            self.tail = PlainTail(encoder, self.tangent_blocks, head, pooling, train_body=method == "nlft",
                                  prune_last_block=prune_last_block)
        self.to(device=backbone.device, dtype=backbone.dtype)
        self.fingerprint = model_fingerprint(self.backbone_fingerprint, method, self.tangent_blocks, pooling,
                                             self.head_weight0, self.head_bias0)

    @property
    def dtype(self) -> torch.dtype:
        return self.head_weight0.dtype

    @property
    def is_text(self) -> bool:
        """A text (BERT) backbone's model, whose inputs are token batches; else an image (ViT) one's."""
        return isinstance(self.preprocess, TextPreprocess)

    @property
    def device(self) -> torch.device:
        return self.head_weight0.device

    # ------------------------------------------------------------------------------------------- computing
    def trunk_features(self, inputs: Inputs) -> torch.Tensor:
        """Frozen trunk output (B, N, D) for preprocessed images (B, C, H, W) or a TokenBatch; no gradient,
        cacheable."""
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
        """Logits from `train_inputs`."""
        return self.tail.head(inputs) if self.method == "probe" else self.tail(inputs, mask)

    def trainable_module(self) -> tuple[nn.Module, str]:
        """(the module mapping `train_inputs` to logits, the prefix of its parameters' names in `tail`)."""
        return (self.tail.head, "head.") if self.method == "probe" else (self.tail, "")

    # ------------------------------------------------------------------------------------------- trained tensors
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors only (taft: Δw; nlft: the tail weights; probe: the head), keyed like the plain
        model's weights (`blocks.11.attn.qkv.weight`, `norm.bias`, `head.weight`)."""
        return {name: p.detach().clone() for name, p in self.tail.named_parameters()}

    @cached_property
    def legacy_fingerprint(self) -> str:
        """The fingerprint that taft before the one-model redesign recorded for this model (files written then
        still load): taft hashed every base tensor of the model with k, pooling and the architecture; nlft and
        probe hashed the base head with the backbone's fingerprint, k and pooling."""
        if self.method != "taft":
            return hash_tensors({"head.weight": self.head_weight0, "head.bias": self.head_bias0},
                                extra=[f"backbone={self.backbone_fingerprint}", f"k={self.tangent_blocks}",
                                       f"pooling={self.pooling}"])
        trained = {f"tail.{n}" for n, _ in self.tail.named_parameters()}
        base = {n: t for n, t in {**self.trunk.state_dict(prefix="trunk."),
                                  **self.tail.state_dict(prefix="tail.")}.items() if n not in trained}
        return hash_tensors(base, extra=[f"k={self.tangent_blocks}", f"pooling={self.pooling}",
                                         *(f"{k}={v}" for k, v in sorted(self.config.to_dict().items()))])

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
        what = "Δw tensors" if self.method == "taft" else f"trained tensors of this {self.method} model"
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
        state = {k[len("encoder."):]: v for k, v in self.trunk.state_dict().items()}
        if self.method == "taft":
            for name, delta in self.tail.named_parameters():
                state[name] = self.tail.get_buffer(f"{name}_0") + delta.detach()
        else:
            state.update({n: t.detach() for n, t in self.tail.state_dict().items()})
        head_state = {k[len("head."):]: state.pop(k) for k in list(state) if k.startswith("head.")}
        encoder = type(self.trunk.encoder)(self.config).to(device=self.device, dtype=self.dtype)
        encoder.load_state_dict(state)
        head = nn.Linear(self.config.dim, self.num_classes).to(device=self.device, dtype=self.dtype)
        head.load_state_dict(head_state)
        return PlainClassifier(encoder, head, self.pooling).eval()


TangentModel = Classifier  # the taft case: `TangentModel(backbone, num_classes, tangent_blocks)`


class LoadedCheckpoint(NamedTuple):
    classifier: Classifier
    metadata: dict[str, Any]


def checkpoint_preprocess(path: Path, d: Any) -> Preprocess:
    """The preprocessing recorded in a checkpoint's metadata; `TaftError` when malformed."""
    try:
        return preprocess_from_dict(d)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TaftError(f"{path}: the preprocessing in the metadata is malformed ({first_line(e)})") from e


def checkpoint_tokenizer(path: Path, backbone: Backbone, preprocess: TextPreprocess) -> TextTokenizer:
    """The backbone's tokenizer with the checkpoint's max_length; TaftError when it is another tokenizer."""
    tok = backbone.tokenizer
    if tok is None or tok.sha256 != preprocess.tokenizer:
        have = "none" if tok is None else f"{tok.sha256[:12]}…"
        raise TaftError(f"{path} was trained with tokenizer {preprocess.tokenizer[:12]}…, backbone "
                        f"{backbone.name!r} has {have}")
    return tok if tok.max_length == preprocess.max_length else TextTokenizer(tok.path, preprocess.max_length)


def load_checkpoint(path: str | Path, backbone: Backbone | None = None, *,
                    device: torch.device | str | None = None) -> LoadedCheckpoint:
    """(ready classifier, metadata) from a checkpoint file. Without `backbone`, loads the one the checkpoint names
    (`load_backbone_like(name, preprocess)`). The classifier uses the checkpoint's preprocessing (image size;
    text: the same tokenizer, checked, with the checkpoint's max_length). `FingerprintMismatchError` when the
    backbone or base weights differ; any other problem is a one-line `TaftError`."""
    path = Path(path)
    file = read_checkpoint(path)
    meta = file.meta
    preprocess = checkpoint_preprocess(path, meta["preprocess"])
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
    if not isinstance(meta["train_config"], dict):
        raise TaftError(f"{path}: the training config in the metadata is malformed")
    try:
        classifier = Classifier(backbone, tangent_blocks=meta["tangent_blocks"], head_weight=file.head_weight0,
                                head_bias=file.head_bias0, pooling=meta["pooling"], method=meta["method"],
                                class_names=meta["class_names"], train_config=meta["train_config"])
    except (TaftError, TypeError, ValueError) as e:
        raise TaftError(f"{path}: cannot rebuild the model: {first_line(e)}") from e
    if not classifier.accepts_fingerprint(str(meta["fingerprint"])):
        raise FingerprintMismatchError(
            f"{path} was trained around other base weights (model fingerprint {str(meta['fingerprint'])[:12]}…) "
            f"than backbone {backbone.name!r} with k={classifier.tangent_blocks} gives ({classifier.fingerprint[:12]}…)")
    try:
        classifier.load_delta_state_dict(file.tensors)
    except TaftError as e:
        raise TaftError(f"{path}: {e}") from e
    classifier.preprocess = preprocess
    if isinstance(preprocess, TextPreprocess):
        classifier.tokenizer = checkpoint_tokenizer(path, backbone, preprocess)
    if device is not None:
        classifier = classifier.to(device)
    return LoadedCheckpoint(classifier.eval(), meta)
