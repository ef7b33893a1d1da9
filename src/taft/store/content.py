"""What a store's shards were trained on, in terms of its data source: each shard entry's `data_sha256` is the
content hash of its examples there (`dataset.select(ids).content_hash()`: ids, labels and the images' bytes or the
texts). Retraining on features rebuilt from the source (their cache entry gone) first checks that the examples
the retrained shards hold still have that content: a replaced, relabelled or removed example is refused, unless
the caller accepts the changed data (then logged in the audit entry). Examples added to the source are never
trained on, so they do not matter; ids forgotten earlier are not part of the hashes any more.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from taft.backbones import load_backbone_like
from taft.backbones.base import Backbone
from taft.data.source import DataSource
from taft.errors import TaftError
from taft.wording import counted
from taft.store.manifest import Manifest, ShardEntry

_LISTED = 3


def open_source(record: Mapping[str, Any], m: Manifest, backbone: Backbone | None = None) -> Any | None:
    """The training data a data record (`Manifest.data_of`) names, reopened from its source (with `backbone`'s
    preprocessing, default the store's backbone by name); None when it has no source or it cannot be opened."""
    source = record.get("source")
    if not source:
        return None
    try:
        return DataSource.from_dict(source).open(backbone or load_backbone_like(m.model.backbone, m.model.preprocess))
    except TaftError:
        return None


def open_sources(m: Manifest, shards: Iterable[int], backbone: Backbone | None = None) -> dict[int, Any]:
    """{shard index: its training data reopened from its source, or None}; each source opened once."""
    opened: list[tuple[Mapping[str, Any], Any]] = []
    out = {}
    for i in shards:
        record = m.data_of(i)
        hit = next((d for r, d in opened if r == record), False)
        if hit is False:
            hit = open_source(record, m, backbone)
            opened.append((record, hit))
        out[i] = hit
    return out


def shard_hashes(dataset: Any, shards: Mapping[int, Iterable[str]]) -> dict[int, str]:
    """{index: content hash of the shard's examples in `dataset`}, for the non-empty shards."""
    return {i: dataset.select(list(ids)).content_hash() for i, ids in shards.items() if ids}


def content_change(dataset: Any, shard: ShardEntry, forgetting: Iterable[str] = ()) -> str | None:
    """How shard `shard`'s examples (its ids before the ids `forgetting` go) differ in `dataset` from what it was
    trained on, in words; None when they do not, or nothing was recorded."""
    if shard.data_sha256 is None:
        return None
    have = set(dataset.ids)
    gone = [i for i in shard.ids if i not in have]
    if gone:
        which = "being forgotten now" if set(gone) <= set(forgetting) else f"of shard {shard.index}"
        are = "is" if len(gone) == 1 else "are"
        return (f"{counted(len(gone), 'example')} {which} {are} no longer in the data (e.g. {gone[:_LISTED]}), so "
                f"shard {shard.index}'s content cannot be checked")
    if dataset.select(shard.ids).content_hash() != shard.data_sha256:
        return (f"an example of shard {shard.index}'s {shard.n} was replaced or relabelled since it was trained "
                "(content hash differs)")
    return None


def check_unchanged(m: Manifest, data: Mapping[int, Any], shards: Iterable[int], forgetting: Iterable[str],
                    accept: bool) -> str | None:
    """`TaftError` naming the first change of `shards`' data in `data` ({shard index: its reopened source}; see
    the module doc), unless `accept`; the change accepted (for the audit log), or None."""
    for i in shards:
        dataset = data.get(i)
        change = None if dataset is None else content_change(dataset, m.shards[i], forgetting)
        if change is None:
            continue
        if accept:
            return change
        source = m.data_of(i).get("source") or {}
        where = source.get("data") or source.get("dataset") or "the store's data source"
        raise TaftError(f"the data at {where} changed since the store was trained: {change}; nothing was changed. "
                        "Restore the data, or retrain on it anyway with accept_changed_data=True",
                        arguments=("accept_changed_data",))
    return None


__all__ = ["check_unchanged", "content_change", "open_source", "open_sources", "shard_hashes"]
