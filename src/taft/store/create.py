"""Create a model store: plan the shards, train them in parallel, compose, commit (`ModelStore.create`).

    store = ModelStore.create("stores/cifar", features, model, TrainConfig(epochs=10, seed=0), shards=8)

`features` is the training data's trunk features (`cache_features(...)`: workers share that cache entry), a
tuple (features, labels, ids) whose labels index the model's classes, or the raw dataset (images, texts): then
every shard streams its examples through the trunk on every batch (nothing is cached; `config.augment` needs it),
and so does every later retraining, from the recorded data source. `model` (a `Classifier` with its seeded base
head) says what every shard is; the store seed is `config.seed`: it seeds the plan and, through `shard_seed(seed,
i)`, each shard's data order; every shard uses the model's `head_seed`, so all share w0. Every shard trains at
least `min_steps` optimizer steps (default `SHARD_MIN_STEPS`, also `taft shards train`'s).

With `dp=DPConfig(...)` every shard is trained with DP-SGD on its own, disjoint data: the budget (ε target or σ,
δ, C) applies per shard, and δ must be below 1/n of each shard (its own training set). Each shard checkpoint
carries its ledger, and the store's guarantee is their parallel composition (max ε, max δ; manifest key
`privacy`, also in the composed checkpoint's metadata). Size weighting is refused under DP: its weights would
depend on the private shard sizes. DP stores are not bit-reproducible
by default (every DP-SGD run draws a fresh secret seed); with `dp.seed` given, shard i's k-th training (k = 0 at
creation, +1 per retraining) is seeded by `dp_shard_seed(dp.seed, i, k)`: reproducible, and every release has its
own noise, but anyone who knows the seed can undo the noise.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from taft.backbones.base import Backbone
from taft.checkpoint import ModelInfo
from taft.data.feature_cache import CachedFeatures
from taft.data.source import DataSource
from taft.errors import TaftError
from taft.model import Classifier
from taft.parallel.execution import Execution
from taft.parallel.executors import default_threads, default_workers
from taft.parallel.shards import BackboneSpec, FeatureData, ShardResult, ShardTask, backbone_ref, shard_data
from taft.privacy import DPConfig, PrivacyLedger, sequential_composition
from taft.privacy.config import expected_batch_size
from taft.spec import LINEAR_METHODS, ModelSpec
from taft.store.commit import commit, finish, record_shard, reusable, write_shard
from taft.store.content import shard_hashes
from taft.store.delta_sum import WEIGHTINGS
from taft.store.journal import Pending, read_pending, write_pending
from taft.wording import counted
from taft.store.layout import StoreLayout, crashpoint
from taft.store.manifest import Composition, Manifest, ShardEntry, ShardFile, load_manifest
from taft.store.plan import PLAN_KINDS, ShardPlan, make_plan, shard_seed
from taft.train import TrainConfig
from taft.train.config import run_record
from taft.train.sources import is_dataset

# The minimum optimizer steps of every shard (`ModelStore.create` and `taft shards train`): more epochs on small
# shards, so composing K small shards does not compose K under-trained models. Chosen on a validation split
# (docs/results.md, "Shards that keep their accuracy": CIFAR-10 mini, 1,000 training images in K = 10 shards of
# 100, 10 epochs: composed validation top-1 59.2 % with 0 extra steps (40 steps per shard), 61.8 % with 100, 64.0 %
# with 300, about the 320 steps of one model on all 1,000 images: 69.0 %); shards with ≥ 300 steps in their epochs
# train exactly those epochs.
SHARD_MIN_STEPS = 300


def with_min_steps(config: TrainConfig, min_steps: int) -> TrainConfig:
    """`config` with `min_steps`; `TaftError` if the config sets other minimum steps (give them as `min_steps`)."""
    if config.min_steps not in (0, min_steps):
        raise TaftError(f"the config asks for min_steps={config.min_steps} but the store for {min_steps}: give a "
                        "store's minimum steps per shard as its min_steps")
    return replace(config, min_steps=min_steps)


def check_config(spec: ModelSpec, config: TrainConfig, text: bool = False, dp: DPConfig | None = None,
                 batch_size: int | None = None) -> TrainConfig:
    """The resolved config (lr and optimizer filled in for `spec`'s method and ordinary or DP training with `dp`,
    whose default rate follows the expected batch `batch_size` when known; the epochs each shard trains are resolved
    by `fit` from its size and `min_steps`), if shards of `spec` trained with it can be composed exactly."""
    if not spec.linear:
        raise TaftError(f"method {spec.method!r} cannot be sharded: composition is exact only for models linear "
                        f"in their trained weights ({', '.join(LINEAR_METHODS)})")
    if spec.head_init != "random":
        raise TaftError("head_init='probe' cannot be sharded: a probe head fitted on all the data would put every "
                        "example into the shared w0 (nothing could be forgotten); use head_init='random'")
    return config.resolved(spec.method, text=text, private=dp is not None, epsilon=dp.epsilon if dp else None,
                           batch_size=batch_size)


def check_augment(config: TrainConfig, train: FeatureData) -> None:
    """`TaftError` when the recipe augments but `train` is cached features (a cache entry holds one fixed view)."""
    if config.augment != "none" and not is_dataset(train):
        raise TaftError(f"augment={config.augment!r} needs the raw dataset (images), streamed through the trunk by "
                        "every shard, not cached features", arguments=("augment",))


def data_identity(train: FeatureData) -> dict[str, Any]:
    """Names the training data (for the manifest and to recognise a rerun); a raw dataset is marked "streamed":
    its shards run the trunk on every batch, and so does their retraining (from the data source)."""
    if isinstance(train, CachedFeatures):
        return {"path": str(Path(train.path).resolve()), "entry": train.meta.get("entry")}
    ids, _ = ids_and_labels(train)
    digest = hashlib.sha256(json.dumps(ids).encode()).hexdigest()
    if is_dataset(train):
        return {"path": None, "entry": None, "ids_sha256": digest, "streamed": True}
    return {"path": None, "entry": None, "ids_sha256": digest}


def ids_and_labels(train: FeatureData) -> tuple[list[str], list[int]]:
    if isinstance(train, CachedFeatures) or is_dataset(train):
        return [str(i) for i in train.ids], [int(y) for y in train.labels]
    if isinstance(train, (tuple, list)) and len(train) == 3:
        return [str(i) for i in train[2]], [int(y) for y in train[1]]
    raise TaftError("store training data must be CachedFeatures, a tuple (features, labels, ids) or a raw dataset")


def shard_config(base: TrainConfig, index: int, seed: int | None = None) -> TrainConfig:
    """The recipe shard `index` trains with: the store's, seeded `seed` (default `shard_seed(base.seed, index)`)."""
    return replace(base, seed=shard_seed(base.seed, index) if seed is None else seed)


