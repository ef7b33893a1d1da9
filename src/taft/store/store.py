"""`ModelStore`: a read-side view of a store directory, plus `resume` for an interrupted operation.

    store = ModelStore("stores/cifar")
    store.info()                     # a JSON-able summary
    clf, meta = store.load_composed()   # the composed model (an ordinary checkpoint)
    store.training_features()        # its training data's trunk features (cached, or rebuilt from its data source)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from taft.backbones import load_backbone_like
from taft.backbones.base import Backbone
from taft.model import LoadedCheckpoint, load_checkpoint
from taft.data.source import DataSource
from taft.errors import TaftError
from taft.parallel.shards import BackboneSpec, FeatureData
from taft.privacy import DPConfig
from taft.store.commit import finish
from taft.store.compose import compose_store
from taft.store.create import ExecutorArg, create_store
from taft.store.forget import ForgetResult, forget, training_features
from taft.store.journal import describe, read_audit, read_pending
from taft.fileio import read_json
from taft.store.layout import StoreLayout
from taft.store.manifest import Manifest, load_manifest, members
from taft.store.plan import ShardPlan
from taft.data.feature_cache import CachedFeatures
from taft.data.trunk_features import cache_features
from taft.model import Classifier
from taft.spec import ModelSpec
from taft.train import TrainConfig


def is_store(root: str | Path) -> bool:
    """Whether `root` is a store directory (it has a manifest, readable or not)."""
    return StoreLayout(root).manifest.exists()


def reused_plan(path: str | Path, ids: list[str]) -> tuple[ShardPlan, int | None]:
    """The shard plan of a store directory or a plan JSON file (a store manifest, `{"plan": ...}` or the plan
    itself), restricted to `ids`; and the store's torch threads per shard (None for a plan file): part of the
    recipe, since they fix the float summation order."""
    path = Path(path)
    if path.is_dir():
        m = load_manifest(StoreLayout(path))
        plan, threads = ShardPlan.from_dict(m["plan"]), m["threads"]
    else:
        d = read_json(path, "shard plan file")
        plan, threads = ShardPlan.from_dict(d.get("plan", d) if isinstance(d, dict) else d), None
    return plan.without(set(plan.ids) - set(ids)), threads


class ModelStore:
    """A store directory. Every property re-reads the files, so a view never goes stale."""

    def __init__(self, root: str | Path):
        self.layout = StoreLayout(root)
        self.root = self.layout.root

    @property
    def manifest(self) -> Manifest:
        return load_manifest(self.layout)

    @property
    def composed_path(self) -> Path | None:
        m = self.manifest
        return self.layout.path(m["composed"]["file"]) if m["composed"] else None

    def shard_path(self, index: int) -> Path | None:
        s = self.manifest["shards"][index]
        return self.layout.path(s["file"]) if s.get("file") else None

    @property
    def forgotten(self) -> list[str]:
        return list(self.manifest["forgotten"])

    @property
    def data_source(self) -> DataSource | None:
        """Where the training data came from, if the store was given it (`taft shards train` records it)."""
        src = (self.manifest["data"] or {}).get("source")
        return DataSource.from_dict(src) if src else None

    def training_features(self, *, device=None, progress: bool = True):
        """The training data's trunk features: the store's cache entry if it is still there, else rebuilt from
        its data source with the store's backbone (checked to have the same weights). `TaftError` when neither
        is available."""
        m = self.manifest
        try:
            return training_features(m, None)
        except TaftError:
            source = self.data_source
            if source is None:
                raise
        backbone = load_backbone_like(m["backbone"], m["preprocess"])
        if backbone.fingerprint != m["backbone_fingerprint"]:
            raise TaftError(f"backbone {m['backbone']!r} now has other weights than the store was trained with")
        dtype = {"float32": torch.float32, "float16": torch.float16}[source.cache_dtype]
        return cache_features(source.open(backbone), backbone, m["tangent_blocks"], dtype=dtype, device=device,
                              autocast=source.autocast, progress=progress)

    def resume_retrains(self) -> bool:
        """Whether completing the store's interrupted operation trains shards on the store's data (a forget in
        retrain mode: `resume` then needs the training features)."""
        if not self.layout.manifest.exists():
            return False
        pending = read_pending(self.layout)
        return pending is not None and pending["op"] == "forget" and pending["request"].get("mode") == "retrain"

    def audit(self) -> list[dict[str, Any]]:
        return read_audit(self.layout)[0]

    def load_composed(self, backbone: Backbone | None = None) -> LoadedCheckpoint:
        path = self.composed_path
        if path is None:
            raise TaftError(f"store {self.root} has no composed model (no trained shard is composed)")
        return load_checkpoint(path, backbone)

    def load_shard(self, index: int, backbone: Backbone | None = None) -> LoadedCheckpoint:
        path = self.shard_path(index)
        if path is None:
            raise TaftError(f"shard {index} of store {self.root} holds no trained model")
        return load_checkpoint(path, backbone)

    def ids(self, shard: int | None = None) -> list[str]:
        """The example ids the store holds (forgotten ones removed), shard by shard, each shard's sorted; only
        shard `shard`'s with it. `TaftError` for a shard index the plan does not have."""
        shards = self.manifest["shards"]
        if shard is not None and not 0 <= shard < len(shards):
            raise TaftError(f"store {self.root} has shards 0..{len(shards) - 1}; there is no shard {shard}")
        return [i for s in (shards if shard is None else [shards[shard]]) for i in s["ids"]]

    def info(self) -> dict[str, Any]:
        """Summary: model, plan, shards (without their id lists), composition, forgotten count, pending op; for a DP
        store also dp (its DPConfig), privacy (the store's guarantee: the composed shards' parallel composition)
        and each shard's ledger under its `privacy`."""
        m = self.manifest
        pending = read_pending(self.layout)
        keys = ("index", "status", "n", "seed", "file", "sha256") + (("privacy",) if "dp" in m else ())
        out = {
            "store": str(self.root), "generation": m["generation"], "created": m["created"], "updated": m["updated"],
            "method": m["method"], "backbone": m["backbone"], "backbone_fingerprint": m["backbone_fingerprint"],
            "fingerprint": m["fingerprint"], "tangent_blocks": m["tangent_blocks"], "class_names": m["class_names"],
            "preprocess": m["preprocess"], "train_config": m["train_config"], "threads": m["threads"],
            "plan": {"kind": m["plan"]["kind"], "seed": m["plan"]["seed"], "k": m["plan"]["k"],
                     "n": sum(len(s) for s in m["plan"]["shards"])},
            "shards": [{k: s[k] for k in keys} for s in m["shards"]],
            "composition": {**m["composition"], "members": members(m)},
            "composed": m["composed"], "forgotten": len(m["forgotten"]),
            "audit_entries": len(self.audit()),
            "pending": describe(pending) if pending else None,
        }
        if "dp" in m:
            out.update(dp=m["dp"], privacy=m["privacy"])
        return out


