"""Executors for shard training: any `concurrent.futures.Executor` works (Dask: `client.get_executor()`).

`make_executor(kind, ...)` builds the ones taft knows:
- "process": a local `ProcessPoolExecutor` (spawn start method: safe with torch's thread pools) of
  `min(tasks, cores)` workers by default.
- "inline": runs each task in the calling process at submit time (`InlineExecutor`).
- "ray": tasks on a Ray cluster (`taft.parallel.ray_cluster.RayExecutor`; optional extra `taft-torch[ray]`,
  imported only when asked for); `ray_gpus`: GPUs each shard task asks Ray for.

Process-pool workers die with the process that made the pool, even when it is killed with SIGKILL (no idle
orphans holding a backbone's memory): on Linux by a parent-death signal (prctl PR_SET_PDEATHSIG), everywhere by a
thread in each worker that exits it once its parent is gone (polled every second).

Devices: `make_executor("process", devices=[...])` pins process workers to the given devices in turn (worker i to
devices[i % len], `taft.devices.pin_process`); `default_workers(tasks, devices)` is one worker per CUDA device.

Threads: each shard task sets `torch.set_num_threads(threads)` itself (see `taft.parallel.shards`), so results do
not depend on which executor ran it; `default_threads(workers)` = max(1, cores // workers).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any

from taft.errors import TaftError
from taft.parallel.ray_cluster import RayExecutor

EXECUTORS = ("process", "inline", "ray")


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)


def default_workers(tasks: int, devices: Sequence[Any] = ()) -> int:
    """min(tasks, CPU cores); with CUDA `devices` (torch devices or names), min(tasks, number of GPUs): one worker
    per GPU."""
    if any(str(d).startswith("cuda") for d in devices):
        return max(1, min(tasks, len(devices)))
    return max(1, min(tasks, available_cores()))


def default_threads(workers: int) -> int:
    return max(1, available_cores() // max(1, workers))


class InlineExecutor(Executor):
    """Runs `fn(*args, **kwargs)` in the calling process during `submit`; the returned future is already done.
    Exceptions are stored in the future (KeyboardInterrupt and SystemExit propagate)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - delivered through the future, like any executor
            future.set_exception(e)
        return future


def _start_worker(parent_pid: int, names: Any | None) -> None:
    """Process-pool initializer: die with the parent (`die_with_parent`); with a queue of device names, take this
    worker's device from it and pin the process to it."""
    die_with_parent(parent_pid)
    if names is not None:
        from taft.devices import pin_process

        pin_process(names.get())


def make_executor(kind: str = "process", *, workers: int | None = None, tasks: int = 1,
                  ray_address: str | None = None, ray_gpus: float = 0, devices: Sequence[str] = ()) -> Executor:
    """A new executor of `kind` (see the module doc); use it as a context manager. `workers` defaults to
    `default_workers(tasks, devices)`; `ray_address`, `ray_gpus`: the Ray cluster and the GPUs per shard task;
    `devices` (e.g. ["cuda:0", "cuda:1"]): process workers are pinned to them in turn."""
    check_executor_args(kind, workers, ray_address, ray_gpus)
    if kind == "inline":
        return InlineExecutor()
    if kind == "ray":
        return RayExecutor(ray_address, num_gpus=ray_gpus)
    size = workers or default_workers(tasks, devices)
    context = multiprocessing.get_context("spawn")
    names = context.Queue() if devices else None
    for i in range(size if devices else 0):
        names.put(str(devices[i % len(devices)]))
    return ProcessPoolExecutor(max_workers=size, mp_context=context, initializer=_start_worker,
                               initargs=(os.getpid(), names))


def check_executor_args(kind: str | None, workers: int | None = None, ray_address: str | None = None,
                        ray_gpus: float = 0) -> None:
    """`TaftError` for an unknown executor kind, a bad worker count, or Ray options without the ray executor."""
    if kind is not None and kind not in EXECUTORS:
        raise TaftError(f"executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise TaftError(f"workers must be an integer ≥ 1, got {workers!r}")
    if kind != "ray" and ray_address is not None:
        raise TaftError("ray_address applies to the ray executor only")
    if kind != "ray" and ray_gpus:
        raise TaftError("ray_gpus applies to the ray executor only")


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_POLL_S = 1.0


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: end this process when process `parent_pid` (its parent) ends. The parent-death signal
    is sent when the thread that started the worker exits; pools are made and used by one thread here."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass  # no prctl: the watcher below still works
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True, name="taft-parent-watch").start()


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)
