"""The commit protocol shared by every store change. A process killed at any point leaves a store that
`verify` accepts or repairs, and a rerun of the operation completes it.

    1. pending.json written (the request and op id)                 [crashpoint after-pending]
    2. new shard files written under new, content-addressed names    [after-shard-file, once per shard]
       (temp name in shards/, fsync, rename to shard-XXX-<sha>.safetensors; recorded in pending.completed)
    3. the new composed checkpoint: temp name, then renamed over composed.safetensors   [after-composed]
    4. manifest.json atomically replaced: THE COMMIT POINT            [after-manifest]
    5. forgotten.json rewritten from the manifest                     [after-forgotten]
    6. audit line appended (once per op id)                           [after-audit]
    7. unreferenced shard files, temp files and a stale composed file removed   [after-gc]
    8. pending.json removed

Before 4 the old manifest is in force: its shard files are untouched (only garbage-collected after a commit),
and a composed file that no longer matches its hash is recomputed from them by `verify --repair`. After 4 the
new state is in force; 5-8 are idempotent and done by a rerun or `verify --repair` (`finish`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from taft.checkpoint import CheckpointFile, ModelInfo, checkpoint_content_sha256, read_checkpoint, write_checkpoint
from taft.errors import TaftError
from taft.fileio import finish_file, fsync_dir, sha256_file, temp_file, write_json
from taft.parallel.shards import ShardResult
from taft.store.delta_sum import write_composed
from taft.store.journal import Pending, append_audit, clear_pending, read_pending, write_pending
from taft.store.layout import StoreLayout, crashpoint, shard_file_name
from taft.store.manifest import Composed, Manifest, ShardFile, save_manifest


def write_shard(layout: StoreLayout, info: ModelInfo, result: ShardResult, *, created: str, store_seed: int,
                plan_kind: str, privacy: Mapping[str, Any] | None = None) -> ShardFile:
    """Write a trained shard as an ordinary checkpoint under its content-addressed name (with `privacy`, the
    shard's ledger, also in the checkpoint's metadata, when trained with DP)."""

    def write(tmp: Path) -> None:
        write_checkpoint(tmp, info, result.tensors, result.head_weight0, result.head_bias0,
                         train_config=result.config, ids=result.ids, created=created, metrics=result.metrics,
                         extra={"shard": {"index": result.index, "store_seed": store_seed, "plan": plan_kind},
                                **({"privacy": dict(privacy)} if privacy else {})}, atomic=False)

    return place_shard(layout, result.index, write, privacy)


def copy_shard(layout: StoreLayout, index: int, source: Path, privacy: Mapping[str, Any] | None = None) -> ShardFile:
    """Copy a checkpoint (imported: its bytes unchanged) into the store as shard `index`'s file."""
    return place_shard(layout, index, lambda tmp: shutil.copyfile(source, tmp), privacy)


def place_shard(layout: StoreLayout, index: int, write: Callable[[Path], None],
                privacy: Mapping[str, Any] | None) -> ShardFile:
    """`write(tmp)` a shard file under a temp name in shards/, fsync it, rename it to its content-addressed name."""
    layout.shards_dir.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(layout.shards_dir, prefix=f".shard-{index:03d}-")
    try:
        write(tmp)
        finish_file(tmp)
        sha = sha256_file(tmp)
        final = layout.shards_dir / shard_file_name(index, sha)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(layout.shards_dir)
    return ShardFile(layout.relative(final), sha, dict(privacy) if privacy else None)


def record_shard(layout: StoreLayout, pending: Pending, index: int, entry: ShardFile) -> None:
    """Note a finished shard file in the journal, so that a rerun reuses it."""
    pending.completed[index] = entry
    write_pending(layout, pending)
    crashpoint("after-shard-file")


def reusable(layout: StoreLayout, pending: Pending, index: int, ids: list[str]) -> ShardFile | None:
    """The journal's finished file for shard `index` if it is intact and trained on exactly `ids`."""
    entry = pending.completed.get(index)
    if entry is None:
        return None
    path = layout.path(entry.file)
    try:
        if not path.is_file() or sha256_file(path) != entry.sha256 or read_checkpoint(path).ids != ids:
            return None
    except TaftError:
        return None
    return entry


def shard_files(layout: StoreLayout, m: Manifest, shards: Iterable[int]) -> list[CheckpointFile]:
    """The checkpoints of `shards`, each checked against the manifest's hash."""
    files = []
    for i in shards:
        s = m.shards[i]
        path = layout.path(s.file)
        if not path.is_file():
            raise TaftError(f"shard {i}'s file {path} is missing; the store needs repair (verify with repair)")
        if sha256_file(path) != s.sha256:
            raise TaftError(f"shard {i}'s file {path} does not match its hash in the manifest (corrupt)")
        files.append(read_checkpoint(path))
    return files


