"""Forgetting: remove example ids from a store by dropping or retraining the shards that hold them.

- mode "drop": the shards holding the ids leave the composition and their files are deleted (no training).
  Their other ids stay listed with status "dropped"; no model holds them any more.
- mode "retrain": only those shards are retrained without the ids: same per-shard seed, same threads, data in
  sorted-id order over the remaining ids; the result is bit-identical (same machine, CPU) to a store built from
  scratch on the plan without those ids (`ShardPlan.without`). A shard left with no ids becomes "empty".
Then the store is recomposed and committed (`taft.store.commit`). Forgotten ids are never trained on again.

In a DP store (`taft.store.create`) the guarantee follows: after "drop" it is recomputed over the remaining
composed shards (never larger); "retrain" trains with the store's DPConfig (a new seed per release), and since the
old model of the shard, trained on a superset of its remaining data, may already be public, the shard's ledger
becomes the sequential composition of all its releases (Σ ε, Σ δ: `sequential_composition`); the store's
guarantee is the max over the composed shards. Retrained DP shards are therefore not bit-identical to a store
built from scratch without the ids (other noise).

Unknown ids raise `TaftError` listing them (up to 10) and change nothing. Ids all already forgotten: a no-op,
logged in the audit log. An interrupted forget is completed by rerunning it (or `resume`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taft.backbones.base import Backbone
from taft.data.feature_cache import CachedFeatures
from taft.errors import FingerprintMismatchError, TaftError
from taft.parallel.execution import Execution
from taft.parallel.shards import BackboneSpec, FeatureData, FeatureUnion, backbone_ref
from taft.store.commit import begin, commit
from taft.store.create import train_into
from taft.store.content import check_unchanged, content_change, open_source, open_sources, shard_hashes
from taft.store.journal import Pending, audit_noop, write_pending
from taft.wording import counted
from taft.store.layout import StoreLayout, crashpoint
from taft.store.manifest import Manifest, ShardEntry, load_manifest

MODES = ("drop", "retrain")
_MAX_LISTED = 10


@dataclass
class ForgetResult:
    """forgotten: ids newly forgotten; already: ids that were forgotten before; shards: the trained shards
    dropped or retrained; undated: those of them dropped in mode "retrain" since their training data is unknown
    (imported without it); noop: nothing to do; resumed: an interrupted forget was completed."""

    forgotten: list[str]
    already: list[str]
    shards: list[int]
    mode: str
    composed_sha256: str | None
    noop: bool = False
    resumed: bool = False
    undated: list[int] = field(default_factory=list)


def read_ids(path: str | Path) -> list[str]:
    """Ids from a file: a JSON list, or one id per line (blank lines ignored)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TaftError(f"cannot read ids file {path}: {e}") from e
    if text.lstrip().startswith("["):
        try:
            ids = json.loads(text)
        except ValueError as e:
            raise TaftError(f"ids file {path} looks like JSON but does not parse: {e}") from e
        if not isinstance(ids, list) or not all(isinstance(i, (str, int)) for i in ids):
            raise TaftError(f"ids file {path}: a JSON ids file must be a list of strings")
        return [str(i) for i in ids]
    return [line.strip() for line in text.splitlines() if line.strip()]


def cached_entry(record: Mapping[str, Any]) -> CachedFeatures | None:
    """The trunk-feature cache entry a data record (`Manifest.data_of`) names, if it is still there."""
    f = record.get("features") or {}
    path = f.get("path")
    if path and (Path(path) / "meta.json").is_file():
        cf = CachedFeatures(path)
        if cf.meta.get("entry") == f.get("entry"):
            return cf
    return None


def data_records(m: Manifest, shards: Iterable[int] | None = None) -> list[dict[str, Any]]:
    """The distinct records of the training data of `shards` (default: every retrainable shard), in shard order."""
    out: list[dict[str, Any]] = []
    for i in range(len(m.shards)) if shards is None else shards:
        record = m.data_of(i)
        if m.retrainable(i) and record not in out:
            out.append(record)
    return out


def union(parts: Sequence[FeatureData]) -> FeatureData:
    return parts[0] if len(parts) == 1 else FeatureUnion(tuple(parts))


def record_data(m: Manifest, record: Mapping[str, Any], backbone: Backbone | None = None) -> FeatureData | None:
    """The training data a data record names, if it is at hand: its feature-cache entry, or for a store that
    streams, its source reopened as a dataset (with `backbone`'s preprocessing, default the store's backbone)."""
    if (record.get("features") or {}).get("streamed"):
        return open_source(record, m, backbone)
    return cached_entry(record)


