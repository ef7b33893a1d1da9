"""Checkpoints: only what was trained, as safetensors, with everything needed to rebuild and check the model.

Tensors: the trained ones under their plain-model names (taft: Δw, e.g. `blocks.11.attn.qkv.weight`,
`head.weight`; nlft: the trained tail weights w; probe: `head.weight`, `head.bias`), plus the base head
w0_head as `w0.head.weight` and `w0.head.bias` (a few thousand values; it makes the file independent of how a
random head is drawn and carries a linear-probe head init).

Metadata: one JSON object under the safetensors metadata key "taft":
    format ("taft-checkpoint"), format_version, method, backbone (name), backbone_fingerprint, fingerprint
    (the model's: `TangentModel.fingerprint` for taft, a hash of backbone + k + pooling + w0_head for nlft and
    probe), tangent_blocks, pooling, class_names, preprocess (`ImagePreprocess` or `TextPreprocess` `.to_dict()`), train_config,
    data {count, ids_sha256, ids} (the training example ids, in training-data order), metrics (optional),
    versions {taft, torch, safetensors}, created (ISO time: so two files of equal models differ in their bytes;
    `content_sha256` hashes the tensors alone and is what `taft info` and stores show as a model's identity), and for a DP-SGD run privacy (the privacy ledger,
    `taft.privacy.PrivacyLedger.to_dict()`: mechanism, ε, δ, σ, q, steps, C, accountant, n, library versions,
    notes on what the guarantee does not cover).

`load_checkpoint` checks everything and names any problem in a one-line `TaftError`
(`FingerprintMismatchError` when the backbone or base weights differ).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import safetensors
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import taft
from taft.backbones import load_backbone_like
from taft.backbones.base import Backbone, Preprocess, TextPreprocess, preprocess_from_dict
from taft.errors import FingerprintMismatchError, TaftError
from taft.fileio import atomic_write
from taft.tensors import device_free
from taft.train.classifier import Classifier, build_classifier
from taft.train.config import TrainConfig

FORMAT = "taft-checkpoint"
FORMAT_VERSION = 1
META_KEY = "taft"
BASE_PREFIX = "w0."
MAX_IDS_JSON = 64 * 2**20  # safetensors headers are limited to 100 MB; past this only the ids' hash is kept
REQUIRED = ("method", "backbone", "backbone_fingerprint", "fingerprint", "class_names", "preprocess",
            "train_config", "data")


class LoadedCheckpoint(NamedTuple):
    classifier: Classifier
    metadata: dict[str, Any]


def ids_digest(ids: Sequence[str]) -> str:
    """SHA-256 of the example ids, in order (JSON list, UTF-8)."""
    return hashlib.sha256(json.dumps(list(ids), ensure_ascii=False).encode()).hexdigest()


def content_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors alone (names, dtypes, shapes and values, in name order): the identity of a model's
    weights, equal for equal models whatever the file's metadata (e.g. its `created` time)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_content_sha256(path: str | Path) -> str:
    """`content_sha256` of the tensors in the checkpoint file at `path` (metadata excluded)."""
    return content_sha256(read_safetensors(Path(path))[1])


def save_checkpoint(path: str | Path, classifier: Classifier, *, train_ids: Sequence[str] | None,
                    n_train: int | None = None, metrics: dict[str, Any] | None = None,
                    privacy: dict[str, Any] | None = None) -> Path:
    """Write `classifier`'s trained tensors and metadata to `path` atomically; returns the path.

    `train_ids`: the ids of the training examples (kept for forgetting); None when unknown, then `n_train`
    gives the count. `privacy`: the privacy ledger of a private run (stored under the metadata key "privacy")."""
    path = Path(path)
    ids = None if train_ids is None else [str(i) for i in train_ids]
    data: dict[str, Any] = {"count": len(ids) if ids is not None else n_train,
                            "ids_sha256": ids_digest(ids) if ids is not None else None, "ids": ids}
    if ids is not None and len(json.dumps(ids, ensure_ascii=False).encode()) > MAX_IDS_JSON:
        data["ids"] = None  # too large for a safetensors header: keep count and hash
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "method": classifier.method,
        "backbone": classifier.backbone_name, "backbone_fingerprint": classifier.backbone_fingerprint,
        "fingerprint": classifier.fingerprint, "tangent_blocks": classifier.tangent_blocks,
        "pooling": classifier.pooling, "class_names": list(classifier.class_names),
        "preprocess": classifier.preprocess.to_dict(), "train_config": classifier.train_config.to_dict(),
        "data": data, "metrics": metrics,
        "versions": {"taft": taft.__version__, "torch": torch.__version__, "safetensors": safetensors.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if privacy is not None:
        meta["privacy"] = privacy
    tensors = {name: t.detach() for name, t in classifier.trained_state_dict().items()}
    tensors[f"{BASE_PREFIX}head.weight"] = classifier.head_weight0.detach()
    tensors[f"{BASE_PREFIX}head.bias"] = classifier.head_bias0.detach()
    tensors = device_free(tensors)
    header = {META_KEY: json.dumps(meta, ensure_ascii=False, allow_nan=False)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def read_safetensors(path: Path, *, tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(header metadata, tensors) of the checkpoint file at `path`, unchecked; the tensors are {} when `tensors`
    is False. `TaftError` if the file is missing, not a safetensors file, corrupt or truncated."""
    if not path.is_file():
        raise TaftError(f"no checkpoint file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            found = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118 (no iterator)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise TaftError(f"cannot read checkpoint {path}: not a valid safetensors file, corrupt or truncated "
                        f"({_first_line(e)})") from e
    return header, found


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    header, tensors = read_safetensors(path)
    return _metadata(path, header), tensors


