"""Composition of Δw: Δw = Σ_i α_i Δw_i with Σ_i α_i = 1.

For a model linear in its trained weights (taft: f_lin is linear in Δw; probe: logits are linear in the head)
the composed model's logits equal Σ_i α_i (logits of model i), up to float rounding. The sum is accumulated in
float64 in the given order and cast back to the shards' dtype, so the result is deterministic.

All inputs must share the model fingerprint (same backbone, k, pooling and base head w0): anything else raises
`FingerprintMismatchError` naming both fingerprints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from taft.checkpoint import CheckpointFile, write_checkpoint
from taft.errors import FingerprintMismatchError, TaftError
from taft.spec import LINEAR_METHODS

WEIGHTINGS = ("uniform", "size")


def composition_weights(sizes: Sequence[int], weighting: str = "uniform") -> list[float]:
    """α for shards of the given sizes: "uniform" (1/m each) or "size" (n_i / Σ n)."""
    if not sizes:
        raise TaftError("nothing to compose: no shards selected")
    if weighting == "uniform":
        return [1.0 / len(sizes)] * len(sizes)
    if weighting == "size":
        total = sum(sizes)
        if total <= 0 or any(n < 0 for n in sizes):
            raise TaftError(f"size weighting needs positive shard sizes, got {list(sizes)}")
        return [n / total for n in sizes]
    raise TaftError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def compose_tensors(deltas: Sequence[Mapping[str, torch.Tensor]], alphas: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ_i α_i Δw_i with Σ α = 1 (checked): `weighted_sum`."""
    if abs(sum(alphas) - 1.0) > 1e-9:
        raise TaftError(f"composition weights must sum to 1, got {sum(alphas)}")
    return weighted_sum(deltas, alphas)


def weighted_sum(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ_i w_i Δw_i for any real weights, accumulated in float64 in order, cast to the first Δw's dtypes. Checks
    one weight per Δw, and names and shapes."""
    if len(deltas) != len(weights) or not deltas:
        raise TaftError(f"need one weight per Δw: {len(deltas)} Δw, {len(weights)} weights")
    names = sorted(deltas[0])
    for i, d in enumerate(deltas[1:], 1):
        if sorted(d) != names:
            raise TaftError(f"Δw {i} has other tensors than Δw 0: {sorted(set(d) ^ set(names))[:5]}")
        wrong = [n for n in names if d[n].shape != deltas[0][n].shape]
        if wrong:
            raise TaftError(f"Δw {i} has other shapes than Δw 0 for {wrong[:5]}")
    out = {}
    for n in names:
        acc = torch.zeros(deltas[0][n].shape, dtype=torch.float64)
        for d, w in zip(deltas, weights):
            acc += float(w) * d[n].detach().cpu().double()
        out[n] = acc.to(deltas[0][n].dtype)
    return out


def check_same_base(files: Sequence[CheckpointFile]) -> None:
    """`FingerprintMismatchError` unless every file has the first one's fingerprint, base head, method and classes;
    `TaftError` for a method whose composition is not exact (nlft)."""
    first = files[0]
    for f in files:
        if f.meta.get("method") not in LINEAR_METHODS:
            raise TaftError(f"{f.path}: method {f.meta.get('method')!r} is not linear in its trained weights; "
                            f"composition is exact only for {', '.join(LINEAR_METHODS)}")
    for f in files[1:]:
        if f.fingerprint != first.fingerprint:
            raise FingerprintMismatchError(
                f"cannot compose Δw trained around different base weights: {first.path} has fingerprint "
                f"{first.fingerprint[:16]}…, {f.path} has {f.fingerprint[:16]}…")
        if not (torch.equal(f.head_weight0, first.head_weight0) and torch.equal(f.head_bias0, first.head_bias0)):
            raise FingerprintMismatchError(f"cannot compose {first.path} and {f.path}: their base heads w0 differ")
        for key in ("method", "class_names"):
            if f.meta.get(key) != first.meta.get(key):
                raise TaftError(f"cannot compose {first.path} and {f.path}: their {key} differ")


def write_composed(path: Path, files: Sequence[CheckpointFile], alphas: Sequence[float], *, train_config: Mapping,
                   created: str, composition: Mapping, privacy: Mapping | None = None) -> None:
    """Compose `files` with `alphas` into an ordinary checkpoint at `path` (atomically: temp name + rename).
    Its data ids are the union of the files' ids, in file order. `privacy`: the composed model's privacy ledger
    (metadata key `privacy`, as `taft info` shows it), for shards trained with DP."""
    check_same_base(files)
    tensors = compose_tensors([f.tensors for f in files], alphas)
    ids: list[str] = []
    for f in files:
        if f.ids is None:
            raise TaftError(f"{f.path} does not list its training ids; cannot name the composed model's data")
        ids += f.ids
    if len(set(ids)) != len(ids):
        raise TaftError("the checkpoints to compose share training ids; compose models of disjoint shards")
    first = files[0]
    write_checkpoint(path, first.info, tensors, first.head_weight0, first.head_bias0, train_config=train_config,
                     ids=ids, created=created,
                     extra={"composition": dict(composition), **({"privacy": dict(privacy)} if privacy else {})})