def training_features(m: Manifest, features: FeatureData | None, shards: Iterable[int] | None = None,
                      backbone: Backbone | None = None,
                      at_hand: Callable[[Mapping[str, Any]], FeatureData | None] | None = None) -> FeatureData:
    """`features` if given, else the training data of `shards` (default: all the store's): one part per data
    record, `at_hand(record)` (default `record_data`: what is there without rebuilding), as a `FeatureUnion` when the
    shards came from several records. `TaftError` naming a record whose data is not at hand."""
    if features is not None:
        return features
    at_hand = at_hand or (lambda record: record_data(m, record, backbone))
    parts = []
    for record in data_records(m, shards):
        data = at_hand(record)
        if data is None:
            path = (record.get("features") or {}).get("path")
            what = (f"feature-cache entry {path} is gone" if path else "its data source cannot be opened")
            how = ("keep the data at the recorded source so they can be recomputed" if record.get("source")
                   else "record their data source when you train a store")
            raise TaftError(f"the store's training features are not available ({what}); pass the training "
                            f"features, or {how}")
        parts.append(data)
    if not parts:
        raise TaftError("the store holds no shard whose training data is recorded")
    return union(parts)


def backbone_for(m: Manifest, backbone: Backbone | None, remote: bool) -> Backbone | BackboneSpec:
    """What retraining tasks carry: the given backbone (checked against the store) or the store's by name."""
    info = m.model
    if backbone is None:
        return BackboneSpec.of(info.backbone, info.preprocess, info.dtype, info.backbone_fingerprint)
    if backbone.fingerprint != info.backbone_fingerprint:
        raise FingerprintMismatchError(
            f"the store was trained on backbone {info.backbone!r} (fingerprint {info.backbone_fingerprint[:12]}…), "
            f"not {backbone.name!r} ({backbone.fingerprint[:12]}…)")
    dtype = str(backbone.dtype).removeprefix("torch.")
    if dtype != info.dtype:
        raise TaftError(f"the store was trained in {info.dtype}, the given backbone is {dtype}")
    return backbone_ref(backbone, by_name=remote)


def forget(root: str | Path, ids: Iterable[str], mode: str = "drop", *, features: FeatureData | None = None,
           backbone: Backbone | None = None, execution: Execution = Execution(),
           accept_changed_data: bool = False) -> ForgetResult:
    """Forget `ids` from the store at `root` (see the module doc). `features`/`backbone`: the training features and
    backbone for retraining (default: the store's cache entry and its backbone loaded by name). `execution`: how
    and where retrained shards train (mode "retrain" only). Features other than the store's cache entry (e.g.
    rebuilt from its data source) are checked against the content the retrained shards were trained on
    (`taft.store.content`); `accept_changed_data` retrains on changed data anyway, noting it in the audit log."""
    if mode not in MODES:
        raise TaftError(f"forget mode must be one of {', '.join(MODES)}, got {mode!r}")
    wanted = sorted({str(i) for i in ids})
    if not wanted:
        raise TaftError("no ids to forget were given")
    layout = StoreLayout(root)
    if mode == "drop":  # trains nothing: no executor (nor Ray connection) is needed
        execution = execution.local()
    with execution.connected() as execution, layout.locked():
        m = load_manifest(layout)
        known = set(m.plan.ids)
        unknown = [i for i in wanted if i not in known]
        if unknown:
            are = "is" if len(unknown) == 1 else "are"
            raise TaftError(f"{counted(len(unknown), 'id')} {are} not in the store, e.g. {unknown[:_MAX_LISTED]}; "
                            "nothing was changed")
        request = {"ids": wanted, "mode": mode}
        status, pending = begin(layout, m, "forget", request)
        if status == "done":
            m = load_manifest(layout)
            a = pending.audit
            return ForgetResult(a["ids"], a["already"], a["shards"], mode, composed_sha256(m), resumed=True,
                                undated=a.get("undated", []))
        if pending is None:
            done = set(m.forgotten)
            new = [i for i in wanted if i not in done]
            already = [i for i in wanted if i in done]
            if not new:
                audit_noop(layout, "forget", ids=wanted, mode=mode, already=already)
                return ForgetResult([], already, [], mode, composed_sha256(m), noop=True)
            shards = m.holding(new)
        else:
            new, shards = pending.audit["ids"], pending.audit["shards"]
        m2, todo = without_ids(m, set(new), mode)
        undated = [i for i in shards if mode == "retrain" and m2.shards[i].status == "dropped"]
        retraining = Retraining.of(m, features, backbone, list(todo), set(new), accept_changed_data) if todo else None
        accepted = {"accepted_changed_data": retraining.accepted} if retraining and retraining.accepted else {}
        if pending is None:
            pending = Pending.new("forget", request, m.generation,
                                  {"ids": new, "already": already, "mode": mode, "shards": shards, **accepted,
                                   **({"undated": undated} if undated else {})})
            write_pending(layout, pending)
            crashpoint("after-pending")
        elif accepted:  # a resumed retrain on changed data: logged with it
            pending.audit.update(accepted)
            write_pending(layout, pending)
        if retraining is not None:
            files = train_into(layout, pending, todo, train=retraining.train,
                               backbone=backbone_for(m, backbone, execution.remote), info=m.model, spec=m.spec,
                               base=m.config, threads=m.threads, plan_kind=m.plan.kind, execution=execution,
                               dp=m.dp_config, prior={i: m.shards[i].privacy for i in todo},
                               seeds={i: m.shards[i].seed for i in todo})
            for index, entry in files.items():
                s = m2.shards[index]
                s.file, s.sha256 = entry.file, entry.sha256
                s.data_sha256 = retraining.data_sha256(m.shards[index], s.ids)
                if m.dp is not None:
                    s.privacy = entry.privacy
        m2 = commit(layout, m2, pending)
        return ForgetResult(sorted(new), pending.audit["already"], shards, mode, composed_sha256(m2),
                            resumed=status == "resume", undated=undated)