def _metadata(path: Path, header: dict[str, str]) -> dict[str, Any]:
    if META_KEY not in header:
        raise TaftError(f"{path} is not a taft checkpoint (a safetensors file without taft metadata)")
    try:
        meta = json.loads(header[META_KEY])
    except ValueError as e:
        raise TaftError(f"{path}: the taft metadata is corrupt ({_first_line(e)})") from e
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT:
        raise TaftError(f"{path} is not a taft checkpoint (metadata format {fmt!r}, expected {FORMAT!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise TaftError(f"{path} has checkpoint format version {version!r}; this taft ({taft.__version__}) reads "
                        f"version {FORMAT_VERSION} (a newer taft may read it)")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise TaftError(f"{path}: the taft metadata lacks {missing}")
    return meta


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint (checked for format and version), without building a model."""
    path = Path(path)
    header, _ = read_safetensors(path, tensors=False)
    return _metadata(path, header)


def _preprocess(path: Path, d: Any) -> Preprocess:
    try:
        return preprocess_from_dict(d)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TaftError(f"{path}: the preprocessing in the metadata is malformed ({_first_line(e)})") from e


def _tokenizer(path: Path, backbone: Backbone, preprocess: TextPreprocess):
    """The backbone's tokenizer with the checkpoint's max_length; TaftError when it is another tokenizer."""
    from taft.backbones.tokenizer import TextTokenizer

    tok = backbone.tokenizer
    if tok is None or tok.sha256 != preprocess.tokenizer:
        have = "none" if tok is None else f"{tok.sha256[:12]}…"
        raise TaftError(f"{path} was trained with tokenizer {preprocess.tokenizer[:12]}…, backbone "
                        f"{backbone.name!r} has {have}")
    return tok if tok.max_length == preprocess.max_length else TextTokenizer(tok.path, preprocess.max_length)


def load_checkpoint(path: str | Path, backbone: Backbone | None = None, *,
                    device: torch.device | str | None = None) -> LoadedCheckpoint:
    """(ready classifier, metadata) from a checkpoint. Without `backbone`, loads the one the checkpoint names
    (`load_backbone_like(name, preprocess)`). The classifier uses the checkpoint's preprocessing (image size;
    text: the same tokenizer, checked, with the checkpoint's max_length)."""
    path = Path(path)
    meta, tensors = _read(path)
    config = TrainConfig.from_dict(meta["train_config"])
    preprocess = _preprocess(path, meta["preprocess"])
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
    base_keys = [f"{BASE_PREFIX}head.weight", f"{BASE_PREFIX}head.bias"]
    absent = [k for k in base_keys if k not in tensors]
    if absent:
        raise TaftError(f"{path}: checkpoint is missing tensors {absent}")
    nonfloat = sorted(k for k, t in tensors.items() if not t.is_floating_point())
    if nonfloat:
        raise TaftError(f"{path}: tensors {nonfloat[:5]} are not floating point")
    w0, b0 = (tensors.pop(k) for k in base_keys)
    if not (torch.isfinite(w0).all() and torch.isfinite(b0).all()):
        raise TaftError(f"{path}: the base head holds NaN or infinite values")
    try:
        classifier = build_classifier(config, backbone, meta["class_names"], head_weight=w0, head_bias=b0)
    except TaftError as e:
        raise TaftError(f"{path}: cannot rebuild the model: {e}") from e
    if classifier.fingerprint != meta["fingerprint"]:
        raise FingerprintMismatchError(
            f"{path} was trained around other base weights (model fingerprint {str(meta['fingerprint'])[:12]}…) "
            f"than backbone {backbone.name!r} with k={config.tangent_blocks} gives ({classifier.fingerprint[:12]}…)")
    try:
        classifier.load_trained_state_dict({k: t.to(classifier.dtype) for k, t in tensors.items()})
    except TaftError as e:
        raise TaftError(f"{path}: {e}") from e
    classifier.preprocess = preprocess
    if isinstance(preprocess, TextPreprocess):
        classifier.tokenizer = _tokenizer(path, backbone, preprocess)
    if device is not None:
        classifier = classifier.to(device)
    return LoadedCheckpoint(classifier.eval(), meta)
