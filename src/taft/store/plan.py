"""Shard plans: which shard trains on which example id.

A plan is a pure function of (ids, labels, K, seed, kind) and does not depend on the order the examples come in:

- "random" (default): classes in label order; within a class, ids sorted by SHA-256(seed, id) are dealt to the
  shards round-robin, the deal continuing from class to class. Every shard gets ⌊n_c/K⌋ or ⌈n_c/K⌉ examples of
  each class c (so all classes when n_c ≥ K) and shard sizes differ by at most one.
- "class": whole classes per shard; classes sorted by SHA-256(seed, label) are dealt round-robin (needs
  K ≤ number of classes).

Once made, a plan is stored with the model store and never recomputed: `ShardPlan.without(ids)` removes ids and
keeps every other id in its shard, which is what forgetting and a from-scratch rebuild without those ids share.
Within a shard ids are kept sorted, the canonical training order before the seeded shuffle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from taft.errors import TaftError

PLAN_KINDS = ("random", "class")
_MAX_LISTED = 10


def _rank(seed: int, key: str) -> bytes:
    return hashlib.sha256(f"taft-shard-plan\0{seed}\0{key}".encode()).digest()


def shard_seed(store_seed: int, index: int) -> int:
    """The data-order seed of shard `index` of a store seeded `store_seed` (31-bit, deterministic)."""
    digest = hashlib.sha256(f"taft-shard-seed\0{store_seed}\0{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class ShardPlan:
    """`shards[i]`: the sorted ids of shard i. `kind` and `seed` say how it was made."""

    kind: str
    seed: int
    shards: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if self.kind not in PLAN_KINDS:
            raise TaftError(f"shard plan kind must be one of {PLAN_KINDS}, got {self.kind!r}")
        if not self.shards:
            raise TaftError("a shard plan needs at least one shard")
        seen: set[str] = set()
        dup = [i for s in self.shards for i in s if i in seen or seen.add(i)]
        if dup:
            raise TaftError(f"shard plan lists ids in more than one place: {dup[:_MAX_LISTED]}")

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def ids(self) -> list[str]:
        return [i for s in self.shards for i in s]

    def without(self, ids: Iterable[str]) -> ShardPlan:
        """The same plan with `ids` removed; every other id stays in its shard (shards may become empty)."""
        drop = set(ids)
        return ShardPlan(self.kind, self.seed, tuple(tuple(i for i in s if i not in drop) for s in self.shards))

    def to_dict(self) -> dict[str, Any]:
        """The manifest's `plan` entry; its key "k" (the number of shards) is the store format's name."""
        return {"kind": self.kind, "seed": self.seed, "k": self.num_shards, "shards": [list(s) for s in self.shards]}

    @classmethod
    def from_dict(cls, d: Any) -> ShardPlan:
        try:
            plan = cls(str(d["kind"]), int(d["seed"]), tuple(tuple(str(i) for i in s) for s in d["shards"]))
        except (KeyError, TypeError, ValueError) as e:
            raise TaftError(f"malformed shard plan ({type(e).__name__}: {e})") from e
        if "k" in d and d["k"] != plan.num_shards:
            raise TaftError(f"malformed shard plan: k={d['k']} but {plan.num_shards} shards listed")
        return plan


def make_plan(ids: Sequence[str], labels: Sequence[int], k: int, seed: int = 0, kind: str = "random") -> ShardPlan:
    """Split examples (stable string ids, integer labels) into `k` shards; see the module doc. Raises `TaftError`
    on mismatched lengths, duplicate ids, k < 1, more shards than examples (random) or classes (class)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise TaftError(f"number of shards must be an integer ≥ 1, got {k!r}")
    if kind not in PLAN_KINDS:
        raise TaftError(f"shard plan kind must be one of {PLAN_KINDS}, got {kind!r}")
    if len(ids) != len(labels):
        raise TaftError(f"{len(ids)} ids but {len(labels)} labels")
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise TaftError("duplicate example ids; a shard plan needs unique ids")
    by_class: dict[int, list[str]] = {}
    for i, y in zip(ids, labels):
        by_class.setdefault(int(y), []).append(i)
    shards: list[list[str]] = [[] for _ in range(k)]
    if kind == "random":
        if k > len(ids):
            raise TaftError(f"cannot split {len(ids)} examples into {k} shards")
        position = 0
        for label in sorted(by_class):
            for i in sorted(by_class[label], key=lambda i: _rank(seed, i)):
                shards[position % k].append(i)
                position += 1
    else:
        if k > len(by_class):
            raise TaftError(f"cannot split {len(by_class)} classes into {k} class-wise shards")
        for j, label in enumerate(sorted(by_class, key=lambda c: _rank(seed, f"class:{c}"))):
            shards[j % k].extend(by_class[label])
    return ShardPlan(kind, seed, tuple(tuple(sorted(s)) for s in shards))
