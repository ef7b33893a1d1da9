"""Executors for shard training: any `concurrent.futures.Executor` works (Dask: `client.get_executor()`).

`make_executor(kind, ...)` builds the ones taft knows:
- "process": a local `ProcessPoolExecutor` (spawn start method: safe with torch's thread pools) of
  `min(tasks, cores)` workers by default.
- "inline": runs each task in the calling process at submit time (`InlineExecutor`).
- "ray": tasks as Ray remote functions (optional extra `taft-torch[ray]`; imported only when asked for).

Threads: each shard task sets `torch.set_num_threads(threads)` itself (see `taft.parallel.shards`), so results do
not depend on which executor ran it; `default_threads(workers)` = max(1, cores // workers).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any

from taft.errors import TaftError

EXECUTORS = ("process", "inline", "ray")
RAY_INSTALL = "pip install 'taft-torch[ray]'"


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)


def default_workers(tasks: int) -> int:
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


class RayExecutor(Executor):
    """Submits tasks as Ray remote functions (each asking for `num_cpus` CPUs). Connects to `address` (None: a
    local Ray started here, or the one already initialised). Shuts Ray down on exit only if it started it."""

    def __init__(self, address: str | None = None, num_cpus: int = 1):
        try:
            import ray
        except ImportError as e:
            raise TaftError(f"the ray executor needs Ray, which is not installed: {RAY_INSTALL}") from e
        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        self._call = ray.remote(num_cpus=num_cpus)(_call)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return self._call.remote(fn, *args, **kwargs).future()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def make_executor(kind: str = "process", *, workers: int | None = None, tasks: int = 1,
                  ray_address: str | None = None, threads: int = 1) -> Executor:
    """A new executor of `kind` (see the module doc); use it as a context manager. `workers` defaults to
    `default_workers(tasks)`; `threads` is what each Ray task asks for in CPUs."""
    if kind not in EXECUTORS:
        raise TaftError(f"executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise TaftError(f"workers must be an integer ≥ 1, got {workers!r}")
    if kind == "inline":
        return InlineExecutor()
    if kind == "ray":
        return RayExecutor(ray_address, num_cpus=threads)
    if ray_address is not None:
        raise TaftError("--ray-address applies to the ray executor only")
    return ProcessPoolExecutor(max_workers=workers or default_workers(tasks),
                               mp_context=multiprocessing.get_context("spawn"))
