"""Import checkpoints trained elsewhere into a store, each as a new shard (`ModelStore.import_checkpoints`).

    store.import_checkpoints(["partner/checkpoint.safetensors"])                        # drop-only
    store.import_checkpoints(["partner/ckpt.safetensors"], features=f, source=src)     # retrainable

A checkpoint joins when it is what the store's shards are: the same backbone weights and preprocessing, method,
k, pooling, base head (the fingerprint), classes, and recipe (every training setting but the seed, with the epochs
the store's recipe gives its number of examples: a `taft train` run qualifies when given the store's settings,
`min_steps` included). Anything that differs is named in a one-line refusal, before anything is written. Its
training ids come from its metadata; they must be new to the store (neither held nor forgotten, unless
`readd_forgotten`) and disjoint across the imported files. The file is copied unchanged (its hashes stay the
partner's) and the shard keeps the checkpoint's own seed.

Without its data an imported shard is drop-only: forgetting an id it holds drops it, in either mode
(`ForgetResult.undated`). With `features` (trunk features holding its ids) and `source`, it is recorded like an
addition and retrained like any shard (with the store's threads: bit-identical to the original run only when that
ran with the same threads on the same device).

DP: a DP store imports only checkpoints trained with DP-SGD; each keeps its ledger, and the store's guarantee stays
the parallel composition (over disjoint data: the largest ε and δ) of the composed shards' ledgers. A store
without DP refuses a private checkpoint: its guarantee would not be tracked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from taft.backbones import load_backbone_like
from taft.backbones.base import Backbone
from taft.checkpoint import CheckpointFile, read_checkpoint
from taft.data.source import DataSource
from taft.errors import FingerprintMismatchError, TaftError
from taft.fileio import sha256_file
from taft.parallel.shards import FeatureData, feature_ids
from taft.privacy.config import expected_batch_size
from taft.store.add import check_new_ids, grown
from taft.store.commit import begin, commit, copy_shard, record_shard
from taft.store.content import shard_hashes
from taft.store.create import data_identity
from taft.store.journal import Pending, audit_noop, write_pending
from taft.store.layout import StoreLayout, crashpoint
from taft.store.manifest import Addition, Manifest, ShardEntry, load_manifest

_LISTED = 10
MODEL_KEYS = ("backbone_fingerprint", "preprocess", "method", "tangent_blocks", "pooling", "class_names")


@dataclass(frozen=True)
class ImportResult:
    """shards: the new shards' indices, in the order of the files; n: their examples; retrainable: whether their
    data was given; resumed: an interrupted import was completed (or had already committed)."""

    shards: list[int]
    n: int
    retrainable: bool
    resumed: bool = False


def model_differences(m: Manifest, f: CheckpointFile) -> list[str]:
    """What makes checkpoint `f` another model than the store's shards (empty: none)."""
    out = [k for k in MODEL_KEYS if m.model.to_dict().get(k) != f.meta.get(k)]
    return out or (["base head (head seed)"] if f.fingerprint != m.model.fingerprint else [])


def recipe_differences(m: Manifest, f: CheckpointFile) -> list[str]:
    """The training settings of `f` other than the store's recipe gives a shard of its size, in words."""
    have, want = dict(f.meta.get("train_config") or {}), dict(m.train_config)
    n = len(f.ids or [])
    dp = m.dp_config
    batch = expected_batch_size(dp, n, m.config.batch_size) if dp is not None and n else None
    want["epochs"] = m.config.epochs_for(n, batch) if n else want.get("epochs")
    return [f"{k} ({have.get(k)!r}, the store's {want.get(k)!r})" for k in sorted(set(have) | set(want))
            if k != "seed" and have.get(k) != want.get(k)]


def check_checkpoint(m: Manifest, f: CheckpointFile) -> None:
    """`TaftError` (`FingerprintMismatchError` for another model) naming what keeps `f` out of the store."""
    if not f.ids:
        raise TaftError(f"{f.path} does not list its training ids; a store must know what each shard holds")
    diff = model_differences(m, f)
    if diff:
        raise FingerprintMismatchError(f"{f.path} is another model than the store's shards: its {', '.join(diff)} "
                                       f"{'differs' if len(diff) == 1 else 'differ'}")
    private = f.meta.get("privacy")
    if m.dp is not None and not private:
        raise TaftError(f"{f.path} was trained without DP-SGD; the DP store's guarantee would not hold for it")
    if m.dp is None and private:
        raise TaftError(f"{f.path} was trained with DP-SGD, but the store has no DP: its guarantee would not be "
                        "tracked; import it into a DP store")
    diff = recipe_differences(m, f)
    if diff:
        raise TaftError(f"{f.path} was trained with another recipe than the store's: its {', '.join(diff[:4])} "
                        f"{'differs' if len(diff) == 1 else 'differ'}")


