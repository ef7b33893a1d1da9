"""Task arithmetic: θ = θ0 + Σ_i w_i τ_i with task vectors τ_i = θ_i − θ0 and any real weights (negative ones
subtract a task), for the methods linear in what they train (taft: τ = Δw; probe: τ = W − W0 of the head). Then
f_merged(x) = f0(x) + Σ_i w_i (f_i(x) − f0(x)) exactly (up to float rounding; f0 the base model), and with
Σ_i w_i = 1 the merged logits are Σ_i w_i f_i(x).

    merge_checkpoints(["vehicles.safetensors", "animals.safetensors"], [1.0, -1.0], "difference.safetensors")

The inputs must share their base (fingerprint: backbone, method, k, pooling and base head; classes). NLFT
checkpoints are refused: a weighted average of non-linear weights (a "soup") is only an approximation. Private
checkpoints are refused too: how their guarantees combine depends on how their data overlap. The output is an
ordinary checkpoint whose metadata records its inputs (path, content sha256) and weights under "merge"; its
training ids are the union of the inputs' (None when an input does not list them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from taft.checkpoint import CheckpointFile, read_checkpoint, write_checkpoint
from taft.errors import TaftError
from taft.store.delta_sum import check_same_base, weighted_sum


def base_tensors(f: CheckpointFile) -> dict[str, torch.Tensor]:
    """What the file's trained tensors are measured from: zero for taft (they are Δw), the base head w0 for a
    probe (its trained tensors are the head itself)."""
    if f.meta["method"] == "probe":
        return {"head.weight": f.head_weight0, "head.bias": f.head_bias0}
    return {}


def task_vector(f: CheckpointFile) -> dict[str, torch.Tensor]:
    """The file's trained tensors minus the base they start from (`base_tensors`): τ = θ − θ0."""
    base = base_tensors(f)
    return {k: t - base[k].to(t.dtype) if k in base else t for k, t in f.tensors.items()}


def with_base(f: CheckpointFile, tau: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ0 + τ in the file's terms (the inverse of `task_vector`)."""
    base = base_tensors(f)
    return {k: t + base[k].to(t.dtype) if k in base else t for k, t in tau.items()}


def merge_checkpoints(paths: Sequence[str | Path], weights: Sequence[float] | None, out: str | Path) -> Path:
    """Write Σ_i weights[i] · Δw_i of the checkpoints at `paths` to `out` (default weights: 1/n each); see the
    module doc. Everything is checked before `out` is written (atomically)."""
    if len(paths) < 2:
        raise TaftError(f"merging needs at least 2 checkpoints, got {len(paths)}")
    weights = [1.0 / len(paths)] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise TaftError(f"give one weight per checkpoint: {len(paths)} checkpoints, {len(weights)} weights")
    if not all(math.isfinite(w) for w in weights):
        raise TaftError(f"merge weights must be finite numbers, got {weights}")
    files = [read_checkpoint(p) for p in paths]
    check_same_base(files)
    private = [str(f.path) for f in files if f.meta.get("privacy")]
    if private:
        raise TaftError(f"{private[0]} was trained with DP-SGD: merging private models needs an accounting of how "
                        "their data overlap, which taft does not do; merge non-private checkpoints")
    first = files[0]
    tensors = with_base(first, weighted_sum([task_vector(f) for f in files], weights))
    ids = None if any(f.ids is None for f in files) else sorted({i for f in files for i in f.ids})
    counts = [(f.meta.get("data") or {}).get("count") for f in files]
    inputs = [{"path": str(Path(f.path).resolve()), "content_sha256": f.content_sha256, "weight": w}
              for f, w in zip(files, weights)]
    return write_checkpoint(out, first.info, tensors, first.head_weight0, first.head_bias0,
                            train_config=first.meta.get("train_config") or {}, ids=ids,
                            count=None if ids is not None or None in counts else sum(counts),
                            extra={"merge": {"inputs": inputs, "weights": weights}})
