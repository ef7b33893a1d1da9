"""Where taft computes: parsing and checking a device name once, before anything is computed or written.

Contract: `resolve_device(spec)` takes "auto", "cpu", "cuda", "cuda:N" or "mps" (or a `torch.device`, or None =
"cpu") and returns a `torch.device` that exists on this machine, or raises a one-line `TaftError` naming the
problem ("auto" is the first CUDA device when CUDA is usable, else the CPU). The device only says where tensors live
while computing: nothing taft saves (checkpoints, shard files, stores, feature caches) depends on it, and it is never
part of a recipe that must match (it may be recorded as information, e.g. in metrics.json).

`shard_devices(device)` lists the devices shard workers are pinned to: every visible GPU for "auto" / "cuda" (one
worker each by default), the one given for "cuda:N", else the single CPU or MPS device. A worker process is pinned
once, when it starts (`pin_process`); a task asking for "auto" or "cuda" there runs on the pinned device
(`worker_device`).
"""

from __future__ import annotations

import torch

from taft.errors import TaftError

DEVICE_HELP = ("where to compute: auto (the first CUDA GPU when present, else the CPU; default), cpu, cuda, cuda:N "
               "or mps. Saved files never depend on it")


def _cuda(index: int | None) -> torch.device:
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise TaftError(f"device {'cuda' if index is None else f'cuda:{index}'} is not available: {why}; "
                        'use device="cpu" or device="auto"', arguments=("device",))
    count = torch.cuda.device_count()
    if index is not None and not 0 <= index < count:
        raise TaftError(f"device cuda:{index} does not exist: {count} CUDA GPU(s) visible (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", 0 if index is None else index)


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The `torch.device` that `spec` names, checked to exist here (see the module doc)."""
    if spec is None:
        return torch.device("cpu")
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str):
        raise TaftError(f"a device is a name like cpu, cuda:0 or auto, got {type(spec).__name__}")
    name = spec.strip().lower()
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise TaftError("device mps is not available (Apple-silicon GPUs with an MPS build of torch only); "
                            'use device="cpu" or device="auto"', arguments=("device",))
        return torch.device("mps")
    if name == "cuda":
        return _cuda(None)
    if name.startswith("cuda:") and name[5:].isdigit():
        return _cuda(int(name[5:]))
    raise TaftError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps")


def shard_devices(spec: str | torch.device | None = "auto") -> list[torch.device]:
    """The devices shard workers are pinned to (see the module doc), each checked to exist."""
    device = resolve_device(spec)
    generic = isinstance(spec, str) and spec.strip().lower() in ("auto", "cuda")
    if device.type == "cuda" and generic:
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return [device]


_PINNED: list[torch.device] = []  # this process's pinned device, when it is a pinned worker


def pin_process(name: str) -> None:
    """Pin this (worker) process to device `name`: tasks asking for "auto" / "cuda" run there."""
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    _PINNED[:] = [device]


def pinned_device() -> torch.device | None:
    """The device this process was pinned to (`pin_process`), None when it is not a pinned worker."""
    return _PINNED[0] if _PINNED else None


def worker_device(spec: str | torch.device | None) -> torch.device:
    """The device a task asking for `spec` runs on in this process: the pinned one for "auto" / "cuda" in a pinned
    worker, else `resolve_device(spec)`."""
    generic = isinstance(spec, str) and spec.strip().lower() in ("auto", "cuda")
    if generic and _PINNED and _PINNED[0].type == "cuda":
        return _PINNED[0]
    return resolve_device(spec)


def free_memory(device: torch.device) -> int | None:
    """Bytes free on a CUDA device right now (None for other devices: their memory is the host's)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def synchronize(device: torch.device) -> None:
    """Wait for the queued work on `device` (for timing): CUDA and MPS run asynchronously."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def set_threads(threads: int | None) -> int:
    """Set torch's CPU intra-op thread count when given (an integer ≥ 1); returns the count in effect."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise TaftError(f"threads must be an integer ≥ 1, got {threads!r}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()
