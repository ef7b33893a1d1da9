"""The store manifest (`manifest.json`): the single source of truth of a store, replaced atomically.

Keys: format ("taft-store"), format_version, generation (+1 per committed change), last_op (op id of the last
committed change), created, updated; the model: method, backbone, backbone_fingerprint, fingerprint,
tangent_blocks, pooling, class_names, preprocess, dtype; train_config (resolved; its seed is the store seed),
threads (torch threads per shard task: part of the recipe, since it changes float summation order);
plan (`ShardPlan.to_dict()`, as made at creation); data {"features": {"path", "entry"} of the trunk-feature cache
entry or null, "source": `DataSource.to_dict()` of the training data, or null}; shards: one entry per plan shard
{index, status ("trained" | "dropped" | "empty"), file (relative path or null), sha256, ids (sorted, forgotten ones
removed), n, seed}; composition {weighting, subset (shard indices or null = all trained)}; composed
{file, sha256, created, shards, alphas, n} or null; forgotten (sorted ids).

A store trained with differential privacy (DP-SGD per shard) also has: dp (the `DPConfig.to_dict()` every shard
is trained with, also on retraining); on each shard entry, privacy (its ledger, `PrivacyLedger.to_dict()`: the one
run, or the sequential composition of every release of that shard once retrained; null for a shard never
trained); and privacy, the store's guarantee: the parallel composition of the composed shards' ledgers (null when
no shard is composed), recomputed at every commit. A store without DP has none of these keys.

Invariants (`check_manifest`): every plan id is in exactly one of its plan shard's `ids` or in `forgotten`;
trained shards have a file, the others none; the composed model lists the trained shards of the composition;
in a DP store, trained shards have a ledger and `privacy` is the composition of the composed shards' ledgers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from taft.errors import TaftError
from taft.privacy import parallel_composition
from taft.checkpoint import ModelInfo
from taft.store.delta_sum import composition_weights
from taft.fileio import read_json, write_json
from taft.store.layout import StoreLayout
from taft.store.plan import ShardPlan
from taft.spec import ModelSpec
from taft.train import TrainConfig

FORMAT = "taft-store"
FORMAT_VERSION = 1
STATUSES = ("trained", "dropped", "empty")
REQUIRED = ("format", "format_version", "generation", "method", "backbone", "backbone_fingerprint", "fingerprint",
            "tangent_blocks", "pooling", "class_names", "preprocess", "dtype", "train_config", "threads", "plan",
            "data", "shards", "composition", "composed", "forgotten")
Manifest = dict[str, Any]


def load_manifest(layout: StoreLayout) -> Manifest:
    """The checked manifest of the store; `TaftError` if there is none or it is malformed."""
    if not layout.manifest.is_file():
        raise TaftError(f"{layout.root} is not a model store (no manifest.json)")
    m = read_json(layout.manifest, "store manifest")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise TaftError(f"{layout.manifest} is not a taft store manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise TaftError(f"{layout.manifest} has store format version {m.get('format_version')!r}; this taft reads "
                        f"version {FORMAT_VERSION}")
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise TaftError(f"{layout.manifest} lacks {missing}")
    problems = check_manifest(m)
    if problems:
        raise TaftError(f"{layout.manifest} is inconsistent: {problems[0]}"
                        + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
    return m


def save_manifest(layout: StoreLayout, m: Manifest) -> None:
    """Atomically replace the manifest: THE commit point of every store change."""
    problems = check_manifest(m)
    if problems:  # a bug, never user input: refuse to commit an inconsistent state
        raise TaftError(f"refusing to commit an inconsistent manifest: {problems[:3]}")
    write_json(layout.manifest, m)


def plan_of(m: Mapping[str, Any]) -> ShardPlan:
    return ShardPlan.from_dict(m["plan"])


def info_of(m: Mapping[str, Any]) -> ModelInfo:
    return ModelInfo.from_dict(m)


def config_of(m: Mapping[str, Any]) -> TrainConfig:
    """The store's training recipe."""
    return TrainConfig.from_dict(m["train_config"])


def spec_of(m: Mapping[str, Any]) -> ModelSpec:
    """What the store's models are (method, k, pooling, base head seed)."""
    return ModelSpec.from_dict(m["train_config"])


def trained(m: Mapping[str, Any]) -> list[int]:
    return [s["index"] for s in m["shards"] if s["status"] == "trained"]


def members(m: Mapping[str, Any]) -> list[int]:
    """The shards the composition uses: the trained ones of its subset (all trained shards if no subset)."""
    subset = m["composition"].get("subset")
    ok = trained(m)
    return ok if subset is None else [i for i in subset if i in ok]


def alphas_of(m: Mapping[str, Any], shards: list[int]) -> list[float]:
    return composition_weights([m["shards"][i]["n"] for i in shards], m["composition"]["weighting"])


def privacy_of(m: Mapping[str, Any]) -> dict[str, Any] | None:
    """The store's guarantee: the parallel composition of the composed shards' ledgers (their ids checked to be
    disjoint); None for a store without DP or with no composed shard."""
    used = members(m)
    if "dp" not in m or not used:
        return None
    shards = [m["shards"][i] for i in used]
    return parallel_composition([s["privacy"] for s in shards], shard_ids=[s["ids"] for s in shards]).to_dict()


def check_manifest(m: Mapping[str, Any]) -> list[str]:
    """Every violated invariant, as a sentence (empty when consistent)."""
    out: list[str] = []
    try:
        plan = plan_of(m)
        shards = m["shards"]
        forgotten = set(m["forgotten"])
        if len(shards) != plan.num_shards:
            return [f"{len(shards)} shard entries for a plan of {plan.num_shards} shards"]
        for i, (s, planned) in enumerate(zip(shards, plan.shards)):
            if s.get("index") != i:
                out.append(f"shard entry {i} has index {s.get('index')}")
            if s.get("status") not in STATUSES:
                out.append(f"shard {i} has unknown status {s.get('status')!r}")
            ids = set(s["ids"])
            if s["n"] != len(s["ids"]):
                out.append(f"shard {i}: n={s['n']} but {len(s['ids'])} ids")
            if ids | (set(planned) & forgotten) != set(planned) or ids & forgotten:
                out.append(f"shard {i}: its ids are not its planned ids less the forgotten ones")
            if (s["status"] == "trained") != (s.get("file") is not None):
                out.append(f"shard {i}: status {s['status']} but file {s.get('file')!r}")
            if s["status"] == "trained" and not s["ids"]:
                out.append(f"shard {i} is marked trained but has no ids")
        unknown = forgotten - set(plan.ids)
        if unknown:
            out.append(f"forgotten ids not in the plan: {sorted(unknown)[:10]}")
        composed = m["composed"]
        used = members(m)
        if composed is None and used:
            out.append(f"no composed model although shards {used} are composed")
        if composed is not None and composed.get("shards") != used:
            out.append(f"the composed model lists shards {composed.get('shards')}, the composition has {used}")
        if m["composition"].get("weighting") not in ("uniform", "size"):
            out.append(f"unknown weighting {m['composition'].get('weighting')!r}")
        if "dp" in m:
            unaccounted = [s["index"] for s in shards if s["status"] == "trained" and not s.get("privacy")]
            if unaccounted:
                out.append(f"DP store: trained shards {unaccounted} have no privacy ledger")
            elif m.get("privacy") != privacy_of(m):
                out.append("the store's privacy guarantee is not the composition of its composed shards' ledgers")
    except (KeyError, TypeError, ValueError, AttributeError, TaftError) as e:
        out.append(f"malformed manifest ({type(e).__name__}: {e})")
    return out
