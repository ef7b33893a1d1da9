"""Executors for shard training: any `concurrent.futures.Executor` works (Dask: `client.get_executor()`).

`make_executor(kind, ...)` builds the ones taft knows:
- "process": a local process pool (`WorkerPool`, a `ProcessPoolExecutor`; spawn start method: safe with torch's
  thread pools) of `min(tasks, cores)` workers by default.
- "inline": runs each task in the calling process at submit time (`InlineExecutor`).
- "ray": tasks on a Ray cluster (`taft.parallel.ray_cluster.RayExecutor`; optional extra `taft-torch[ray]`,
  imported only when asked for); `ray_gpus`: GPUs each shard task asks Ray for.

Process-pool workers die with the process that made the pool, even when it is killed with SIGKILL (no idle
orphans holding a backbone's memory): on Linux by a parent-death signal (prctl PR_SET_PDEATHSIG), everywhere by a
thread in each worker that exits it once its parent is gone (polled every second). Workers ignore Ctrl-C (SIGINT):
the process that made the pool handles it, and `WorkerPool` ends them when an exception (KeyboardInterrupt, or
SystemExit from a SIGTERM while the pool is in use) leaves its `with` block, instead of waiting for every queued
task.

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
TERMINATE_WAIT_S = 5.0  # how long a terminated worker may take to exit before it is killed


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


class WorkerPool(ProcessPoolExecutor):
    """A process pool that stops at once when an exception leaves its `with` block: tasks not started are
    cancelled and the workers terminated (what they would return could not be used any more). While it is in use
    in the main thread, SIGTERM raises SystemExit(143), so the pool and its semaphores are cleaned up as well."""

    _sigterm: Any = None  # the SIGTERM handler to restore on exit

    def __enter__(self) -> WorkerPool:
        self._sigterm = None
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            if exc_type is not None:
                self.terminate()
            self.shutdown(wait=True)
        finally:
            if self._sigterm is not None:
                signal.signal(signal.SIGTERM, self._sigterm)
        return False

    def terminate(self) -> None:
        """Cancel the tasks not started and end the workers now (running tasks fail with `BrokenProcessPool`)."""
        processes = list((self._processes or {}).values())
        self.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            p.terminate()
        for p in processes:
            p.join(TERMINATE_WAIT_S)
            if p.is_alive():  # it ignored SIGTERM
                p.kill()
                p.join()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _start_worker(parent_pid: int, names: Any | None) -> None:
    """Process-pool initializer: die with the parent (`die_with_parent`), leave Ctrl-C to the parent (which ends
    the pool: `WorkerPool`), hold no named semaphore of its own (progress bars lock with a thread lock: a worker
    has one thread of tasks); with a queue of device names, take this worker's device from it and pin the process
    to it."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())  # not tqdm's default, a named semaphore that a terminated worker would leak
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
    return WorkerPool(max_workers=size, mp_context=context, initializer=_start_worker, initargs=(os.getpid(), names))


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
