"""The store manifest (`manifest.json`): the single source of truth of a store, replaced atomically; read and
written as the typed `Manifest` record (`Manifest.from_dict(d).to_dict() == d` for every valid manifest, so a
store's file is rewritten byte for byte).

Keys: format ("taft-store"), format_version, generation (+1 per committed change), last_op (op id of the last committed
change), created, updated; the model (`ModelInfo`): method, backbone, backbone_fingerprint, fingerprint, tangent_blocks,
pooling, class_names, preprocess, dtype; train_config (the run record, `run_record(spec, config)`; its seed is the store
seed), threads (torch threads per shard task: part of the recipe, since it changes float summation order); plan
(`ShardPlan.to_dict()`: as made at creation, grown by the shards of each addition); data {"features": {"path", "entry"}
of the trunk-feature cache entry or null, "source": `DataSource.to_dict()` of the training data, or null}; shards: one
`ShardEntry` per plan shard {index, status ("trained" | "dropped" | "empty"), file (relative path or null), sha256, ids
(sorted, forgotten ones removed), n, seed[, data_sha256]}, data_sha256 (in stores with a data source; absent when
unknown) being the content hash of the shard's examples in that source (`dataset.select(ids).content_hash()`):
retraining on data rebuilt from the source checks it (`taft.store.content`); composition {weighting, subset (shard
indices or null = all trained)}; composed {file, sha256, content_sha256, created, shards, alphas, n} or null; forgotten
(sorted ids); additions (only once shards joined after the creation: one `Addition` per `add` or `import`, {op, op_id,
time, shards (their indices, after the creation's), data (their training data's record, shaped like `data`; both keys
null for checkpoints imported without their data: such shards can be dropped, not retrained), checkpoints (import: each
file's original path and hashes), readded (forgotten ids deliberately trained again)}). A shard's training data is
`Manifest.data_of(index)`.

A store trained with differential privacy (DP-SGD per shard) also has: dp (the `DPConfig.to_dict()` every shard
is trained with, also on retraining); on each shard entry, privacy (its ledger, `PrivacyLedger.to_dict()`: the one
run, or the sequential composition of every release of that shard once retrained; null for a shard never
trained); and privacy, the store's guarantee: the parallel composition of the composed shards' ledgers (null when
no shard is composed), recomputed at every commit. A store without DP has none of these keys.

Invariants (`Manifest.problems`): every plan id is in exactly one of its plan shard's `ids` or in `forgotten`;
trained shards have a file, the others none; the composed model lists the trained shards of the composition;
in a DP store, trained shards have a ledger and `privacy` is the composition of the composed shards' ledgers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from taft.checkpoint import ModelInfo
from taft.errors import TaftError
from taft.fileio import read_json, write_json
from taft.privacy import DPConfig, parallel_composition
from taft.spec import ModelSpec
from taft.store.delta_sum import WEIGHTINGS, composition_weights
from taft.store.layout import StoreLayout
from taft.store.plan import ShardPlan
from taft.train import TrainConfig

FORMAT = "taft-store"
FORMAT_VERSION = 1
STATUSES = ("trained", "dropped", "empty")
REQUIRED = ("format", "format_version", "generation", "method", "backbone", "backbone_fingerprint", "fingerprint",
            "tangent_blocks", "pooling", "class_names", "preprocess", "dtype", "train_config", "threads", "plan",
            "data", "shards", "composition", "composed", "forgotten")
Json = dict[str, Any]


def malformed(what: str, e: Exception) -> TaftError:
    return TaftError(f"malformed {what} ({type(e).__name__}: {e})")


@dataclass(frozen=True)
class ShardFile:
    """A written shard checkpoint: its path in the store, SHA-256 and, under DP, its ledger."""

    file: str
    sha256: str
    privacy: Json | None = None

    def to_dict(self) -> Json:
        return {"file": self.file, "sha256": self.sha256, **({"privacy": self.privacy} if self.privacy else {})}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardFile:
        try:
            return cls(str(d["file"]), str(d["sha256"]), dict(d["privacy"]) if d.get("privacy") else None)
        except (KeyError, TypeError, ValueError) as e:
            raise malformed("shard file entry", e) from e


@dataclass
class ShardEntry:
    """One plan shard: its status, file (trained shards only), ids and data-order seed; under DP its ledger; the
    content hash of its examples in the store's data source (`data_sha256`; absent in stores without one)."""

    index: int
    status: str
    file: str | None
    sha256: str | None
    ids: list[str]
    seed: int
    privacy: Json | None = None
    data_sha256: str | None = None

    @property
    def n(self) -> int:
        return len(self.ids)

    @property
    def trained(self) -> bool:
        return self.status == "trained"

    def to_dict(self, dp: bool) -> Json:
        """The manifest's entry; `privacy` only in a DP store."""
        d = {"index": self.index, "status": self.status, "file": self.file, "sha256": self.sha256,
             "ids": list(self.ids), "n": self.n, "seed": self.seed}
        if self.data_sha256 is not None:
            d["data_sha256"] = self.data_sha256
        return {**d, "privacy": self.privacy} if dp else d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardEntry:
        try:
            entry = cls(int(d["index"]), str(d["status"]), d["file"], d["sha256"], [str(i) for i in d["ids"]],
                        int(d["seed"]), d.get("privacy"), d.get("data_sha256"))
        except (KeyError, TypeError, ValueError) as e:
            raise malformed("shard entry", e) from e
        if d["n"] != entry.n:
            raise TaftError(f"malformed shard entry: shard {entry.index} has n={d['n']} but {entry.n} ids")
        return entry