def compose_into(layout: StoreLayout, m: Manifest, created: str) -> Composed | None:
    """Write composed.safetensors for the manifest's composition (temp + rename); the manifest's `composed`
    entry for it, or None when no shard is composed (the file is then left for `collect_garbage`)."""
    used = m.members()
    if not used:
        return None
    alphas = m.alphas(used)
    files = shard_files(layout, m, used)
    composition = {"weighting": m.composition.weighting, "shards": used, "alphas": alphas,
                   "shard_sha256": [m.shards[i].sha256 for i in used]}
    write_composed(layout.composed, files, alphas, train_config=m.train_config, created=created,
                   composition=composition, privacy=m.guarantee())
    fsync_dir(layout.root)
    return Composed(file=layout.relative(layout.composed), sha256=sha256_file(layout.composed), created=created,
                    shards=used, alphas=alphas, n=sum(m.shards[i].n for i in used),
                    content_sha256=checkpoint_content_sha256(layout.composed))


def commit(layout: StoreLayout, m: Manifest, pending: Pending) -> Manifest:
    """Steps 3-8 of the protocol for the new state `m` (its shard files already written); returns it."""
    m = replace(m, generation=pending.base_generation + 1, last_op=pending.op_id, updated=pending.time)
    m = replace(m, composed=compose_into(layout, m, pending.time))
    if m.dp is not None:
        m = replace(m, privacy=m.guarantee())
    crashpoint("after-composed")
    save_manifest(layout, m)
    crashpoint("after-manifest")
    finish(layout, m, pending)
    return m


def finish(layout: StoreLayout, m: Manifest, pending: Pending | None) -> None:
    """Steps 5-8 (idempotent): after a commit, or to complete an interrupted one."""
    write_forgotten(layout, m)
    crashpoint("after-forgotten")
    if pending is not None:
        append_audit(layout, {**pending.audit, "time": pending.time, "op": pending.op, "op_id": pending.op_id,
                              "generation": m.generation,
                              "composed_sha256": m.composed.sha256 if m.composed else None,
                              "composed_content_sha256": m.composed.content_sha256 if m.composed else None})
        crashpoint("after-audit")
    collect_garbage(layout, m)
    crashpoint("after-gc")
    if pending is not None:
        clear_pending(layout)


def write_forgotten(layout: StoreLayout, m: Manifest) -> None:
    """forgotten.json := the manifest's forgotten ids (rewritten only when different)."""
    want = sorted(m.forgotten)
    try:
        if json.loads(layout.forgotten.read_text(encoding="utf-8")) == want:
            return
    except (OSError, ValueError):
        pass
    write_json(layout.forgotten, want)


def unreferenced(layout: StoreLayout, m: Manifest, keep: Iterable[str] = ()) -> list[Path]:
    """Shard files the manifest does not name (nor `keep`), temp files, and a composed file the manifest
    does not have."""
    named = {s.file for s in m.shards if s.file} | set(keep)
    out = [p for p in layout.shard_files() if layout.relative(p) not in named]
    out += layout.temp_files()
    if m.composed is None and layout.composed.exists():
        out.append(layout.composed)
    return out


def collect_garbage(layout: StoreLayout, m: Manifest, keep: Iterable[str] = ()) -> list[Path]:
    removed = unreferenced(layout, m, keep)
    for p in removed:
        p.unlink(missing_ok=True)
    if removed:
        fsync_dir(layout.shards_dir if layout.shards_dir.is_dir() else layout.root)
        fsync_dir(layout.root)
    return removed


def begin(layout: StoreLayout, m: Manifest, op: str, request: Mapping[str, Any]) -> tuple[str, Pending | None]:
    """How an operation starts, given the journal: ("fresh", None) when nothing is pending; ("resume", pending)
    when the same request was interrupted before its commit; ("done", pending) when it had committed (its
    cleanup is finished here). A committed operation with another request is finished and ("fresh", None)
    returned; an uncommitted one with another request raises `TaftError` (it must be completed first)."""
    pending = read_pending(layout)
    if pending is None:
        return "fresh", None
    same = pending.op == op and pending.request == dict(request)
    if m.last_op == pending.op_id:
        finish(layout, m, pending)
        return ("done", pending) if same else ("fresh", None)
    if same:
        return "resume", pending
    raise TaftError(f"{layout.root} has an interrupted {pending.describe()}; complete it first: resume it, or "
                    "rerun that operation")
