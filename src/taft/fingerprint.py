"""Stable content hashes of tensors, used to tie every Δw to the exact base weights w0 it was trained around."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch


def hash_tensors(tensors: Mapping[str, torch.Tensor], extra: Iterable[str] = ()) -> str:
    """SHA-256 over (name, shape, raw bytes) of every tensor in name order, then the `extra` strings.

    Floating tensors are hashed as float32, so the hash names the values, not the device, memory layout or a
    widening cast (a float64 copy of float32 weights hashes the same).
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu")
        t = (t.float() if t.is_floating_point() else t).contiguous()
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for item in extra:
        h.update(f"#{item}".encode())
    return h.hexdigest()
