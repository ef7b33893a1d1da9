"""Add examples to a store: they become new shards, nothing already trained is retrained (`ModelStore.add`).

    store.add(model.cache_features(week2), source=DataSource(path=Path("week2")))

The new examples (trunk features of the store's backbone, with ids, labelled in the store's classes) are split
into `shards` new shards (default: as many as keep the store's mean shard size, at least one) with the store's
plan kind and seed, or by the given `ShardPlan` over exactly their ids. Each new shard is trained with the store's
recipe, threads and DP setting and seeded `shard_seed(store seed, index)` by its index after the existing ones.
The store then recomposes (new shards join the composition; an explicit subset grows by them) and commits through
the protocol of `taft.store.commit`; the features' cache entry and `source` are kept in the manifest's
`additions`, so forgetting by retraining and `resume` reopen the right data.

Refused in one line before anything is written: data in other classes than the store's; an id the store holds;
an id the store forgot, unless `readd_forgotten` (it then leaves the forgotten list and its old shard's plan, and
the audit entry lists it under "readded").

Exactness: a new shard depends only on its ids, its index, the store seed and the recipe, so adding B and then
forgetting X ⊂ B with mode "retrain" gives, tensor for tensor, the store that added B∖X with B's plan without X
(`ShardPlan.without`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from taft.backbones.base import Backbone
from taft.data.source import DataSource
from taft.errors import TaftError
from taft.parallel.execution import Execution
from taft.parallel.shards import FeatureData
from taft.store.commit import begin, commit
from taft.store.content import shard_hashes
from taft.store.create import check_augment, check_dp, data_identity, ids_and_labels, train_into, warn_uncovered
from taft.store.forget import backbone_for
from taft.store.journal import Pending, audit_noop, write_pending
from taft.store.layout import StoreLayout, crashpoint
from taft.store.manifest import Addition, Composition, Manifest, ShardEntry, load_manifest
from taft.store.plan import PLAN_KINDS, ShardPlan, make_plan, shard_seed
from taft.wording import counted

_LISTED = 10


@dataclass(frozen=True)
class AddResult:
    """shards: the new shards' indices; n: the examples added; readded: forgotten ids trained again; resumed: an
    interrupted addition was completed (or had already committed)."""

    shards: list[int]
    n: int
    readded: list[str]
    resumed: bool = False


def check_new_ids(m: Manifest, ids: Sequence[str], readd_forgotten: bool) -> list[str]:
    """The forgotten ids among `ids` (to re-add); `TaftError` for an id the store holds, or a forgotten one
    without `readd_forgotten`."""
    forgotten = set(m.forgotten)
    held = set(m.plan.ids) - forgotten
    again = [i for i in ids if i in held]
    if again:
        raise TaftError(f"{counted(len(again), 'id')} {'is' if len(again) == 1 else 'are'} already in the store, "
                        f"e.g. {again[:_LISTED]}; new examples need new ids (a folder's ids are its image paths: "
                        "give new images new names); nothing was changed")
    readded = sorted(i for i in ids if i in forgotten)
    if readded and not readd_forgotten:
        raise TaftError(f"{counted(len(readded), 'id')} {'was' if len(readded) == 1 else 'were'} forgotten by the "
                        f"store, e.g. {readded[:_LISTED]}; to train on them again, re-add them deliberately with "
                        "readd_forgotten=True (it is written to the audit log); nothing was changed",
                        arguments=("readd_forgotten",))
    return readded


def check_classes(m: Manifest, train: FeatureData) -> None:
    """`TaftError` naming the first class of the data the store does not have."""
    names = list(m.model.class_names)
    if hasattr(train, "class_names"):
        unknown = [c for c in train.class_names if c not in names]
        if unknown:
            raise TaftError(f"class {unknown[0]!r} of the new data is not one of the store's classes "
                            f"{names[:_LISTED]}; a store learns a fixed set of classes")
        if list(train.class_names) != names:
            raise TaftError(f"the new data's classes {list(train.class_names)[:_LISTED]} are not in the store's "
                            f"order {names[:_LISTED]}: open the data with the store's class names")
    bad = sorted({y for y in ids_and_labels(train)[1] if not 0 <= y < len(names)})
    if bad:
        raise TaftError(f"labels {bad[:_LISTED]} of the new data are not among the store's {len(names)} classes")


def addition_plan(m: Manifest, train: FeatureData, shards: int | None, plan: ShardPlan | str | None) -> ShardPlan:
    """The new examples' shards: `plan` (a `ShardPlan` over exactly their ids), or `shards` shards (default: the
    store's mean shard size) of kind `plan` (default the store's) seeded by the store's plan seed."""
    ids, labels = ids_and_labels(train)
    if isinstance(plan, ShardPlan):
        if sorted(plan.ids) != sorted(ids):
            raise TaftError("the given shard plan's ids are not the new data's ids")
        if shards is not None and shards != plan.num_shards:
            raise TaftError(f"{shards} shards asked for, but the given plan has {plan.num_shards}")
        return plan
    if plan is not None and plan not in PLAN_KINDS:
        raise TaftError(f"plan must be a ShardPlan or one of {PLAN_KINDS}, got {plan!r}")
    if shards is None:
        mean = len(m.plan.ids) / m.plan.num_shards
        shards = min(len(ids), max(1, round(len(ids) / mean)))
    return make_plan(ids, labels, shards, m.plan.seed, plan or m.plan.kind)


