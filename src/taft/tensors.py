"""Named tensors in and out of a model: loading into parameters with all checks first (a bad state never
half-overwrites a model), and device-free copies for saving."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from taft.errors import TaftError

LOW_PRECISION = (torch.float16, torch.bfloat16)


def load_checked(params: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], what: str) -> None:
    """Copy `state[name]` into every `params[name]` after checking that the names match exactly, the shapes agree
    and every value is finite; otherwise raise `TaftError` naming `what` and the offending tensors (≤ 5)."""
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        raise TaftError(f"{what} do not match this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [f"{n}: {tuple(state[n].shape)} != {tuple(p.shape)}" for n, p in params.items()
             if tuple(state[n].shape) != tuple(p.shape)]
    if wrong:
        raise TaftError(f"{what} have wrong shapes for this model: {wrong[:5]}")
    bad = [n for n in params if not torch.isfinite(state[n]).all()]
    if bad:
        raise TaftError(f"{what} hold NaN or infinite values in {bad[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def device_free(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of `tensors`, for saving: a file never depends on the device a model ran on.
    `TaftError` for tensors without data (the `meta` device) or in a low precision (float16 / bfloat16: Δw and
    trained weights are kept in float32; autocast never changes them)."""
    empty = sorted(n for n, t in tensors.items() if t.is_meta)
    if empty:
        raise TaftError(f"cannot save tensors on the meta device (they hold no values): {empty[:5]}; save the model "
                        "from a real device (cpu, cuda, mps)")
    low = sorted(n for n, t in tensors.items() if t.dtype in LOW_PRECISION)
    if low:
        raise TaftError(f"tensors {low[:5]} are {tensors[low[0]].dtype}; checkpoints hold float32 (or float64) "
                        "trained tensors: train in float32 (autocast keeps them float32)")
    return {n: t.to("cpu", copy=True).contiguous() for n, t in tensors.items()}
