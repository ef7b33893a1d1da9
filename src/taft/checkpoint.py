"""Checkpoint files: only what was trained, as safetensors, with everything needed to rebuild and check the model.

One writer (`write_checkpoint`) and one reader with one validator (`read_checkpoint`) serve run checkpoints, shard
files and composed stores; they work on tensors and metadata alone (no backbone, no model), so composition and
stores need no training code. Building a model from a file is `taft.model.load_checkpoint` / `Classifier.load`.

Tensors: the trained ones under their plain-model names (taft: Δw, e.g. `blocks.11.attn.qkv.weight`,
`head.weight`; nlft: the trained tail weights w; probe: `head.weight`, `head.bias`), plus the base head
w0_head as `w0.head.weight` and `w0.head.bias` (a few thousand values; it makes the file independent of how a
random head is drawn and carries a linear-probe head init).

Metadata: one JSON object under the safetensors metadata key "taft":
    format ("taft-checkpoint"), format_version, method, backbone (name), backbone_fingerprint, fingerprint
    (the model's, `Classifier.fingerprint`: a hash of backbone fingerprint, method, k, pooling and w0_head; files
    written before it record an older formula, still accepted: `Classifier.accepts_fingerprint`), tangent_blocks,
    pooling, class_names, preprocess (`ImagePreprocess` or `TextPreprocess` `.to_dict()`), train_config, data
    {count, ids_sha256, ids} (the training example ids, in training-data order), metrics (optional), versions
    {taft, torch, safetensors}, created (ISO time: so two files of equal models differ in their bytes),
    content_sha256 (`content_sha256` of every tensor in the file, the base head included: what `taft info` and stores
    show as a model's identity, and what the reader checks the tensors against; files written before it lack it), and
    for a DP-SGD run privacy (the privacy ledger, `taft.privacy.PrivacyLedger.to_dict()`: mechanism, ε, δ, σ, q,
    steps, C, accountant, n, library versions, notes on what the guarantee does not cover); shard files add
    "shard", composed files "composition".

`read_checkpoint` checks everything it can without a model and names any problem in a one-line `TaftError`; a file
whose tensors do not hash to their recorded content_sha256 (a flipped bit, a bad disk) is named as damaged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from taft.errors import TaftError
from taft.fileio import atomic_write, now
from taft.tensors import device_free
from taft.version import __version__

FORMAT = "taft-checkpoint"
FORMAT_VERSION = 1
META_KEY = "taft"
BASE_PREFIX = "w0."
HEAD_W0 = f"{BASE_PREFIX}head.weight"
HEAD_B0 = f"{BASE_PREFIX}head.bias"
MAX_IDS_JSON = 64 * 2**20  # safetensors headers are limited to 100 MB; past this only the ids' hash is kept
REQUIRED = ("method", "backbone", "backbone_fingerprint", "fingerprint", "tangent_blocks", "pooling", "class_names",
            "preprocess", "train_config", "data")


@dataclass(frozen=True)
class ModelInfo:
    """What identifies a model apart from its trained tensors (the checkpoint metadata fields of that name)."""

    method: str
    backbone: str
    backbone_fingerprint: str
    fingerprint: str
    tangent_blocks: int
    pooling: str
    class_names: tuple[str, ...]
    preprocess: dict[str, Any]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelInfo:
        try:
            return cls(str(d["method"]), str(d["backbone"]), str(d["backbone_fingerprint"]), str(d["fingerprint"]),
                       int(d["tangent_blocks"]), str(d["pooling"]), tuple(str(c) for c in d["class_names"]),
                       dict(d["preprocess"]), str(d["dtype"]))
        except (KeyError, TypeError, ValueError) as e:
            raise TaftError(f"malformed model description ({type(e).__name__}: {e})") from e

    @property
    def torch_dtype(self) -> torch.dtype:
        dt = getattr(torch, self.dtype, None)
        if not isinstance(dt, torch.dtype):
            raise TaftError(f"unknown dtype {self.dtype!r}")
        return dt


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
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes, without a copy
    return h.hexdigest()


def checkpoint_content_sha256(path: str | Path) -> str:
    """`content_sha256` of the tensors in the checkpoint file at `path` (metadata excluded), checked as
    `read_checkpoint` checks it: `TaftError` if the file is not a readable taft checkpoint or is damaged."""
    path = Path(path)
    header, tensors = read_safetensors(path)
    return check_content(path, check_metadata(path, header), tensors)


def data_record(ids: Sequence[str] | None, count: int | None = None) -> dict[str, Any]:
    """The metadata's "data": {count, ids_sha256, ids}; without ids (unknown) only `count`. Ids too large for a
    safetensors header keep their count and hash only."""
    if ids is None:
        return {"count": count, "ids_sha256": None, "ids": None}
    ids = [str(i) for i in ids]
    too_large = len(json.dumps(ids, ensure_ascii=False).encode()) > MAX_IDS_JSON
    return {"count": len(ids), "ids_sha256": ids_digest(ids), "ids": None if too_large else ids}


def write_checkpoint(path: str | Path, info: ModelInfo, tensors: Mapping[str, torch.Tensor],
                     head_weight0: torch.Tensor, head_bias0: torch.Tensor, *, train_config: Mapping[str, Any],
                     ids: Sequence[str] | None, count: int | None = None, created: str | None = None,
                     metrics: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None,
                     atomic: bool = True) -> Path:
    """Write a checkpoint to `path`; returns the path. The bytes are a pure function of the arguments when
    `created` is given (default: now). `ids`: the training example ids (None when unknown; `count` then gives
    their number). `extra`: more top-level metadata keys ("privacy", "shard", "composition"). `atomic=False`
    writes in place, for callers that write to a temporary name themselves."""
    path = Path(path)
    meta: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "method": info.method, "backbone": info.backbone,
        "backbone_fingerprint": info.backbone_fingerprint, "fingerprint": info.fingerprint,
        "tangent_blocks": info.tangent_blocks, "pooling": info.pooling, "class_names": list(info.class_names),
        "preprocess": info.preprocess, "train_config": dict(train_config), "data": data_record(ids, count),
        "metrics": dict(metrics) if metrics is not None else None,
        "versions": {"taft": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__},
        "created": created if created is not None else now(), **(dict(extra) if extra else {}),
    }
    out = device_free({**{name: t.detach() for name, t in tensors.items()}, HEAD_W0: head_weight0.detach(),
                       HEAD_B0: head_bias0.detach()})
    meta["content_sha256"] = content_sha256(out)
    header = {META_KEY: json.dumps(meta, ensure_ascii=False, allow_nan=False, sort_keys=True)}
    if atomic:
        atomic_write(path, lambda tmp: save_file(out, str(tmp), metadata=header))
    else:
        save_file(out, str(path), metadata=header)
    return path


@dataclass
class CheckpointFile:
    """A checkpoint read without a model: its checked metadata, trained tensors, base head, and the
    `content_sha256` of all its tensors (checked against the metadata's, when it records one)."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    head_weight0: torch.Tensor
    head_bias0: torch.Tensor
    content_sha256: str

    @property
    def fingerprint(self) -> str:
        return str(self.meta["fingerprint"])

    @property
    def ids(self) -> list[str] | None:
        ids = self.meta.get("data", {}).get("ids")
        return None if ids is None else [str(i) for i in ids]

    @property
    def info(self) -> ModelInfo:
        """The model description, with the dtype of the trained tensors (float32 when there are none)."""
        first = next(iter(self.tensors.values()), None)
        dtype = str(first.dtype).removeprefix("torch.") if first is not None else "float32"
        return ModelInfo.from_dict({**self.meta, "dtype": dtype})


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type's name): for one-line errors."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def read_safetensors(path: Path, *, tensors: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(header metadata, tensors) of the safetensors file at `path`, unchecked; the tensors are {} when `tensors`
    is False. `TaftError` if the file is missing, not a safetensors file, corrupt or truncated."""
    if not path.is_file():
        raise TaftError(f"no checkpoint file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            found = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}  # noqa: SIM118 (no iterator)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise TaftError(f"cannot read checkpoint {path}: not a valid safetensors file, corrupt or truncated "
                        f"({first_line(e)})") from e
    return header, found


def check_metadata(path: Path, header: Mapping[str, str]) -> dict[str, Any]:
    """The taft metadata of a safetensors header, checked for format, version and the required keys."""
    if META_KEY not in header:
        raise TaftError(f"{path} is not a taft checkpoint (a safetensors file without taft metadata)")
    try:
        meta = json.loads(header[META_KEY])
    except ValueError as e:
        raise TaftError(f"{path}: the taft metadata is corrupt ({first_line(e)})") from e
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT:
        raise TaftError(f"{path} is not a taft checkpoint (metadata format {fmt!r}, expected {FORMAT!r})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise TaftError(f"{path} has checkpoint format version {version!r}; this taft ({__version__}) reads "
                        f"version {FORMAT_VERSION} (a newer taft may read it)")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise TaftError(f"{path}: the taft metadata lacks {missing}")
    return meta


def check_content(path: Path, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    """The `content_sha256` of all the file's `tensors`; `TaftError` naming `path` as damaged when the metadata
    records another one (files written before the checksum record none and are not checked)."""
    digest = content_sha256(tensors)
    recorded = meta.get("content_sha256")
    if recorded is not None and recorded != digest:
        raise TaftError(f"{path} is damaged: its tensors do not match their recorded checksum")
    return digest


def check_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pops and returns the base head (w0_head, b0_head) after checking that it is there and finite and that
    every tensor is floating point."""
    absent = [k for k in (HEAD_W0, HEAD_B0) if k not in tensors]
    if absent:
        raise TaftError(f"{path}: checkpoint is missing tensors {absent}")
    nonfloat = sorted(k for k, t in tensors.items() if not t.is_floating_point())
    if nonfloat:
        raise TaftError(f"{path}: tensors {nonfloat[:5]} are not floating point")
    w0, b0 = tensors.pop(HEAD_W0), tensors.pop(HEAD_B0)
    if not (torch.isfinite(w0).all() and torch.isfinite(b0).all()):
        raise TaftError(f"{path}: the base head holds NaN or infinite values")
    return w0, b0


def read_checkpoint(path: str | Path) -> CheckpointFile:
    """Read and check any taft checkpoint (run, shard or composed file); `TaftError` naming the problem if it is
    missing, corrupt, not taft's, of another format version, damaged (tensors that do not match their recorded
    checksum), or lacks metadata or the base head."""
    path = Path(path)
    header, tensors = read_safetensors(path)
    meta = check_metadata(path, header)
    digest = check_content(path, meta, tensors)
    w0, b0 = check_tensors(path, tensors)
    return CheckpointFile(path, meta, tensors, w0, b0, digest)


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint (checked for format, version and required keys), without reading tensors."""
    path = Path(path)
    header, _ = read_safetensors(path, tensors=False)
    return check_metadata(path, header)
