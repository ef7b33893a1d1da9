"""The model store: shard plans, Δw files, exact composition, forgetting, audit log, crash-safe commits.

    from taft.store import create_store, compose_store, forget, verify, ModelStore
    create_store("stores/s", features, backbone, TrainConfig(epochs=10), shards=8)   # parallel training
    forget("stores/s", ["img/001.png"], mode="retrain")                              # retrain only its shard
    verify("stores/s", repair=True).ok

Layout and the commit protocol: `taft.store.layout`, `taft.store.commit`; manifest keys: `taft.store.manifest`.
"""

from taft.store.checkpoints import DeltaFile, ModelInfo, read_checkpoint, write_checkpoint
from taft.store.compose import WEIGHTINGS, compose_checkpoints, compose_tensors, composition_weights
from taft.store.forget import MODES, ForgetResult, forget, read_ids
from taft.store.layout import CRASH_ENV, CRASH_EXIT, StoreLayout
from taft.store.manifest import load_manifest
from taft.store.plan import PLAN_KINDS, ShardPlan, make_plan, shard_seed
from taft.store.recompose import compose_store
from taft.store.store import ModelStore, resume
from taft.store.train import create_store
from taft.store.verify import VerifyReport, verify

__all__ = ["CRASH_ENV", "CRASH_EXIT", "MODES", "PLAN_KINDS", "WEIGHTINGS", "DeltaFile", "ForgetResult", "ModelInfo",
           "ModelStore", "ShardPlan", "StoreLayout", "VerifyReport", "compose_checkpoints", "compose_store",
           "compose_tensors", "composition_weights", "create_store", "forget", "load_manifest", "make_plan",
           "read_checkpoint", "read_ids", "resume", "shard_seed", "verify", "write_checkpoint"]
