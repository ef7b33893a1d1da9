"""Compose checkpoints of disjoint data, change a store's composition (weighting, subset of shards), or export a
store's composition to another file.

Composition is pure tensor arithmetic on the checkpoint files (no backbone, no training): Δw = Σ α_i Δw_i
(`taft.store.delta_sum`). In a DP store only uniform weights are allowed, and the composed file carries the
parallel composition of its shards' ledgers.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from taft.checkpoint import read_checkpoint
from taft.errors import TaftError
from taft.fileio import now, sha256_file
from taft.store.commit import begin, commit, shard_files
from taft.store.create import check_dp
from taft.store.delta_sum import WEIGHTINGS, check_same_base, composition_weights, write_composed
from taft.store.journal import Pending, append_audit, write_pending
from taft.store.layout import StoreLayout, crashpoint
from taft.store.manifest import Composition, Manifest, load_manifest


def chosen_shards(m: Manifest, shards: Iterable[int] | None) -> list[int] | None:
    """The checked subset of `shards` (sorted; None for all trained shards)."""
    if shards is None:
        return None
    chosen = sorted({int(i) for i in shards})
    if not chosen:
        raise TaftError("no shards selected to compose")
    k = len(m.shards)
    out_of_range = [i for i in chosen if not 0 <= i < k]
    if out_of_range:
        raise TaftError(f"shards {out_of_range} do not exist; the store has shards 0..{k - 1}")
    unusable = [f"{i} ({m.shards[i].status})" for i in chosen if not m.shards[i].trained]
    if unusable:
        raise TaftError(f"shards {', '.join(unusable)} hold no trained model and cannot be composed")
    return chosen


def export(layout: StoreLayout, m: Manifest, composition: Composition, out: Path) -> Path:
    """Write `composition` of the store's shards to `out` (outside the store) and log the export."""
    used = composition.subset if composition.subset is not None else m.members()
    if not used:
        raise TaftError("the store has no trained shards to compose")
    if out.resolve().is_relative_to(layout.root.resolve()):
        raise TaftError(f"the export file {out} is inside the store; export to a file outside it, or compose "
                        "without an export file to change the store's own composition")
    alphas = m.alphas(used, composition.weighting)
    write_composed(out, shard_files(layout, m, used), alphas, train_config=m.train_config, created=now(),
                   composition={"weighting": composition.weighting, "shards": used, "alphas": alphas,
                                "shard_sha256": [m.shards[i].sha256 for i in used],
                                "store": str(layout.root.resolve()), "generation": m.generation},
                   privacy=m.guarantee(used))
    append_audit(layout, {"time": now(), "op": "export", "op_id": None, "out": str(out.resolve()),
                          "shards": used, "weighting": composition.weighting, "sha256": sha256_file(out)})
    return out


def check_composed(layout: StoreLayout, m: Manifest) -> None:
    """`TaftError` naming a composed shard's file or the composed file that is missing or does not match its hash
    in the manifest."""
    shard_files(layout, m, m.members())
    if m.composed is not None:
        path = layout.path(m.composed.file)
        if not path.is_file() or sha256_file(path) != m.composed.sha256:
            raise TaftError(f"the composed file {path} is missing or does not match its hash in the manifest; the "
                            "store needs repair (verify with repair)")


def compose_store(root: str | Path, *, weighting: str | None = None, shards: Iterable[int] | None = None,
                  out: str | Path | None = None) -> Path:
    """Compose the store's trained shards (or the chosen `shards`) with `weighting` ("uniform" | "size"; default:
    the store's current one).

    Without `out` this becomes the store's composition (committed; later forgets keep the subset, minus dropped
    shards) and composed.safetensors is rewritten; returns its path. When it already is the composition nothing is
    written (its files are checked: `TaftError` if one is missing or corrupt). With `out`, the composition is written to
    that file only (an ordinary checkpoint; logged as an export in the audit log) and the store is unchanged."""
    layout = StoreLayout(root)
    with layout.locked():
        m = load_manifest(layout)
        weighting = weighting or m.composition.weighting
        if weighting not in WEIGHTINGS:
            raise TaftError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        check_dp(m.dp_config, weighting)
        wanted = Composition(weighting, chosen_shards(m, shards))
        if out is not None:
            return export(layout, m, wanted, Path(out))
        request = wanted.to_dict()
        status, pending = begin(layout, m, "compose", request)
        if status == "done":
            return layout.composed
        if pending is None:
            if m.composition == wanted:  # nothing to change; the files must still be there to say so
                check_composed(layout, m)
                return layout.composed
            if not m.members(wanted):
                raise TaftError("the store has no trained shards to compose")
            pending = Pending.new("compose", request, m.generation, {"weighting": weighting, "shards": wanted.subset})
            write_pending(layout, pending)
            crashpoint("after-pending")
        m2 = copy.deepcopy(m)
        m2.composition = wanted
        commit(layout, m2, pending)
        return layout.composed


def compose_checkpoints(paths: Sequence[str | Path], out: str | Path, *, weighting: str = "uniform",
                        alphas: Sequence[float] | None = None) -> Path:
    """Compose taft checkpoints of disjoint data (e.g. the shard files of a store) into `out`.

    `alphas` (summing to 1) override `weighting` ("uniform" or "size", by each file's data count). Refuses files
    of different fingerprints (`FingerprintMismatchError` naming both). The result's train_config is the first
    file's."""
    files = [read_checkpoint(p) for p in paths]
    if not files:
        raise TaftError("nothing to compose: no checkpoints given")
    check_same_base(files)
    if alphas is None:
        alphas = composition_weights([int(f.meta["data"]["count"]) for f in files], weighting)
        how = weighting
    else:
        alphas = [float(a) for a in alphas]
        how = "given"
    out = Path(out)
    write_composed(out, files, alphas, train_config=files[0].meta["train_config"],
                   created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   composition={"weighting": how, "alphas": list(alphas), "sources": [str(p) for p in paths]})
    return out
