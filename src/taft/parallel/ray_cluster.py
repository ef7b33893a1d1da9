"""Shard tasks on a Ray cluster (optional extra `taft-torch[ray]`; Ray is imported only when asked for).

    with RayExecutor("10.0.0.5:6379") as ex:        # None: start a local Ray here (or use the one initialised)
        results = run_shards(tasks, ex)

Workers need not see the driver's disk. `portable(task)` is what a task carries to the cluster:
- its rows as `NodeFeatures`: the feature-cache entry's digest, row numbers and ids (a worker whose own feature
  cache, `$TAFT_CACHE/features`, holds the entry reads them there) plus the same rows in Ray's object store
  (`CachedFeatures.in_memory()`, put by the driver), fetched only by a worker whose node lacks the entry. The
  values are the stored ones either way, so the trained Δw does not depend on where the task ran.
- a backbone that is not bundled with taft (built in Python, or a local weights file the workers may not see)
  in the object store too (`InObjectStore`, put once per backbone); a bundled one is reloaded by name.
Results come back to the driver through Ray, and the driver alone writes the store (its atomic commit).

Retries are `run_shards`' (each Ray task runs with `max_retries=0`), so a worker killed mid-shard is reported
and retried like any failed shard. Each task asks Ray for `task.threads` CPUs and `num_gpus` GPUs (a fraction
shares a GPU between shards). An unreachable address fails in the constructor, before any task is submitted.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, replace
from typing import Any

from taft.backbones import BUNDLED
from taft.backbones.base import Backbone
from taft.data.feature_cache import CachedFeatures, FeatureCache
from taft.errors import TaftError
from taft.parallel.shards import BackboneSpec, Deferred

RAY_INSTALL = "pip install 'taft-torch[ray]'"
CONNECT_TIMEOUT_S = 5.0


def import_ray() -> Any:
    """The `ray` module, or `TaftError` with the install command."""
    try:
        import ray
    except ImportError as e:
        raise TaftError(f"the ray executor needs Ray, which is not installed: {RAY_INSTALL}") from e
    return ray


def check_reachable(address: str | None) -> None:
    """`TaftError` unless a TCP connection to `address` (host:port or ray://host:port) opens within
    CONNECT_TIMEOUT_S; None, "auto" and "local" are left to Ray. (Ray itself waits minutes on a dead address.)"""
    if address is None or address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise TaftError(f"--ray-address {address!r} is not host:port (or ray://host:port), e.g. 127.0.0.1:6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise TaftError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); start one with "
                        "`ray start --head` (it prints the address) or fix --ray-address") from e


@dataclass(frozen=True)
class InObjectStore(Deferred):
    """A value the driver put in Ray's object store; `load()` fetches it (in a task)."""

    ref: Any

    def load(self) -> Any:
        return import_ray().get(self.ref)


@dataclass(frozen=True)
class NodeFeatures(Deferred):
    """A shard's rows of feature-cache entry `entry`: read from this node's own feature cache when it holds the
    entry, else fetched from the object store (`rows_in_store`, a `CachedFeatures.in_memory()` copy)."""

    entry: str
    rows: tuple[int, ...]
    ids: tuple[str, ...]
    rows_in_store: InObjectStore

    def local(self) -> CachedFeatures | None:
        """The rows from this node's feature cache, or None when it lacks the (complete) entry."""
        directory = FeatureCache().root / self.entry
        try:
            view = CachedFeatures(directory, list(self.rows))
        except (TaftError, OSError, ValueError, IndexError):
            return None
        return view if view.meta.get("entry") == self.entry and tuple(view.ids) == self.ids else None

    def load(self) -> CachedFeatures:
        local = self.local()
        return local if local is not None else self.rows_in_store.load()


class RayExecutor(Executor):
    """Submits tasks as Ray remote functions (no Ray-level retries). Connects to `address` (None: a local Ray
    started here, or the one already initialised); shuts Ray down on exit only if it started or connected it.
    A `ShardTask` asks for its `threads` CPUs, anything else for 1; every task asks for `num_gpus` GPUs and runs
    in `runtime_env` (Ray's runtime environment, e.g. {"env_vars": {"TAFT_CACHE": ...}}; None: the job's)."""

    def __init__(self, address: str | None = None, num_gpus: float = 0, runtime_env: dict[str, Any] | None = None):
        ray = import_ray()
        if isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, float)) or num_gpus < 0:
            raise TaftError(f"GPUs per shard must be a number ≥ 0, got {num_gpus!r}")
        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            check_reachable(address)
            try:
                ray.init(address=address, log_to_driver=False,
                         **({} if address else {"include_dashboard": False}))
            except (ConnectionError, RuntimeError, ValueError, SystemExit) as e:
                raise TaftError(f"could not connect to Ray at {address or 'a new local instance'}: {e}") from e
        self._options: dict[str, Any] = {"num_gpus": float(num_gpus)}
        if runtime_env is not None:
            self._options["runtime_env"] = runtime_env
        self._call = ray.remote(max_retries=0)(_call)
        self._backbones: dict[int, tuple[Backbone, InObjectStore]] = {}

    def portable(self, task: Any) -> Any:
        """`task` (a `ShardTask`) as it travels to a worker that may not share the driver's disk: see the module
        doc. Tensor-tuple data travel by value already."""
        if isinstance(task.data, CachedFeatures):
            rows = task.data.rows if task.data.rows is not None else range(len(task.data))
            task = replace(task, data=NodeFeatures(entry=task.data.meta["entry"], rows=tuple(rows),
                                                   ids=tuple(task.data.ids),
                                                   rows_in_store=self.put(task.data.in_memory())))
        if isinstance(task.backbone, BackboneSpec) and task.backbone.name not in BUNDLED:
            task = replace(task, backbone=task.backbone.load())  # a local file: loaded here, shipped below
        if isinstance(task.backbone, Backbone):
            key = id(task.backbone)
            if key not in self._backbones:  # keep the backbone alive with its ref, so its id stays unique
                self._backbones[key] = (task.backbone, self.put(task.backbone))
            task = replace(task, backbone=self._backbones[key][1])
        return task

    def put(self, value: Any) -> InObjectStore:
        return InObjectStore(self._ray.put(value))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        cpus = getattr(args[0], "threads", 1) if args else 1
        return self._call.options(num_cpus=cpus, **self._options).remote(fn, *args, **kwargs).future()

    @staticmethod
    def describe_failure(e: BaseException) -> str | None:
        """A line for an error Ray delivered: a Ray-level failure (worker died, node lost, object lost) in words,
        or the task's own exception as `Type: first line`; None for anything else."""
        name = type(e).__name__
        if name in ("WorkerCrashedError", "ActorDiedError"):
            return "the Ray worker process died (killed, or out of memory)"
        if name in ("NodeDiedError", "LocalRayletDiedError", "RaySystemError", "OutOfMemoryError",
                    "ObjectLostError", "OwnerDiedError", "ObjectFetchTimedOutError", "TaskUnschedulableError"):
            first = (str(e).strip().splitlines() or [""])[0]
            return f"Ray {name}: {first}".rstrip(": ")
        cause = getattr(e, "cause", None)  # a RayTaskError wraps the task's exception (and its traceback)
        if isinstance(cause, BaseException):
            text = str(cause).strip().splitlines()
            return f"{type(cause).__name__}: {text[0] if text else ''}".rstrip(": ")
        return None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._backbones.clear()
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


__all__ = ["CONNECT_TIMEOUT_S", "RAY_INSTALL", "InObjectStore", "NodeFeatures", "RayExecutor", "check_reachable",
           "import_ray"]
