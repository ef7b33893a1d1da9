"""The model store: shard plans, Δw files, exact composition, forgetting, audit log, crash-safe commits.

    from taft.store import ModelStore
    from taft.parallel import Execution
    store = ModelStore.create("stores/s", features, model, TrainConfig(epochs=10), shards=8)   # parallel training
    store.add(model.cache_features(new_images))                                              # new shards only
    store.forget(["img/001.png"], mode="retrain", execution=Execution(workers=4))           # retrain only its shard
    ModelStore("stores/s").verify(repair=True).ok

Layout and the commit protocol: `taft.store.layout`, `taft.store.commit`; the manifest: `taft.store.manifest`.
"""

from taft.parallel.execution import Execution
from taft.store.compose import compose_checkpoints
from taft.store.create import SHARD_MIN_STEPS
from taft.store.delta_sum import WEIGHTINGS
from taft.store.forget import MODES, ForgetResult, read_ids
from taft.store.manifest import Manifest
from taft.store.merge import merge_checkpoints
from taft.store.plan import PLAN_KINDS, ShardPlan, make_plan
from taft.store.store import ModelStore
from taft.store.verify import VerifyReport

__all__ = ["MODES", "PLAN_KINDS", "SHARD_MIN_STEPS", "WEIGHTINGS", "Execution", "ForgetResult", "Manifest",
           "ModelStore", "ShardPlan", "VerifyReport", "compose_checkpoints", "make_plan", "merge_checkpoints",
           "read_ids"]