def without_ids(m: Manifest, ids: set[str], mode: str) -> tuple[Manifest, dict[int, list[str]]]:
    """The manifest with `ids` forgotten (their trained shards dropped, emptied, or to retrain; in mode "retrain" a
    shard whose training data is unknown is dropped), and the shards to retrain {index: remaining ids}."""
    m2 = copy.deepcopy(m)
    m2.forgotten = sorted(set(m.forgotten) | ids)
    todo: dict[int, list[str]] = {}
    for s in m2.shards:
        if not ids & set(s.ids):
            continue
        s.ids = [i for i in s.ids if i not in ids]
        if not s.trained:
            continue
        if mode == "drop" or not s.ids or not m.retrainable(s.index):
            s.status = "empty" if not s.ids else "dropped"
            s.file, s.sha256, s.data_sha256 = None, None, None
        else:
            todo[s.index] = s.ids
    forbidden = set(m2.forgotten)
    if any(forbidden & set(rest) for rest in todo.values()):  # never train on a forgotten id
        raise TaftError("internal error: a retraining shard still lists forgotten ids")
    return m2, todo


@dataclass
class Retraining:
    """What retraining trains on: `train` (features), `data` ({shard index: its data source reopened, or None}),
    whether `train` is the store's own cache entries, and the data change the caller accepted (or None)."""

    train: FeatureData
    data: dict[int, Any]
    recorded: bool
    accepted: str | None

    @classmethod
    def of(cls, m: Manifest, features: FeatureData | None, backbone: Backbone | None, shards: list[int],
           forgetting: set[str], accept: bool) -> Retraining:
        """Checked before anything is written: features other than the store's cache entries must hold the content
        the shards were trained on (`check_unchanged`), unless `accept`."""
        unknown = [i for i in shards if not m.retrainable(i)]
        if unknown:
            raise TaftError(f"shards {unknown} were imported without their training data and cannot be retrained")
        train = training_features(m, features, shards, backbone)
        entries = {(m.data_of(i).get("features") or {}).get("entry") for i in shards} - {None}
        parts = train.parts if isinstance(train, FeatureUnion) else (train,)
        recorded = bool(entries) and all(isinstance(p, CachedFeatures) and p.meta.get("entry") in entries
                                         for p in parts)
        hashed = [i for i in shards if m.shards[i].data_sha256]
        data = open_sources(m, hashed, backbone)
        accepted = None if recorded else check_unchanged(m, data, shards, forgetting, accept)
        return cls(train, data, recorded, accepted)

    def data_sha256(self, before: ShardEntry, ids: list[str]) -> str | None:
        """The retrained shard's new content hash: of its `ids` in the data source, when that is what it was
        trained on (rebuilt features, or the cache entry while the source still matches it); else unknown."""
        data = self.data.get(before.index)
        if data is None:
            return None
        if self.recorded and (before.data_sha256 is None or content_change(data, before) is not None):
            return None
        return shard_hashes(data, {0: ids})[0]


def composed_sha256(m: Manifest) -> str | None:
    return m.composed.sha256 if m.composed is not None else None
