"""Seeded, stratified train/validation split by example id.

Each example is ranked within its class by SHA-256(seed, id); the first `round(val_fraction * n_class)` of a
class go to validation, at least one when `val_fraction > 0` and the class has two or more examples, and always
leaving at least one training example per class (so small data keeps a validation example per class where it can). The split depends only on
the seed and the (id, label) pairs: not on dataset order, and an example's side does not change when other
examples are added or removed, except near a class's cut-off (the count per class is re-rounded).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

from taft.errors import TaftError

MAX_LISTED = 10  # ids named in an error message


class _Selectable(Protocol):
    ids: Sequence[str]
    labels: Sequence[int]

    def select(self, ids: Sequence[str]) -> _Selectable: ...


D = TypeVar("D", bound=_Selectable)


def _rank(seed: int, example_id: str) -> bytes:
    return hashlib.sha256(f"split\0{seed}\0{example_id}".encode()).digest()


def train_val_split(ids: Sequence[str], labels: Sequence[int], val_fraction: float = 0.1,
                    seed: int = 0) -> tuple[list[str], list[str]]:
    """(train ids, validation ids), each sorted. Raises `TaftError` on mismatched lengths, duplicate ids or
    `val_fraction` outside [0, 1)."""
    if len(ids) != len(labels):
        raise TaftError(f"{len(ids)} ids but {len(labels)} labels")
    if not 0.0 <= val_fraction < 1.0:
        raise TaftError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if len(set(ids)) != len(ids):
        raise TaftError("duplicate example ids; a split by id needs unique ids")
    by_class: dict[int, list[str]] = {}
    for i, y in zip(ids, labels):
        by_class.setdefault(int(y), []).append(str(i))
    train: list[str] = []
    val: list[str] = []
    for members in by_class.values():
        members.sort(key=lambda i: _rank(seed, i))
        n_val = min(max(int(round(val_fraction * len(members))), int(val_fraction > 0)), len(members) - 1)
        val += members[:n_val]
        train += members[n_val:]
    return sorted(train), sorted(val)


def select_positions(ids: Sequence[str], wanted: Iterable[str], where: str = "the dataset") -> list[int]:
    """Positions in `ids` of the examples whose id is in `wanted`, in `ids` order: the one id selector behind every
    dataset's `select`. Raises `TaftError` naming ids that are not in `ids` (`where` names the data)."""
    wanted = set(wanted)
    unknown = sorted(wanted.difference(ids))
    if unknown:
        more = f" and {len(unknown) - MAX_LISTED} more" if len(unknown) > MAX_LISTED else ""
        raise TaftError(f"{len(unknown)} ids are not in {where}: {unknown[:MAX_LISTED]}{more}")
    return [k for k, i in enumerate(ids) if i in wanted]


def per_class_positions(ids: Sequence[str], labels: Sequence[int], n: int, seed: int | None = None) -> list[int]:
    """Positions (sorted) of at most `n` examples per class: the first `n` in order (seed None) or a seeded sample
    that depends only on (seed, id), not on the order. Raises `TaftError` unless n ≥ 1."""
    if n <= 0:
        raise TaftError(f"per-class count must be positive, got {n}")
    by_class: dict[int, list[int]] = {}
    for k, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(k)
    keep: list[int] = []
    for rows in by_class.values():
        if seed is not None:
            rows = sorted(rows, key=lambda k: hashlib.sha256(f"{seed}\0{ids[k]}".encode()).digest())
        keep += rows[:n]
    return sorted(keep)


def split_dataset(dataset: D, val_fraction: float = 0.1, seed: int = 0) -> tuple[D, D]:
    """`train_val_split` applied to a dataset with `ids`, `labels` and `select(ids)` (ImageDataset,
    CachedFeatures): (train part, validation part), each in dataset order."""
    train_ids, val_ids = train_val_split(list(dataset.ids), list(dataset.labels), val_fraction, seed)
    return dataset.select(train_ids), dataset.select(val_ids)