def resume(root: str | Path, *, features: FeatureData | None = None, backbone: Backbone | None = None,
           executor: ExecutorArg = None, workers: int | None = None, ray_address: str | None = None,
           ray_gpus: float = 0, retries: int = 1, progress: bool = True, device: str = "cpu") -> str:
    """Complete the store's interrupted operation (from pending.json); returns what was done, in words. `device`:
    where shards still to train run (any device: it is not part of the recipe)."""
    layout = StoreLayout(root)
    with layout.locked():
        pending = read_pending(layout)
        if pending is None:
            return "nothing to resume: no operation is pending"
        if layout.manifest.exists():
            m = load_manifest(layout)
            if m.get("last_op") == pending["op_id"]:
                finish(layout, m, pending)
                return f"finished the cleanup of the committed {describe(pending)}"
    req = pending["request"]
    kw = dict(executor=executor, workers=workers, ray_address=ray_address, ray_gpus=ray_gpus, retries=retries,
              progress=progress, device=device)
    if pending["op"] == "forget":
        r: ForgetResult = forget(root, req["ids"], req["mode"], features=features, backbone=backbone, **kw)
        return f"completed the forget of {len(r.forgotten)} ids (mode {r.mode}; shards {r.shards})"
    if pending["op"] == "compose":
        compose_store(root, weighting=req["weighting"], shards=req["subset"])
        return "completed the composition"
    if pending["op"] == "create":
        data = req["data"]
        if features is None:
            if not data.get("path") or not (Path(data["path"]) / "meta.json").is_file():
                raise TaftError("cannot resume the store's creation: its training features are not in the cache; "
                                "rerun the original `taft shards train` command")
            features = CachedFeatures(data["path"])
        if backbone is None:
            spec = req.get("backbone")
            if not spec:
                raise TaftError("cannot resume the store's creation without its backbone")
            backbone = BackboneSpec.of(spec["name"], spec["preprocess"], spec["dtype"], spec["fingerprint"]).load()
        if not isinstance(features, CachedFeatures):
            raise TaftError("resuming a store's creation needs its cached training features (CachedFeatures)")
        model = Classifier.from_spec(backbone, features.class_names, ModelSpec.from_dict(req["config"]))
        create_store(root, features, model, TrainConfig.from_dict(req["config"]),
                     plan=ShardPlan.from_dict(req["plan"]), threads=req["threads"], weighting=req["weighting"],
                     dp=DPConfig(**req["dp"]) if "dp" in req else None, **kw)
        return "completed the store's creation"
    raise TaftError(f"cannot resume an operation of kind {pending['op']!r}")