def grown(m: Manifest, entries: Sequence[ShardEntry], addition: Addition) -> Manifest:
    """`m` with the new shard `entries` (indices after the existing ones) and their `addition`: the plan grows by
    their ids, re-added ids leave the forgotten list and their old shards' plan, and an explicit composition subset
    grows by the new trained shards."""
    m2 = copy.deepcopy(m)
    readded = set(addition.readded)
    m2.plan = ShardPlan(m.plan.kind, m.plan.seed,
                        m.plan.without(readded).shards + tuple(tuple(e.ids) for e in entries))
    m2.forgotten = [i for i in m.forgotten if i not in readded]
    m2.shards.extend(entries)
    if m.composition.subset is not None:
        m2.composition = Composition(m.composition.weighting,
                                     m.composition.subset + [e.index for e in entries if e.trained])
    m2.additions.append(addition)
    return m2


def add_examples(root: str | Path, train: FeatureData, *, shards: int | None = None,
                 plan: ShardPlan | str | None = None, source: DataSource | None = None,
                 backbone: Backbone | None = None, readd_forgotten: bool = False,
                 execution: Execution = Execution()) -> AddResult:
    """Add the examples of `train` to the store at `root` as new shards (see the module doc). `source`: where they
    came from (recorded, with each new shard's content hash there); `backbone`: the store's (default: loaded by
    name where shards train). A rerun with the same arguments after an interruption completes the addition."""
    layout = StoreLayout(root)
    with execution.connected() as execution, layout.locked():
        m = load_manifest(layout)
        request = {"data": data_identity(train), "shards": shards, "readd_forgotten": readd_forgotten,
                   "plan": plan.to_dict() if isinstance(plan, ShardPlan) else plan,
                   "source": source.resolved().to_dict() if source is not None else None}
        status, pending = begin(layout, m, "add", request)
        if status == "done":
            a = pending.audit
            return AddResult(a["shards"], a["n"], a.get("readded", []), resumed=True)
        ids, labels = ids_and_labels(train)
        done = next((a for a in m.additions if a.op == "add" and a.data.get("features") == request["data"]
                     and sorted(i for k in a.shards for i in m.plan.shards[k]) == sorted(ids)), None)
        if done is not None:  # a rerun of a finished addition (e.g. after `verify(repair=True)` finished it)
            audit_noop(layout, "add", shards=done.shards, n=len(ids), already_added=done.op_id)
            return AddResult(done.shards, len(ids), done.readded, resumed=True)
        check_classes(m, train)
        check_augment(m.config, train)
        readded = check_new_ids(m, ids, readd_forgotten)
        new = addition_plan(m, train, shards, plan)
        start = len(m.shards)
        todo = {start + j: list(s) for j, s in enumerate(new.shards) if s}
        check_dp(m.dp_config, m.composition.weighting, [len(s) for s in new.shards], m.config.batch_size)
        warn_uncovered(new, ids, labels)
        ref = backbone_for(m, backbone, execution.remote)
        hashes = {}
        if source is not None:
            hashes = shard_hashes(source.open(backbone if backbone is not None else ref.load()), todo)
        if pending is None:
            pending = Pending.new("add", request, m.generation, {"shards": sorted(todo), "n": len(ids),
                                                                 **({"readded": readded} if readded else {})})
            write_pending(layout, pending)
            crashpoint("after-pending")
        files = train_into(layout, pending, todo, train=train, backbone=ref, info=m.model, spec=m.spec,
                           base=m.config, threads=m.threads, plan_kind=new.kind, execution=execution,
                           dp=m.dp_config)
        addition = Addition("add", pending.op_id, pending.time, list(range(start, start + new.num_shards)),
                            {"features": data_identity(train), "source": request["source"]}, readded=readded)
        entries = [ShardEntry(index=i, status="trained" if i in files else "empty",
                              file=files[i].file if i in files else None,
                              sha256=files[i].sha256 if i in files else None, ids=list(shard_ids),
                              seed=shard_seed(m.config.seed, i), privacy=files[i].privacy if i in files else None,
                              data_sha256=hashes.get(i)) for i, shard_ids in enumerate(new.shards, start)]
        commit(layout, grown(m, entries, addition), pending)
    return AddResult(sorted(todo), len(ids), readded, resumed=status == "resume")


__all__ = ["AddResult", "add_examples", "addition_plan", "check_new_ids", "grown"]
