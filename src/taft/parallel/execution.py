"""`Execution`: how shard tasks run (executor, workers, Ray, retries, device, progress), in one record.

    store = ModelStore.create("stores/s", train, model, config, shards=8,
                              execution=Execution("ray", ray_address="10.0.0.5:6379", retries=2))

None of it is part of the recipe: the same tasks give the same Δw on any executor and device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace

from taft.devices import shard_devices
from taft.errors import TaftError
from taft.parallel.executors import InlineExecutor, check_executor_args, make_executor
from taft.parallel.shards import BackboneSpec, ShardResult, ShardTask, run_shards
from taft.train.distributed import refuse_under_torchrun
from taft.validate import check_integer


@dataclass(frozen=True)
class Execution:
    """executor: an `Executor`, or "process" (default when several shards train), "inline" or "ray".
    workers: process pool size (default min(shards, cores); on CUDA one per GPU). ray_address: the Ray cluster
    (default a local Ray); ray_gpus: GPUs each shard task asks Ray for. retries: extra attempts per failed shard.
    device: where shards train ("cpu", "cuda", "auto", ...). progress: a line per finished shard."""

    executor: Executor | str | None = None
    workers: int | None = None
    ray_address: str | None = None
    ray_gpus: float = 0
    retries: int = 1
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        check_integer("retries", self.retries, minimum=0)
        if isinstance(self.executor, Executor):
            if self.ray_address is not None or self.ray_gpus:
                raise TaftError("ray_address and ray_gpus apply only when the executor is \"ray\"")
        else:
            check_executor_args(self.executor, self.workers, self.ray_address, self.ray_gpus)

    @property
    def remote(self) -> bool:
        """Whether tasks may run in other processes (so a backbone that has a name travels by name)."""
        return self.executor != "inline"

    def local(self) -> Execution:
        """The same progress, for an operation that trains nothing (no executor, no Ray connection)."""
        return Execution(progress=self.progress)

    @contextlib.contextmanager
    def connected(self) -> Iterator[Execution]:
        """This execution, with "ray" connected now (shut down on exit): enter it before touching a store, so an
        unreachable cluster fails with the store unchanged. Other kinds are made later, only if shards train.
        Refused under torchrun: every rank would run the same store operation."""
        refuse_under_torchrun("a model store's training", "stores train their shards in parallel on their own: "
                                                          "workers, the process or Ray executor")
        if self.executor != "ray":
            yield self
            return
        with make_executor("ray", ray_address=self.ray_address, ray_gpus=self.ray_gpus) as ex:
            yield replace(self, executor=ex, ray_address=None, ray_gpus=0)

    def placement(self) -> tuple[str, list[str]]:
        """(the device name each shard task carries, the devices local process workers are pinned to). Several
        GPUs: tasks say "cuda" and each worker runs them on its own GPU. On Ray or a given Executor the name is
        resolved where the task runs, so it is not checked here."""
        ex = self.executor
        if ex == "ray" or (isinstance(ex, Executor) and not isinstance(ex, InlineExecutor)):
            return self.device, []
        devices = shard_devices(self.device)
        name = "cuda" if len(devices) > 1 else str(devices[0])
        return name, [str(d) for d in devices if d.type == "cuda"]

    def run(self, tasks: Sequence[ShardTask], on_result: Callable[[ShardResult], None], pinned: Sequence[str] = ()) \
            -> None:
        """Run `tasks` (`run_shards`) on this execution's executor, made here unless it is one; `pinned`: the
        devices process workers are pinned to (`placement`)."""
        if isinstance(self.executor, Executor):
            run_shards(tasks, self.executor, retries=self.retries, on_result=on_result, progress=self.progress)
            return
        kind = self.executor or ("process" if len(tasks) > 1 else "inline")
        if kind == "inline":  # tasks by name load their backbone once, here
            loaded = {t.backbone: t.backbone.load() for t in tasks if isinstance(t.backbone, BackboneSpec)}
            tasks = [replace(t, backbone=loaded[t.backbone]) if isinstance(t.backbone, BackboneSpec) else t
                     for t in tasks]
        with make_executor(kind, workers=self.workers, tasks=len(tasks), devices=pinned) as ex:
            run_shards(tasks, ex, retries=self.retries, on_result=on_result, progress=self.progress)