def check_disjoint(files: Sequence[CheckpointFile]) -> None:
    seen: dict[str, Path] = {}
    for f in files:
        both = [i for i in f.ids if i in seen]
        if both:
            raise TaftError(f"{f.path} and {seen[both[0]]} share training ids, e.g. {both[:_LISTED]}; the store's "
                            "shards must hold disjoint data")
        seen.update((i, f.path) for i in f.ids)


def import_checkpoints(root: str | Path, paths: Sequence[str | Path], *, features: FeatureData | None = None,
                       source: DataSource | None = None, backbone: Backbone | None = None,
                       readd_forgotten: bool = False) -> ImportResult:
    """Import the checkpoints at `paths` into the store at `root`, one new shard each (see the module doc).
    `features`/`source`: their training data (then retrainable); `backbone`: opens `source` (default: the store's
    by name). A rerun with the same arguments after an interruption completes the import."""
    if not paths:
        raise TaftError("give at least one checkpoint to import")
    layout = StoreLayout(root)
    with layout.locked():
        m = load_manifest(layout)
        files = [read_checkpoint(p) for p in paths]
        request = {"checkpoints": [{"path": str(Path(f.path).resolve()), "sha256": sha256_file(f.path),
                                    "content_sha256": f.content_sha256} for f in files],
                   "data": data_identity(features) if features is not None else None,
                   "source": source.resolved().to_dict() if source is not None else None,
                   "readd_forgotten": readd_forgotten}
        status, pending = begin(layout, m, "import", request)
        if status == "done":
            a = pending.audit
            return ImportResult(a["shards"], a["n"], features is not None, resumed=True)
        hashes = [c["sha256"] for c in request["checkpoints"]]
        done = next((a for a in m.additions if [c["sha256"] for c in a.checkpoints] == hashes), None)
        if done is not None:  # a rerun of a finished import (e.g. after `verify(repair=True)` finished it)
            audit_noop(layout, "import", shards=done.shards, already_imported=done.op_id)
            return ImportResult(done.shards, sum(len(f.ids or []) for f in files), done.retrainable, resumed=True)
        for f in files:
            check_checkpoint(m, f)
        check_disjoint(files)
        ids = [i for f in files for i in f.ids]
        readded = check_new_ids(m, ids, readd_forgotten)
        if source is not None and features is None:
            raise TaftError("give the imported checkpoints' trunk features with their data source",
                            arguments=("features",))
        if features is not None:
            have = set(feature_ids(features))
            missing = [i for i in ids if i not in have]
            if missing:
                raise TaftError(f"the given features lack {len(missing)} training ids of the checkpoints, e.g. "
                                f"{missing[:_LISTED]}")
        start = len(m.shards)
        shards = list(range(start, start + len(files)))
        data_hashes = {}
        if source is not None:
            bb = backbone or load_backbone_like(m.model.backbone, m.model.preprocess)
            data_hashes = shard_hashes(source.open(bb), {i: sorted(f.ids) for i, f in zip(shards, files)})
        if pending is None:
            pending = Pending.new("import", request, m.generation,
                                  {"shards": shards, "n": len(ids), "checkpoints": request["checkpoints"],
                                   **({"readded": readded} if readded else {})})
            write_pending(layout, pending)
            crashpoint("after-pending")
        placed = {}
        for index, f in zip(shards, files):
            placed[index] = copy_shard(layout, index, Path(f.path), f.meta.get("privacy"))
            record_shard(layout, pending, index, placed[index])
        data = {"features": request["data"], "source": request["source"]}
        addition = Addition("import", pending.op_id, pending.time, shards, data, request["checkpoints"], readded)
        entries = [ShardEntry(index=i, status="trained", file=placed[i].file, sha256=placed[i].sha256,
                              ids=sorted(f.ids), seed=int(f.meta["train_config"]["seed"]),
                              privacy=f.meta.get("privacy"), data_sha256=data_hashes.get(i))
                   for i, f in zip(shards, files)]
        commit(layout, grown(m, entries, addition), pending)
    return ImportResult(shards, len(ids), features is not None, resumed=status == "resume")


__all__ = ["ImportResult", "check_checkpoint", "import_checkpoints"]