def dp_shard_seed(dp_seed: int, index: int, release: int) -> int:
    """The DP-SGD seed (sampling and noise) of the `release`-th training (0 = at creation) of shard `index` in a
    store created with DP seed `dp_seed` (62-bit, deterministic; distinct per shard and release)."""
    digest = hashlib.sha256(f"taft-dp-shard-seed\0{dp_seed}\0{index}\0{release}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 2


def releases(ledger: Mapping[str, Any] | None) -> int:
    """How many trainings a shard's ledger accounts for (0 for none)."""
    if not ledger:
        return 0
    led = PrivacyLedger.from_dict(ledger)
    return len(led.components) if led.components is not None else 1


def shard_dp(dp: DPConfig | None, index: int, release: int) -> DPConfig | None:
    """The DPConfig shard `index`'s `release`-th training runs with: its own seed when the store's is given."""
    if dp is None or dp.seed is None:
        return dp
    return replace(dp, seed=dp_shard_seed(dp.seed, index, release))


def check_dp(dp: DPConfig | None, weighting: str, sizes: Sequence[int] = (), batch_size: int = 1) -> None:
    """Refuse what a DP store cannot do, before any training: size weighting; a non-empty shard of n examples
    with n < 2, δ ≥ 1/n or an expected batch size above n."""
    if dp is None:
        return
    if weighting == "size":
        raise TaftError("size weighting is not allowed with DP: its weights depend on the private shard sizes; use "
                        "uniform weighting")
    filled = [(n, i) for i, n in enumerate(sizes) if n]
    if not filled:
        return
    (n_min, i_min), (n_max, i_max) = min(filled), max(filled)
    B = expected_batch_size(dp, n_min, batch_size)
    if n_min < 2 or B > n_min:
        raise TaftError(f"shard {i_min} has {n_min} examples, too few for DP-SGD with expected batch size {B}: use "
                        "fewer shards or a smaller expected batch size")
    if dp.delta >= 1 / n_max:
        raise TaftError(f"delta={dp.delta:g} is not below 1/n = {1 / n_max:.3g} for shard {i_max} of n={n_max} "
                        "examples: under DP each shard is its own training set; use a smaller delta (e.g. ≤ 1/(10 n) "
                        "for the largest shard)")


def train_into(layout: StoreLayout, pending: Pending, todo: Mapping[int, list[str]], *, train: FeatureData,
               backbone: Backbone | BackboneSpec, info: ModelInfo, spec: ModelSpec, base: TrainConfig, threads: int,
               plan_kind: str, execution: Execution, dp: DPConfig | None = None,
               prior: Mapping[int, Mapping[str, Any] | None] | None = None,
               seeds: Mapping[int, int] | None = None) -> dict[int, ShardFile]:
    """Train shards {index: ids} (reusing the journal's finished ones) and write their files; {index: file}. Shard
    i's data order is seeded by `seeds[i]` (default `shard_seed(base.seed, i)`; an imported shard keeps its own).

    With `dp`, by DP-SGD; `prior` ({index: ledger}) holds the ledgers of the shards' earlier releases (retraining):
    a retrained shard's ledger is then the sequential composition of those and the new run (see
    `sequential_composition`: the old model, trained on a superset of the shard's data, may already be public).
    Shards train where `execution` says (`Execution.placement`: one process worker per visible GPU by default)."""
    prior = prior or {}
    task_device, pinned = execution.placement()
    done: dict[int, ShardFile] = {}
    tasks = []
    for index, ids in sorted(todo.items()):
        entry = reusable(layout, pending, index, sorted(ids))
        if entry is not None:
            done[index] = entry
            continue
        config = shard_config(base, index, (seeds or {}).get(index))
        tasks.append(ShardTask(index=index, spec=spec, config=config, data=shard_data(train, ids),
                               class_names=tuple(info.class_names), backbone=backbone, fingerprint=info.fingerprint,
                               threads=threads, dp=shard_dp(dp, index, releases(prior.get(index))),
                               device=task_device))
    if not tasks:
        return done

    def on_result(result: ShardResult) -> None:
        privacy = result.privacy
        if privacy is not None and prior.get(result.index):
            privacy = sequential_composition([prior[result.index], privacy]).to_dict()
        entry = write_shard(layout, info, result, created=pending.time, store_seed=base.seed, plan_kind=plan_kind,
                            privacy=privacy)
        done[result.index] = entry
        record_shard(layout, pending, result.index, entry)

    execution.run(tasks, on_result, pinned)
    return done


def resolve_plan(plan: ShardPlan | str | None, shards: int | None, train: FeatureData, seed: int) -> ShardPlan:
    """The given plan, checked against the data's ids, or one of `shards` shards of kind `plan` (default
    "random") made with `seed`."""
    ids, labels = ids_and_labels(train)
    if not isinstance(plan, ShardPlan):
        if shards is None:
            raise TaftError("give the number of shards or a shard plan")
        if plan is not None and plan not in PLAN_KINDS:
            raise TaftError(f"plan must be a ShardPlan or one of {PLAN_KINDS}, got {plan!r}")
        return make_plan(ids, labels, shards, seed, plan or "random")
    if shards is not None and shards != plan.num_shards:
        raise TaftError(f"{shards} shards asked for, but the given plan has {plan.num_shards}")
    have, want = set(ids), set(plan.ids)
    if have != want:
        raise TaftError(f"the shard plan's ids differ from the data's: {len(want - have)} planned ids are not in "
                        f"the data (e.g. {sorted(want - have)[:10]}), {len(have - want)} data ids are not "
                        f"planned (e.g. {sorted(have - want)[:10]})")
    return plan


def warn_uncovered(plan: ShardPlan, ids: Sequence[str], labels: Sequence[int]) -> None:
    """Warn (one line) when shards of a random plan lack classes of the data (a shard's model cannot learn the
    classes it never sees) or have fewer examples than the data has classes. Class plans lack classes by design."""
    if plan.kind == "class":
        return
    label = dict(zip(ids, labels))
    classes = len(set(labels))
    lacking = [i for i, s in enumerate(plan.shards) if s and len({label[x] for x in s}) < classes]
    if not lacking:
        return
    tiny = sum(len(plan.shards[i]) < classes for i in lacking)
    first = plan.shards[lacking[0]]
    warnings.warn(f"{len(lacking)} of {counted(plan.num_shards, 'shard')} lack some of the data's {classes} classes"
                  + (f" ({tiny} have fewer examples than classes)" if tiny else "")
                  + f", e.g. shard {lacking[0]}: {counted(len(first), 'example')} of "
                  f"{counted(len({label[x] for x in first}), 'class', 'classes')}; fewer shards would let each learn "
                  "every class", stacklevel=3)


def create_store(root: str | Path, train: FeatureData, model: Classifier, config: TrainConfig, *,
                 shards: int | None = None, plan: ShardPlan | str | None = None, threads: int | None = None,
                 min_steps: int = SHARD_MIN_STEPS, weighting: str = "uniform", source: DataSource | None = None,
                 dp: DPConfig | None = None, execution: Execution = Execution()) -> Path:
    """Train a store of `shards` shards of kind `plan` ("random" default, or "class"), or on the given `plan` (a
    `ShardPlan` whose ids are exactly the data's), in `root` (new or empty); compose them with `weighting`, and
    commit. Returns `root`. The module doc says what `model`, `config` and `min_steps` are.

    threads: torch threads per shard task (default max(1, cores // workers)); recorded in the store and reused by
    retraining, since it changes float summation order. A rerun with the same arguments after an interruption
    resumes the creation. source: where the training data came from (saved with absolute paths;
    `ModelStore.training_features` rebuilds the features from it when their cache entry is gone), with the content
    hash of each shard's examples there (`taft.store.content`).
    dp: train every shard with DP-SGD (see the module doc; "size" weighting is then refused). execution: how and
    where shards train (`Execution`); not part of the store's recipe (a store made on a GPU can be resumed or
    retrained on the CPU)."""
    _, pinned = execution.placement()  # checked before anything is written
    layout = StoreLayout(root)
    backbone, spec = model.backbone, model.spec
    config = with_min_steps(config, min_steps)
    base = check_config(spec, config, text=backbone.is_text, dp=dp)
    if Classifier.from_spec(backbone, model.class_names, spec).fingerprint != model.fingerprint:
        raise TaftError("a store's shards share the base head seeded by head_seed: build the model without "
                        "head_weight")
    if weighting not in WEIGHTINGS:
        raise TaftError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    check_augment(base, train)
    check_dp(dp, weighting)
    if hasattr(train, "class_names") and list(train.class_names) != model.class_names:
        raise TaftError(f"the data's classes {list(train.class_names)[:10]} differ from the model's "
                        f"{model.class_names[:10]}")
    plan = resolve_plan(plan, shards, train, base.seed)
    warn_uncovered(plan, *ids_and_labels(train))
    check_dp(dp, weighting, [len(s) for s in plan.shards], base.batch_size)
    if dp is not None:  # one rate for every shard: the default for the smallest shard's expected batch
        smallest = min(len(s) for s in plan.shards if s)
        base = check_config(spec, config, text=backbone.is_text, dp=dp,
                            batch_size=expected_batch_size(dp, smallest, config.batch_size))
    hashes = shard_hashes(source.open(backbone), dict(enumerate(plan.shards))) if source is not None else {}
    info = model.info()
    record = run_record(spec, base)
    todo = {i: list(s) for i, s in enumerate(plan.shards) if s}
    if threads is None:
        threads = default_threads(execution.workers or default_workers(len(todo), pinned))
    request = {"plan": plan.to_dict(), "config": record, "fingerprint": info.fingerprint,
               "threads": threads, "weighting": weighting, "data": data_identity(train),
               "backbone": {"name": backbone.name, "preprocess": json.loads(json.dumps(backbone.preprocess.to_dict())),
                            "dtype": info.dtype, "fingerprint": backbone.fingerprint}}
    if dp is not None:
        request["dp"] = dp.to_dict()
    with execution.connected() as execution, layout.locked(create=True):
        pending = read_pending(layout)
        if layout.manifest.exists():
            m = load_manifest(layout)
            if pending is not None and m.last_op == pending.op_id:  # committed, not yet finished
                finish(layout, m, pending)
                if pending.request == request:
                    return layout.root
            raise TaftError(f"{layout.root} already holds a model store; forget or compose there, or choose another "
                            "directory")
        if pending is not None and (pending.op != "create" or pending.request != request):
            raise TaftError(f"{layout.root} holds an interrupted store creation with other settings; rerun that "
                            "creation, or remove the directory")
        if pending is None:
            others = [p.name for p in layout.root.iterdir() if p.name != layout.lock_file.name]
            if others:
                raise TaftError(f"{layout.root} is not empty ({', '.join(sorted(others)[:5])}); a store needs a new "
                                "or empty directory")
            pending = Pending.new("create", request, 0, {"shards": sorted(todo), "n": len(plan.ids)})
            write_pending(layout, pending)
            crashpoint("after-pending")
        ref = backbone_ref(backbone, by_name=execution.remote)
        files = train_into(layout, pending, todo, train=train, backbone=ref, info=info, spec=spec, base=base,
                           threads=threads, plan_kind=plan.kind, execution=execution, dp=dp)
        m = Manifest(generation=0, last_op=None, created=pending.time, updated=pending.time, model=info,
                     train_config=record, threads=threads, plan=plan,
                     data={"features": data_identity(train),
                           "source": source.resolved().to_dict() if source else None},
                     shards=[ShardEntry(index=i, status="trained" if s else "empty",
                                        file=files[i].file if s else None, sha256=files[i].sha256 if s else None,
                                        ids=list(s), seed=shard_seed(base.seed, i),
                                        privacy=files[i].privacy if s else None, data_sha256=hashes.get(i))
                             for i, s in enumerate(plan.shards)],
                     composition=Composition(weighting, None), dp=dp.to_dict() if dp is not None else None)
        commit(layout, m, pending)
    return layout.root


__all__ = ["SHARD_MIN_STEPS", "check_augment", "check_config", "check_dp", "create_store", "data_identity",
           "dp_shard_seed", "releases", "shard_config", "shard_dp", "train_into", "with_min_steps"]
