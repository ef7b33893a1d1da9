"""`ModelStore`: a store directory as an object. `ModelStore.create` trains one; its methods forget, compose,
resume, verify and read it.

    store = ModelStore.create("stores/cifar", features, model, TrainConfig(epochs=10), shards=8)
    store.add(model.cache_features(week2))            # new shards; nothing retrained
    store.import_checkpoints(["partner.safetensors"])  # a shard trained elsewhere (drop-only without its data)
    store.forget(["img/001.png"], mode="retrain")     # retrain only its shard
    store.info()                                      # a JSON-able summary
    clf, meta = store.load_composed()                 # the composed model (an ordinary checkpoint)
    store.verify(repair=True).ok
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from taft.backbones import load_backbone_like
from taft.backbones.base import Backbone
from taft.data.source import DataSource
from taft.data.trunk_features import cache_features
from taft.errors import TaftError
from taft.fileio import read_json
from taft.model import Classifier, LoadedCheckpoint, load_checkpoint
from taft.parallel.execution import Execution
from taft.parallel.shards import FeatureData
from taft.privacy import DPConfig
from taft.store.compose import compose_store
from taft.store.create import SHARD_MIN_STEPS, create_store
from taft.store.add import AddResult, add_examples
from taft.store.forget import ForgetResult, cached_entry, forget, training_features
from taft.store.import_shards import ImportResult, import_checkpoints
from taft.store.journal import Pending, read_audit, read_pending
from taft.store.layout import StoreLayout
from taft.store.manifest import Manifest, load_manifest
from taft.store.plan import ShardPlan
from taft.store.resume import resume
from taft.store.retrain import describe as describe_retrain
from taft.store.retrain import retrain
from taft.store.verify import VerifyReport, verify
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
        plan, threads = m.plan, m.threads
    else:
        d = read_json(path, "shard plan file")
        plan, threads = ShardPlan.from_dict(d.get("plan", d) if isinstance(d, dict) else d), None
    return plan.without(set(plan.ids) - set(ids)), threads


class ModelStore:
    """A store directory. Every property re-reads the files, so a view never goes stale."""

    def __init__(self, root: str | Path):
        self.layout = StoreLayout(root)
        self.root = self.layout.root

    @classmethod
    def create(cls, root: str | Path, train: FeatureData, model: Classifier, config: TrainConfig, *,
               shards: int | None = None, plan: ShardPlan | str | None = None, threads: int | None = None,
               min_steps: int = SHARD_MIN_STEPS, weighting: str = "uniform", source: DataSource | None = None,
               dp: DPConfig | None = None, execution: Execution = Execution()) -> ModelStore:
        """Train a new store in `root` (new or empty): `model` (a `Classifier`) trained with `config` on each of
        `shards` shards of `train` (kind `plan`: "random" or "class"; or the given `ShardPlan`), each for at least
        `min_steps` steps, composed with `weighting`. See `taft.store.create`; `execution`: how and where shards
        train. A rerun with the same arguments after an interruption completes the creation."""
        create_store(root, train, model, config, shards=shards, plan=plan, threads=threads, min_steps=min_steps,
                     weighting=weighting, source=source, dp=dp, execution=execution)
        return cls(root)

    # ------------------------------------------------------------------------------------------ changes
    def add(self, train: FeatureData, *, shards: int | None = None, plan: ShardPlan | str | None = None,
            source: DataSource | None = None, backbone: Backbone | None = None, readd_forgotten: bool = False,
            execution: Execution = Execution()) -> AddResult:
        """Add the examples of `train` (trunk features with ids, in the store's classes) as new shards, trained
        with the store's recipe; nothing already trained is retrained (`taft.store.add`)."""
        return add_examples(self.root, train, shards=shards, plan=plan, source=source, backbone=backbone,
                            readd_forgotten=readd_forgotten, execution=execution)

    def import_checkpoints(self, paths: Iterable[str | Path], *, features: FeatureData | None = None,
                           source: DataSource | None = None, backbone: Backbone | None = None,
                           readd_forgotten: bool = False) -> ImportResult:
        """Make each checkpoint (trained elsewhere on the store's base and recipe) a new shard; drop-only unless its
        `features` and `source` are given (`taft.store.import_shards`)."""
        return import_checkpoints(self.root, list(paths), features=features, source=source, backbone=backbone,
                                  readd_forgotten=readd_forgotten)

    def forget(self, ids: Iterable[str], mode: str = "drop", *, features: FeatureData | None = None,
               backbone: Backbone | None = None, execution: Execution = Execution(),
               accept_changed_data: bool = False) -> ForgetResult:
        """Forget example `ids`: "drop" their shards, or "retrain" them without the ids (`taft.store.forget`;
        `accept_changed_data`: retrain even on data whose content changed since the store was trained)."""
        return forget(self.root, ids, mode, features=features, backbone=backbone, execution=execution,
                      accept_changed_data=accept_changed_data)

    def compose(self, weighting: str | None = None, shards: Iterable[int] | None = None,
                out: str | Path | None = None) -> Path:
        """Make `weighting` over `shards` the store's composition, or with `out` export it to that file only
        (`taft.store.compose`); the composed file's path."""
        return compose_store(self.root, weighting=weighting, shards=shards, out=out)

    def resume(self, *, features: FeatureData | None = None, backbone: Backbone | None = None,
               execution: Execution = Execution(), accept_changed_data: bool = False) -> str:
        """Complete the store's interrupted operation (`taft.store.resume`); what was done, in words."""
        return resume(self.root, features=features, backbone=backbone, execution=execution,
                      accept_changed_data=accept_changed_data)

    def verify(self, repair: bool = False, *, backbone: Backbone | None = None) -> VerifyReport:
        """Check the store against its manifest (`taft.store.verify`). With `repair`, fix it: a shard whose file is
        missing or damaged is retrained as the manifest records it (`taft.store.retrain`, with `backbone` or the
        store's by name; not in a DP store)."""
        report = verify(self.root, repair=repair)
        if not (repair and report.lost_shards) or self.manifest.dp is not None:
            return report
        try:
            features = self.training_features(shards=report.lost_shards, progress=False)
            result = retrain(self.root, report.lost_shards, features=features,
                             backbone=backbone, execution=Execution("inline", progress=False))
        except TaftError as e:
            report.problems.append(f"the lost shards {report.lost_shards} could not be retrained: {e}")
            return report
        again = verify(self.root, repair=True)
        again.repaired = [*report.repaired, describe_retrain(result), *again.repaired]
        return again

    # ------------------------------------------------------------------------------------------ reading
    @property
    def manifest(self) -> Manifest:
        return load_manifest(self.layout)

    @property
    def composed_path(self) -> Path | None:
        composed = self.manifest.composed
        return self.layout.path(composed.file) if composed is not None else None

    def shard_path(self, index: int) -> Path | None:
        file = self.manifest.shards[index].file
        return self.layout.path(file) if file else None

    @property
    def forgotten(self) -> list[str]:
        return list(self.manifest.forgotten)

    @property
    def data_source(self) -> DataSource | None:
        """Where the creation's training data came from, if the store was given it (`taft shards train` records
        it); each later addition's is in `manifest.additions`."""
        src = (self.manifest.data or {}).get("source")
        return DataSource.from_dict(src) if src else None

    def training_features(self, *, shards: Iterable[int] | None = None, device=None,
                          progress: bool = True) -> FeatureData:
        """The training data of `shards` (default: all the store's): for each data record (the creation's, each
        addition's), its feature-cache entry if it is still there, else rebuilt from its source with the store's
        backbone (checked to have the same weights, loaded once if needed); for a store that streams, the source
        reopened as a dataset; a `FeatureUnion` over several. `TaftError` when neither is available."""
        m = self.manifest
        loaded: list[Backbone] = []

        def at_hand(record: dict[str, Any]) -> FeatureData | None:
            streamed = (record.get("features") or {}).get("streamed")
            data = None if streamed else cached_entry(record)
            if data is not None or not record.get("source"):
                return data
            if not loaded:
                loaded.append(self.backbone())
            source = DataSource.from_dict(record["source"])
            if streamed:
                return source.open(loaded[0])
            dtype = {"float32": torch.float32, "float16": torch.float16}[source.cache_dtype]
            return cache_features(source.open(loaded[0]), loaded[0], m.model.tangent_blocks, dtype=dtype,
                                  device=device, autocast=source.autocast, progress=progress)

        return training_features(m, None, shards, at_hand=at_hand)

    def backbone(self) -> Backbone:
        """The store's backbone, loaded by name with its preprocessing; `TaftError` if its weights changed."""
        m = self.manifest
        backbone = load_backbone_like(m.model.backbone, m.model.preprocess)
        if backbone.fingerprint != m.model.backbone_fingerprint:
            raise TaftError(f"backbone {m.model.backbone!r} now has other weights than the store was trained with")
        return backbone

    def template(self, backbone: Backbone | None = None) -> Classifier:
        """The model every shard starts from (the store's spec and classes, its base head), untrained, on `backbone`
        (default: `self.backbone()`): its `cache_features` builds the features of data to add or retrain on."""
        m = self.manifest
        return Classifier.from_spec(backbone or self.backbone(), list(m.model.class_names), m.spec)

    def resume_retrains(self) -> bool:
        """Whether completing the store's interrupted operation trains shards on the store's data (a forget in
        retrain mode: `resume` then needs the training features)."""
        if not self.layout.manifest.exists():
            return False
        pending = read_pending(self.layout)
        if pending is None:
            return False
        return pending.op == "retrain" or (pending.op == "forget" and pending.request.get("mode") == "retrain")

    def creation(self) -> Pending | None:
        """The journal of the store's interrupted creation while it has no manifest yet (rerun the creation, or
        `resume`, to finish it); None for a created store or a directory that is no store."""
        if self.layout.manifest.exists() or not self.layout.pending.exists():
            return None
        pending = read_pending(self.layout)
        return pending if pending.op == "create" else None

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
        shards = self.manifest.shards
        if shard is not None and not 0 <= shard < len(shards):
            raise TaftError(f"store {self.root} has shards 0..{len(shards) - 1}; there is no shard {shard}")
        return [i for s in (shards if shard is None else [shards[shard]]) for i in s.ids]

    def info(self) -> dict[str, Any]:
        """Summary: model, plan, shards (without their id lists), composition, forgotten count, pending op; for a DP
        store also dp (its DPConfig), privacy (the store's guarantee: the composed shards' parallel composition)
        and each shard's ledger under its `privacy`."""
        m = self.manifest
        d = m.to_dict()
        pending = read_pending(self.layout)
        keys = ("index", "status", "n", "seed", "file", "sha256") + (("privacy",) if m.dp is not None else ())
        out = {
            "store": str(self.root), **{k: d[k] for k in (
                "generation", "created", "updated", "method", "backbone", "backbone_fingerprint", "fingerprint",
                "tangent_blocks", "class_names", "preprocess", "train_config", "threads")},
            "plan": {"kind": m.plan.kind, "seed": m.plan.seed, "k": m.plan.num_shards, "n": len(m.plan.ids)},
            "shards": [{k: s[k] for k in keys} for s in d["shards"]],
            "composition": {**d["composition"], "members": m.members()},
            "composed": d["composed"], "forgotten": len(m.forgotten),
            "audit_entries": len(self.audit()),
            "pending": pending.describe() if pending else None,
        }
        if m.additions:
            out["additions"] = [{k: v for k, v in a.to_dict().items() if k != "op_id"} for a in m.additions]
        if m.dp is not None:
            out.update(dp=m.dp, privacy=m.privacy)
        return out
