"""Loading named tensors into parameters, all checks first: a bad state never half-overwrites a model."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from taft.errors import TaftError


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
