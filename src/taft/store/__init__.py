"""The model store: shard plans, Δw files, exact composition, forgetting, audit log, crash-safe commits.

    from taft.store import create_store, compose_store, forget, verify, ModelStore
    create_store("stores/s", features, backbone, TrainConfig(epochs=10), shards=8)   # parallel training
    forget("stores/s", ["img/001.png"], mode="retrain")                              # retrain only its shard
    verify("stores/s", repair=True).ok

Layout and the commit protocol: `taft.store.layout`, `taft.store.commit`; manifest keys: `taft.store.manifest`.
"""

from taft.store.compose import compose_checkpoints, compose_store
from taft.store.create import create_store
from taft.store.delta_sum import WEIGHTINGS
from taft.store.forget import MODES, ForgetResult, forget, read_ids
from taft.store.plan import PLAN_KINDS, ShardPlan, make_plan
from taft.store.store import ModelStore, resume
from taft.store.verify import VerifyReport, verify

__all__ = ["MODES", "PLAN_KINDS", "WEIGHTINGS", "ForgetResult", "ModelStore", "ShardPlan", "VerifyReport",
           "compose_checkpoints", "compose_store", "create_store", "forget", "make_plan", "read_ids", "resume",
           "verify"]
