"""Retrain trained shards from what the manifest records (their ids, seeds, recipe and threads), as one journaled
operation: how `ModelStore.verify(repair=True)` restores a shard whose file is missing or damaged.

The retrained shard replaces the shard's file and hash in the manifest (a new file: its metadata records when it
was written); the composed model is recomputed at the commit. On the same device and torch threads the tensors
are those of the lost file, which the composed model's content hash confirms when it was intact before
(`RetrainResult.exact`). The training data must still be what the shard was trained on (`taft.store.forget`'s
checks). A DP store's shard is not retrained: a new private run would spend its privacy budget again.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from taft.backbones.base import Backbone
from taft.errors import TaftError
from taft.parallel.execution import Execution
from taft.parallel.shards import BackboneSpec, FeatureData
from taft.store.commit import begin, commit
from taft.store.create import train_into
from taft.store.forget import Retraining, backbone_for
from taft.store.journal import Pending, write_pending
from taft.store.layout import StoreLayout, crashpoint
from taft.store.manifest import Manifest, load_manifest
from taft.wording import counted


@dataclass(frozen=True)
class RetrainResult:
    """The retrained shards, and whether the composed model came out bit-identical to the one before (None when
    there was no composed model to compare with)."""

    shards: list[int]
    exact: bool | None


def check_retrainable(m: Manifest, shards: list[int]) -> None:
    """`TaftError` unless every index in `shards` is a trained shard of a store without DP."""
    if m.dp is not None:
        raise TaftError("the shards of a DP store are not retrained (a new private run would spend the privacy "
                        "budget again): restore the shard's file, or forget its examples")
    wrong = [i for i in shards if not (0 <= i < len(m.shards) and m.shards[i].trained)]
    if wrong or not shards:
        raise TaftError(f"only trained shards can be retrained; not {wrong or 'an empty list'}")
    undated = [i for i in shards if not m.retrainable(i)]
    if undated:
        raise TaftError(f"shards {undated} were imported without their training data and cannot be retrained: restore "
                        "their files, or import them again")


def retrain(root: str | Path, shards: list[int], *, features: FeatureData | None = None,
            backbone: Backbone | None = None, execution: Execution = Execution(),
            accept_changed_data: bool = False) -> RetrainResult:
    """Retrain `shards` of the store at `root` as recorded and commit them (see the module doc). `features`,
    `backbone`, `accept_changed_data`: as for `forget` in retrain mode. A rerun after an interruption completes
    it."""
    shards = sorted({int(i) for i in shards})
    layout = StoreLayout(root)
    with execution.connected() as execution, layout.locked():
        m = load_manifest(layout)
        check_retrainable(m, shards)
        request = {"shards": shards}
        status, pending = begin(layout, m, "retrain", request)
        if status == "done":
            return RetrainResult(shards, None)
        retraining = Retraining.of(m, features, backbone, shards, set(), accept_changed_data)
        ref = backbone_for(m, backbone, execution.remote)
        if isinstance(ref, BackboneSpec) and not execution.remote:
            ref = ref.load()  # here, before anything is written: a backbone that cannot be loaded fails now
        if pending is None:
            accepted = {"accepted_changed_data": retraining.accepted} if retraining.accepted else {}
            pending = Pending.new("retrain", request, m.generation, {"shards": shards, **accepted})
            write_pending(layout, pending)
            crashpoint("after-pending")
        files = train_into(layout, pending, {i: list(m.shards[i].ids) for i in shards}, train=retraining.train,
                           backbone=ref, info=m.model, spec=m.spec,
                           base=m.config, threads=m.threads, plan_kind=m.plan.kind, execution=execution,
                           seeds={i: m.shards[i].seed for i in shards})
        m2 = copy.deepcopy(m)
        for index, entry in files.items():
            m2.shards[index].file, m2.shards[index].sha256 = entry.file, entry.sha256
        m2 = commit(layout, m2, pending)
    before, after = m.composed, m2.composed
    exact = None if before is None or after is None else before.content_sha256 == after.content_sha256
    return RetrainResult(shards, exact)


def describe(result: RetrainResult) -> str:
    """The retrain in words, for a report."""
    exact = {True: "the composed model is bit-identical to the one before",
             False: "the composed model differs from the one before (another device, torch or thread count)",
             None: "no composed model to compare with"}[result.exact]
    return f"retrained {counted(len(result.shards), 'shard')} {result.shards} as recorded: {exact}"
