"""Parallel shard training: executors (local processes by default, inline, a Ray cluster), shard tasks, and
`Execution`, how a store's shards run.

    from taft.parallel import make_executor, run_shards
    with make_executor("process", tasks=len(tasks)) as ex:      # or any concurrent.futures.Executor
        results = run_shards(tasks, ex, retries=1)
"""

from taft.parallel.execution import Execution
from taft.parallel.executors import (EXECUTORS, InlineExecutor, available_cores, check_executor_args,
                                     default_threads, default_workers, make_executor)
from taft.parallel.ray_cluster import RAY_INSTALL, RayExecutor
from taft.parallel.shards import (BackboneSpec, ShardResult, ShardTask, ShardTrainingError, backbone_ref, run_shards,
                                  shard_data, train_shard)

__all__ = ["EXECUTORS", "RAY_INSTALL", "BackboneSpec", "Execution", "InlineExecutor", "RayExecutor", "ShardResult", "ShardTask",
           "ShardTrainingError", "available_cores", "backbone_ref", "check_executor_args", "default_threads",
           "default_workers", "make_executor", "run_shards", "shard_data", "train_shard"]
