"""How cached trunk features reach the device during training: resident, streamed, or read per batch.

- "resident": the whole feature array is copied onto the device once (in its stored dtype) and batches are
  gathered there. `auto` picks it on a GPU when the array fits in `DEVICE_FRACTION` (0.5) of the device's free
  memory at the time (the rest is left to activations, Δw and the optimizer).
- "stream": a background thread reads the next `PREFETCH` batches' rows (from the memmap) into pinned host memory
  (on CUDA) while the current batch computes; each is copied to the device asynchronously. `auto` picks it on a
  GPU when the features do not fit.
- "host": each batch is read and copied when it is needed (the CPU's path: on the CPU the device is the host, and
  the memmap is read in place). `auto` picks it on the CPU and on MPS.

All three give the same batches, bit for bit (tests force each through `fit(..., feed=...)`). DP-SGD draws its
Poisson batches one step at a time and reads them synchronously (from the device when resident).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import torch

from taft.devices import free_memory
from taft.errors import TaftError

FEEDS = ("auto", "resident", "stream", "host")
DEVICE_FRACTION = 0.5
PREFETCH = 2

Batch = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # (inputs, labels, mask or None): one order everywhere


def choose_feed(feed: str, device: torch.device, nbytes: int) -> str:
    """The feed to use for `nbytes` of features on `device` ("auto" resolved as the module doc says)."""
    if feed not in FEEDS:
        raise TaftError(f"feed must be one of {', '.join(FEEDS)}, got {feed!r}")
    if feed != "auto":
        return feed
    if device.type != "cuda":
        return "host"
    free = free_memory(device)
    return "resident" if free is not None and nbytes <= DEVICE_FRACTION * free else "stream"


def streamed(read: Callable[[torch.Tensor], Batch], order: Sequence[torch.Tensor], device: torch.device,
             dtype: torch.dtype, prefetch: int = PREFETCH) -> Iterator[Batch]:
    """`read(idx)` (features, labels, mask on the host) of each index batch in `order`, read ahead by a worker
    thread into pinned memory (CUDA) and moved to `device` without blocking, features cast to `dtype` there. The
    thread stops when the consumer stops early."""
    pin = device.type == "cuda"
    ready: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for idx in order:
                batch = read(idx)
                if pin:
                    batch = tuple(None if t is None else t.pin_memory() for t in batch)  # type: ignore[assignment]
                if not put(("batch", batch)):
                    return
            put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(("error", e))

    thread = threading.Thread(target=work, name="taft-feature-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise item  # type: ignore[misc]
            x, y, mask = item  # type: ignore[misc]
            yield (x.to(device, dtype, non_blocking=pin), y.to(device, non_blocking=pin),
                   None if mask is None else mask.to(device, non_blocking=pin))
    finally:
        stop.set()
        thread.join()
