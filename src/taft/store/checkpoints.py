"""Write and read Δw checkpoints without a backbone, in the ordinary taft checkpoint format.

Shard files and the composed model are ordinary checkpoints (`taft.checkpoint` documents the format), so
`load_checkpoint`, `taft eval`, `taft predict` and `taft info` accept them. Writing them here (rather than through
`save_checkpoint`, which needs a built `Classifier`) lets composition run on tensors alone. The bytes written are a
pure function of the arguments (`created` is passed in), so a recomputed file has the same SHA-256.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import save_file

import taft
from taft.checkpoint import (BASE_PREFIX, FORMAT, FORMAT_VERSION, MAX_IDS_JSON, META_KEY, ids_digest,
                             read_safetensors)
from taft.errors import TaftError
from taft.tensors import device_free
from taft.train.classifier import Classifier

HEAD_W0 = f"{BASE_PREFIX}head.weight"
HEAD_B0 = f"{BASE_PREFIX}head.bias"


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

    @classmethod
    def of(cls, clf: Classifier) -> ModelInfo:
        return cls(clf.method, clf.backbone_name, clf.backbone_fingerprint, clf.fingerprint, clf.tangent_blocks,
                   clf.pooling, tuple(clf.class_names), json.loads(json.dumps(clf.preprocess.to_dict())),
                   str(clf.dtype).removeprefix("torch."))

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


def write_checkpoint(path: str | Path, info: ModelInfo, tensors: Mapping[str, torch.Tensor],
                     head_weight0: torch.Tensor, head_bias0: torch.Tensor, *, train_config: Mapping[str, Any],
                     ids: Sequence[str], created: str, metrics: Mapping[str, Any] | None = None,
                     extra: Mapping[str, Any] | None = None) -> None:
    """Write a checkpoint to `path` (not atomically: callers write to a temporary name and rename).
    `extra`: additional top-level metadata keys (e.g. "shard", "composition")."""
    ids = [str(i) for i in ids]
    data: dict[str, Any] = {"count": len(ids), "ids_sha256": ids_digest(ids), "ids": ids}
    if len(json.dumps(ids, ensure_ascii=False).encode()) > MAX_IDS_JSON:
        data["ids"] = None
    meta: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "method": info.method, "backbone": info.backbone,
        "backbone_fingerprint": info.backbone_fingerprint, "fingerprint": info.fingerprint,
        "tangent_blocks": info.tangent_blocks, "pooling": info.pooling, "class_names": list(info.class_names),
        "preprocess": info.preprocess, "train_config": dict(train_config), "data": data,
        "metrics": dict(metrics) if metrics is not None else None,
        "versions": {"taft": taft.__version__, "torch": torch.__version__, "safetensors": safetensors.__version__},
        "created": created, **(dict(extra) if extra else {}),
    }
    out = device_free({**{name: t.detach() for name, t in tensors.items()}, HEAD_W0: head_weight0.detach(),
                       HEAD_B0: head_bias0.detach()})
    save_file(out, str(path), metadata={META_KEY: json.dumps(meta, ensure_ascii=False, allow_nan=False,
                                                             sort_keys=True)})


@dataclass
class DeltaFile:
    """A checkpoint read without a backbone: metadata, trained tensors, base head."""

    path: Path
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    head_weight0: torch.Tensor
    head_bias0: torch.Tensor

    @property
    def fingerprint(self) -> str:
        return str(self.meta.get("fingerprint"))

    @property
    def ids(self) -> list[str] | None:
        ids = self.meta.get("data", {}).get("ids")
        return None if ids is None else [str(i) for i in ids]


def read_checkpoint(path: str | Path) -> DeltaFile:
    """Read any taft checkpoint's tensors and metadata; `TaftError` if it is missing, corrupt or not taft's."""
    path = Path(path)
    header, tensors = read_safetensors(path)
    try:
        meta = json.loads(header[META_KEY])
    except (KeyError, ValueError) as e:
        raise TaftError(f"{path} is not a taft checkpoint (no readable taft metadata)") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise TaftError(f"{path} is not a taft checkpoint of format version {FORMAT_VERSION}")
    if HEAD_W0 not in tensors or HEAD_B0 not in tensors:
        raise TaftError(f"{path}: checkpoint is missing the base head tensors {HEAD_W0}, {HEAD_B0}")
    w0, b0 = tensors.pop(HEAD_W0), tensors.pop(HEAD_B0)
    return DeltaFile(path, meta, tensors, w0, b0)
