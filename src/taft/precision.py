"""Mixed precision: which autocast settings exist, where they are allowed, and the context that applies one.

"none" computes in the model's dtype (float32). "bf16" / "fp16" run matmuls, convolutions and attention under
`torch.autocast` in bfloat16 / float16 while weights, Δw, gradients and optimizer state stay float32; autocast
never changes a saved dtype (the feature cache stores its own dtype, checkpoints store float32). fp16 autocast is
refused on the CPU (torch's CPU fp16 kernels are few and slow; use bf16 there); fp16 training uses a gradient
scaler (`grad_scaler`), bf16 needs none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from taft.errors import TaftError

AUTOCASTS = ("none", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_autocast(name: str, device: torch.device | None = None) -> str:
    """`name` if it is an autocast setting (usable on `device`, when given), else a one-line `TaftError`."""
    if name not in AUTOCASTS:
        raise TaftError(f"autocast must be one of {', '.join(AUTOCASTS)}, got {name!r}")
    if name == "fp16" and device is not None and device.type == "cpu":
        raise TaftError("fp16 autocast is not supported on the CPU (few, slow float16 kernels): use "
                        'autocast="bf16" or autocast="none" there, or a GPU', arguments=("autocast",))
    return name


def autocast(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context that runs its body under autocast `name` on `device` ("none": no change)."""
    check_autocast(name, device)
    if name == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[name])


def under_autocast(fn: Callable[..., Any], name: str, device: torch.device) -> Callable[..., Any]:
    """`fn` wrapped to run under autocast `name` on `device` (`fn` itself for "none")."""
    check_autocast(name, device)
    if name == "none":
        return fn

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with autocast(name, device):
            return fn(*args, **kwargs)

    return wrapped


def grad_scaler(name: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 training on a GPU (float16 gradients underflow without it); None otherwise."""
    if name == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None
