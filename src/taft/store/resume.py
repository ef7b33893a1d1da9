"""Complete a store's interrupted operation from its journal (`pending.json`): `ModelStore.resume`."""

from __future__ import annotations

from pathlib import Path

from taft.backbones import load_backbone_like
from taft.backbones.base import Backbone
from taft.data.feature_cache import CachedFeatures
from taft.data.source import DataSource
from taft.errors import TaftError
from taft.model import Classifier
from taft.parallel.execution import Execution
from taft.parallel.shards import BackboneSpec, FeatureData
from taft.privacy import DPConfig
from taft.spec import ModelSpec
from taft.store.add import add_examples
from taft.store.commit import finish
from taft.store.compose import compose_store
from taft.store.create import create_store
from taft.store.forget import forget
from taft.store.import_shards import import_checkpoints
from taft.store.journal import Pending, read_pending
from taft.wording import counted
from taft.store.layout import StoreLayout
from taft.store.manifest import load_manifest
from taft.store.plan import ShardPlan
from taft.store.retrain import retrain
from taft.train import TrainConfig


def resume(root: str | Path, *, features: FeatureData | None = None, backbone: Backbone | None = None,
           execution: Execution = Execution(), accept_changed_data: bool = False) -> str:
    """Complete the store's interrupted operation; returns what was done, in words. `features`/`backbone`: the
    training data and backbone of shards still to train (default: the store's feature-cache entry and its backbone
    by name); `execution`: how and where they train (any device: it is not part of the recipe);
    `accept_changed_data`: a forget retrains even on changed data (`taft.store.forget`)."""
    layout = StoreLayout(root)
    with layout.locked():
        pending = read_pending(layout)
        if pending is None:
            return "nothing to resume: no operation is pending"
        if layout.manifest.exists():
            m = load_manifest(layout)
            if m.last_op == pending.op_id:
                finish(layout, m, pending)
                return f"finished the cleanup of the committed {pending.describe()}"
    req = pending.request
    if pending.op == "forget":
        r = forget(root, req["ids"], req["mode"], features=features, backbone=backbone, execution=execution,
                   accept_changed_data=accept_changed_data)
        return f"completed the forget of {counted(len(r.forgotten), 'id')} (mode {r.mode}; shards {r.shards})"
    if pending.op == "compose":
        compose_store(root, weighting=req["weighting"], shards=req["subset"])
        return "completed the composition"
    if pending.op == "create":
        resume_creation(root, pending, features, backbone, execution)
        return "completed the store's creation"
    if pending.op == "add":
        plan = req["plan"]
        train = recorded_features(req["data"], features, "addition", req["source"], layout, backbone)
        r = add_examples(root, train, shards=req["shards"],
                         plan=ShardPlan.from_dict(plan) if isinstance(plan, dict) else plan,
                         source=DataSource.from_dict(req["source"]) if req["source"] else None, backbone=backbone,
                         readd_forgotten=req["readd_forgotten"], execution=execution)
        return f"completed the addition of {counted(r.n, 'example')} as {counted(len(r.shards), 'shard')} {r.shards}"
    if pending.op == "import":
        data = req["data"]
        r = import_checkpoints(root, [c["path"] for c in req["checkpoints"]],
                               features=recorded_features(data, features, "import", req["source"], layout,
                                                          backbone) if data else None,
                               source=DataSource.from_dict(req["source"]) if req["source"] else None,
                               backbone=backbone, readd_forgotten=req["readd_forgotten"])
        return f"completed the import of {counted(len(r.shards), 'checkpoint')} as shards {r.shards}"
    if pending.op == "retrain":
        result = retrain(root, req["shards"], features=features, backbone=backbone, execution=execution,
                         accept_changed_data=accept_changed_data)
        return f"completed the retraining of {counted(len(result.shards), 'shard')} {result.shards}"
    raise TaftError(f"cannot resume an operation of kind {pending.op!r}")


def recorded_features(identity: dict, features: FeatureData | None, what: str, source: dict | None = None,
                      layout: StoreLayout | None = None, backbone: Backbone | None = None) -> FeatureData:
    """`features` if given, else what an operation's request names (`data_identity`): its feature-cache entry, or
    for streamed data its `source` reopened (with `backbone`'s preprocessing, default the store's backbone)."""
    if features is not None:
        return features
    if identity.get("streamed") and source and layout is not None:
        info = load_manifest(layout).model
        return DataSource.from_dict(source).open(backbone or load_backbone_like(info.backbone, info.preprocess))
    if identity.get("streamed"):
        raise TaftError(f"cannot resume the store's {what} here: its training data streams and no source of it is "
                        "recorded; pass the dataset, or rerun the operation")
    path = identity.get("path")
    if not path or not (Path(path) / "meta.json").is_file():
        raise TaftError(f"cannot resume the store's {what}: its training features are not in the feature cache any "
                        f"more; pass them, or start the {what} again from its data")
    return CachedFeatures(path)


def resume_creation(root: str | Path, pending: Pending, features: FeatureData | None, backbone: Backbone | None,
                    execution: Execution) -> None:
    """Rerun the store's interrupted creation with its recorded request."""
    req = pending.request
    features = recorded_features(req["data"], features, "creation")
    if not isinstance(features, CachedFeatures):
        raise TaftError("resuming a store's creation needs its cached training features (CachedFeatures)")
    if backbone is None:
        spec = req.get("backbone")
        if not spec:
            raise TaftError("cannot resume the store's creation without its backbone")
        backbone = BackboneSpec.of(spec["name"], spec["preprocess"], spec["dtype"], spec["fingerprint"]).load()
    config = TrainConfig.from_dict(req["config"])
    model = Classifier.from_spec(backbone, features.class_names, ModelSpec.from_dict(req["config"]))
    create_store(root, features, model, config, plan=ShardPlan.from_dict(req["plan"]), threads=req["threads"],
                 min_steps=config.min_steps, weighting=req["weighting"],
                 dp=DPConfig(**req["dp"]) if "dp" in req else None, execution=execution)
