"""Stable content hashes of tensors, used to tie every Δw to the exact base weights w0 it was trained around: the
model fingerprint, and the legacy one that files written before the one-model redesign recorded."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping

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


def model_fingerprint(backbone_fingerprint: str, method: str, tangent_blocks: int, pooling: str,
                      head_weight0: torch.Tensor, head_bias0: torch.Tensor) -> str:
    """The model's fingerprint: a hash of the backbone's fingerprint, the method, k, the pooling and the base head
    w0_head, i.e. of everything a trained tensor is relative to."""
    return hash_tensors({"head.weight": head_weight0, "head.bias": head_bias0},
                        extra=[f"backbone={backbone_fingerprint}", f"method={method}", f"k={tangent_blocks}",
                               f"pooling={pooling}"])


def legacy_fingerprint(method: str, backbone_fingerprint: str, tangent_blocks: int, pooling: str,
                       head_weight0: torch.Tensor, head_bias0: torch.Tensor,
                       base_tensors: Callable[[], Mapping[str, torch.Tensor]], arch: Mapping[str, object]) -> str:
    """The fingerprint taft recorded before the one-model redesign: taft hashed every base tensor of the model
    (`base_tensors()`, called only then) with k, pooling and the architecture `arch`; nlft and probe hashed the
    base head with the backbone's fingerprint, k and pooling."""
    if method != "taft":
        return hash_tensors({"head.weight": head_weight0, "head.bias": head_bias0},
                            extra=[f"backbone={backbone_fingerprint}", f"k={tangent_blocks}", f"pooling={pooling}"])
    return hash_tensors(base_tensors(), extra=[f"k={tangent_blocks}", f"pooling={pooling}",
                                               *(f"{k}={v}" for k, v in sorted(arch.items()))])