@dataclass(frozen=True)
class Composition:
    """How the store composes: `weighting` ("uniform" | "size") over `subset` (shard indices; None: all trained)."""

    weighting: str = "uniform"
    subset: list[int] | None = None

    def to_dict(self) -> Json:
        return {"weighting": self.weighting, "subset": None if self.subset is None else list(self.subset)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Composition:
        try:
            subset = d["subset"]
            return cls(str(d["weighting"]), None if subset is None else [int(i) for i in subset])
        except (KeyError, TypeError, ValueError) as e:
            raise malformed("composition", e) from e


@dataclass(frozen=True)
class Composed:
    """The composed checkpoint: file, hashes (of the file; of its tensors, absent in early stores), when it was
    made, from which shards with which weights, over how many examples."""

    file: str
    sha256: str
    created: str
    shards: list[int]
    alphas: list[float]
    n: int
    content_sha256: str | None = None

    def to_dict(self) -> Json:
        d = {"file": self.file, "sha256": self.sha256, "created": self.created, "shards": list(self.shards),
             "alphas": list(self.alphas), "n": self.n}
        return {**d, "content_sha256": self.content_sha256} if self.content_sha256 is not None else d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Composed:
        try:
            return cls(str(d["file"]), str(d["sha256"]), str(d["created"]), [int(i) for i in d["shards"]],
                       [float(a) for a in d["alphas"]], int(d["n"]), d.get("content_sha256"))
        except (KeyError, TypeError, ValueError) as e:
            raise malformed("composed entry", e) from e


@dataclass(frozen=True)
class Addition:
    """Shards that joined the store after its creation (see the module doc)."""

    op: str
    op_id: str
    time: str
    shards: list[int]
    data: Json
    checkpoints: list[Json] = field(default_factory=list)
    readded: list[str] = field(default_factory=list)

    @property
    def retrainable(self) -> bool:
        """Whether the shards' training data is known (an import without data is drop-only)."""
        return bool(self.data.get("features") or self.data.get("source"))

    def to_dict(self) -> Json:
        d = {"op": self.op, "op_id": self.op_id, "time": self.time, "shards": list(self.shards), "data": self.data}
        if self.checkpoints:
            d["checkpoints"] = list(self.checkpoints)
        return {**d, "readded": list(self.readded)} if self.readded else d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Addition:
        try:
            return cls(str(d["op"]), str(d["op_id"]), str(d["time"]), [int(i) for i in d["shards"]], dict(d["data"]),
                       [dict(c) for c in d.get("checkpoints", [])], [str(i) for i in d.get("readded", [])])
        except (KeyError, TypeError, ValueError) as e:
            raise malformed("addition", e) from e


@dataclass
class Manifest:
    """A store's manifest (see the module doc). `dp` and `privacy` are None in a store without DP."""

    generation: int
    last_op: str | None
    created: str
    updated: str
    model: ModelInfo
    train_config: Json
    threads: int
    plan: ShardPlan
    data: Json
    shards: list[ShardEntry]
    composition: Composition = field(default_factory=Composition)
    composed: Composed | None = None
    forgotten: list[str] = field(default_factory=list)
    dp: Json | None = None
    privacy: Json | None = None
    additions: list[Addition] = field(default_factory=list)

    # ------------------------------------------------------------------------------------------ views
    @property
    def spec(self) -> ModelSpec:
        """What the store's models are (method, k, pooling, base head seed)."""
        return ModelSpec.from_dict(self.train_config)

    @property
    def config(self) -> TrainConfig:
        """The store's training recipe."""
        return TrainConfig.from_dict(self.train_config)

    @property
    def dp_config(self) -> DPConfig | None:
        return DPConfig(**self.dp) if self.dp is not None else None

    def addition_of(self, index: int) -> Addition | None:
        """The addition shard `index` joined the store with (None: made at the creation)."""
        return next((a for a in self.additions if index in a.shards), None)

    def data_of(self, index: int) -> Json:
        """The record of shard `index`'s training data ({"features", "source"}, shaped like `data`)."""
        added = self.addition_of(index)
        return added.data if added is not None else self.data

    def retrainable(self, index: int) -> bool:
        """Whether shard `index` can be retrained: its training data is recorded (not an import without data)."""
        added = self.addition_of(index)
        return added is None or added.retrainable

    def holding(self, ids: Iterable[str]) -> list[int]:
        """The trained shards that hold any of `ids`."""
        hit = set(ids)
        return [s.index for s in self.shards if s.trained and hit & set(s.ids)]

    def trained(self) -> list[int]:
        return [s.index for s in self.shards if s.trained]

    def members(self, composition: Composition | None = None) -> list[int]:
        """The shards the composition (or `composition`) uses: the trained ones of its subset (all trained shards
        if no subset)."""
        subset = (composition or self.composition).subset
        ok = self.trained()
        return ok if subset is None else [i for i in subset if i in ok]

    def alphas(self, shards: Sequence[int], weighting: str | None = None) -> list[float]:
        return composition_weights([self.shards[i].n for i in shards], weighting or self.composition.weighting)

    def guarantee(self, shards: Sequence[int] | None = None) -> Json | None:
        """The privacy guarantee of composing `shards` (default: the composition's members): the parallel
        composition of their ledgers (their ids checked to be disjoint); None without DP or shards."""
        used = self.members() if shards is None else list(shards)
        if self.dp is None or not used:
            return None
        entries = [self.shards[i] for i in used]
        return parallel_composition([s.privacy for s in entries], shard_ids=[s.ids for s in entries]).to_dict()

    # ------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> Json:
        dp = self.dp is not None
        d = {"format": FORMAT, "format_version": FORMAT_VERSION, "generation": self.generation,
             "last_op": self.last_op, "created": self.created, "updated": self.updated, **self.model.to_dict(),
             "train_config": self.train_config, "threads": self.threads, "plan": self.plan.to_dict(),
             "data": self.data, "shards": [s.to_dict(dp) for s in self.shards],
             "composition": self.composition.to_dict(),
             "composed": self.composed.to_dict() if self.composed is not None else None,
             "forgotten": list(self.forgotten)}
        if self.additions:
            d["additions"] = [a.to_dict() for a in self.additions]
        return {**d, "dp": self.dp, "privacy": self.privacy} if dp else d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        """The record of a manifest's JSON; `TaftError` if a key is missing or malformed."""
        missing = [k for k in REQUIRED if k not in d]
        if missing:
            raise TaftError(f"the manifest lacks {missing}")
        try:
            return cls(generation=int(d["generation"]), last_op=d.get("last_op"), created=str(d["created"]),
                       updated=str(d["updated"]), model=ModelInfo.from_dict(d), train_config=dict(d["train_config"]),
                       threads=int(d["threads"]), plan=ShardPlan.from_dict(d["plan"]), data=dict(d["data"]),
                       shards=[ShardEntry.from_dict(s) for s in d["shards"]],
                       composition=Composition.from_dict(d["composition"]),
                       composed=Composed.from_dict(d["composed"]) if d["composed"] is not None else None,
                       forgotten=[str(i) for i in d["forgotten"]],
                       dp=dict(d["dp"]) if "dp" in d else None, privacy=d.get("privacy"),
                       additions=[Addition.from_dict(a) for a in d.get("additions", [])])
        except (KeyError, TypeError, ValueError) as e:
            raise malformed("manifest", e) from e

    def with_commit(self, generation: int, op_id: str, time: str) -> Manifest:
        return replace(self, generation=generation, last_op=op_id, updated=time)

    # ------------------------------------------------------------------------------------------ invariants
    def problems(self) -> list[str]:
        """Every violated invariant, as a sentence (empty when consistent)."""
        out: list[str] = []
        forgotten = set(self.forgotten)
        if len(self.shards) != self.plan.num_shards:
            return [f"{len(self.shards)} shard entries for a plan of {self.plan.num_shards} shards"]
        for i, (s, planned) in enumerate(zip(self.shards, self.plan.shards)):
            if s.index != i:
                out.append(f"shard entry {i} has index {s.index}")
            if s.status not in STATUSES:
                out.append(f"shard {i} has unknown status {s.status!r}")
            ids = set(s.ids)
            if ids | (set(planned) & forgotten) != set(planned) or ids & forgotten:
                out.append(f"shard {i}: its ids are not its planned ids less the forgotten ones")
            if s.trained != (s.file is not None):
                out.append(f"shard {i}: status {s.status} but file {s.file!r}")
            if s.trained and not s.ids:
                out.append(f"shard {i} is marked trained but has no ids")
        added = [i for a in self.additions for i in a.shards]
        if len(set(added)) != len(added) or not all(0 < i < len(self.shards) for i in added):
            out.append(f"the additions name shards {added}, not distinct shards after the first")
        unknown = forgotten - set(self.plan.ids)
        if unknown:
            out.append(f"forgotten ids not in the plan: {sorted(unknown)[:10]}")
        used = self.members()
        if self.composed is None and used:
            out.append(f"no composed model although shards {used} are composed")
        if self.composed is not None and self.composed.shards != used:
            out.append(f"the composed model lists shards {self.composed.shards}, the composition has {used}")
        if self.composition.weighting not in WEIGHTINGS:
            out.append(f"unknown weighting {self.composition.weighting!r}")
        if self.dp is not None:
            unaccounted = [s.index for s in self.shards if s.trained and not s.privacy]
            if unaccounted:
                out.append(f"DP store: trained shards {unaccounted} have no privacy ledger")
            else:
                try:
                    if self.privacy != self.guarantee():
                        out.append("the store's privacy guarantee is not the composition of its composed shards' "
                                   "ledgers")
                except (KeyError, TypeError, ValueError, TaftError) as e:
                    out.append(f"malformed privacy ledgers ({type(e).__name__}: {e})")
        return out


def load_manifest(layout: StoreLayout) -> Manifest:
    """The checked manifest of the store; `TaftError` if there is none or it is malformed."""
    if not layout.manifest.is_file():
        raise TaftError(f"{layout.root} is not a model store (no manifest.json)")
    d = read_json(layout.manifest, "store manifest")
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise TaftError(f"{layout.manifest} is not a taft store manifest")
    if d.get("format_version") != FORMAT_VERSION:
        raise TaftError(f"{layout.manifest} has store format version {d.get('format_version')!r}; this taft reads "
                        f"version {FORMAT_VERSION}")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise TaftError(f"{layout.manifest} lacks {missing}")
    try:
        m = Manifest.from_dict(d)
    except TaftError as e:
        raise TaftError(f"{layout.manifest} is inconsistent: {e}") from e
    problems = m.problems()
    if problems:
        raise TaftError(f"{layout.manifest} is inconsistent: {problems[0]}"
                        + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
    return m


def save_manifest(layout: StoreLayout, m: Manifest) -> None:
    """Atomically replace the manifest: THE commit point of every store change."""
    problems = m.problems()
    if problems:  # a bug, never user input: refuse to commit an inconsistent state
        raise TaftError(f"refusing to commit an inconsistent manifest: {problems[:3]}")
    write_json(layout.manifest, m.to_dict())


__all__ = ["FORMAT", "FORMAT_VERSION", "STATUSES", "Addition", "Composed", "Composition", "Manifest", "ShardEntry",
           "ShardFile", "load_manifest", "save_manifest"]
