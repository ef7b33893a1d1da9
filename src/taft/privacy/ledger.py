"""The privacy ledger: what a private training run spent, as stored in a checkpoint's metadata (`privacy` key).

A ledger is JSON: `PrivacyLedger.to_dict()` / `PrivacyLedger.from_dict()`. For one DP-SGD run it records the
mechanism ("DP-SGD (Poisson, Gaussian)"), ε and δ (ε is None when σ = 0: no finite guarantee), the noise
multiplier σ, the sample rate q, the number of steps, the clipping norm C, the accountant, the number of training
examples n, the expected batch size, the target ε when σ was calibrated, the library versions, whether the
sampling and noise were seeded, and notes on what the guarantee does not cover.

`parallel_composition(ledgers)` gives the guarantee of a model built from shards trained on disjoint data: each
example influences one shard only, so with each shard (ε_i, δ_i)-DP the collection of shard models, and any
model computed from them (e.g. the composition Σ α_i Δw_i with data-independent weights α), is
(max ε_i, max δ_i)-DP with respect to adding or removing one example.

`sequential_composition(ledgers)` gives the guarantee of several releases trained on the same (or overlapping)
data, e.g. a store shard's model before and after it was retrained to forget examples: (Σ ε_i, Σ δ_i)-DP by the
basic composition theorem.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from taft.errors import TaftError
from taft.wording import counted

MECHANISM = "DP-SGD (Poisson, Gaussian)"
PARALLEL = "parallel composition of disjoint shards"
SEQUENTIAL = "sequential composition (basic: sums of ε and δ)"
ADJACENCY = "add/remove one training example"


@dataclass(frozen=True)
class PrivacyLedger:
    """(ε, δ) spent and how. See the module doc. For a parallel (sequential) composition the per-run fields (σ, q,
    steps, C, accountant, expected_batch_size) are None and `components` holds the shards' (releases') ledgers."""

    epsilon: float | None
    delta: float
    n: int
    mechanism: str = MECHANISM
    adjacency: str = ADJACENCY
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    clip: float | None = None
    accountant: str | None = None
    expected_batch_size: int | None = None
    target_epsilon: float | None = None
    seeded: bool = False
    libraries: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    components: list[dict[str, Any]] | None = None

    @property
    def private(self) -> bool:
        """True when the ledger states a finite ε."""
        return self.epsilon is not None and math.isfinite(self.epsilon)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["epsilon"] is not None and not math.isfinite(d["epsilon"]):
            d["epsilon"] = None  # JSON has no infinity: None means no finite guarantee
        if d["clip"] is not None and not math.isfinite(d["clip"]):
            d["clip"] = "inf"
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PrivacyLedger:
        if not isinstance(d, Mapping):
            raise TaftError(f"a privacy ledger must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        missing = [k for k in ("epsilon", "delta", "n") if k not in d]
        if missing:
            raise TaftError(f"privacy ledger lacks {missing}")
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("clip") == "inf":
            kw["clip"] = math.inf
        return cls(**kw)

    def summary(self) -> str:
        """One line, e.g. "(ε=2.98, δ=1e-05)-DP: DP-SGD (Poisson, Gaussian), σ=0.83, q=0.0107, 940 steps, C=1,
        prv accountant (opacus 1.6.0), n=3000"."""
        head = (f"(ε={self.epsilon:.4g}, δ={self.delta:g})-DP" if self.private
                else f"not private (no finite ε; δ={self.delta:g})")
        if self.components is not None:
            parts = counted(len(self.components), "release" if self.mechanism == SEQUENTIAL else "shard")
            return f"{head}: {self.mechanism} ({parts}), n={self.n}"
        libs = ", ".join(f"{k} {v}" for k, v in sorted(self.libraries.items()) if k != "taft")
        target = f" (target ε={self.target_epsilon:g})" if self.target_epsilon is not None else ""
        return (f"{head}{target}: {self.mechanism}, σ={self.noise_multiplier:.4g}, q={self.sample_rate:.4g}, "
                f"{self.steps} steps, C={self.clip:g}, {self.accountant} accountant"
                f"{f' ({libs})' if libs else ''}, n={self.n}{', seeded' if self.seeded else ''}")


def describe(ledger: Mapping[str, Any] | PrivacyLedger) -> str:
    """`PrivacyLedger.summary()` of a ledger or its dict; a dict that is not a ledger prints as is."""
    try:
        led = ledger if isinstance(ledger, PrivacyLedger) else PrivacyLedger.from_dict(ledger)
        return led.summary()
    except (TaftError, TypeError, ValueError):
        return str(ledger)


def parallel_composition(ledgers: Iterable[Mapping[str, Any] | PrivacyLedger], *,
                         shard_ids: Sequence[Iterable[str]] | None = None) -> PrivacyLedger:
    """The guarantee of shards trained on disjoint data, taken together: (max ε_i, max δ_i)-DP (add/remove one
    example), n = Σ n_i. A shard without a finite ε makes the whole non-private (ε None).

    `shard_ids` (optional, one collection of example ids per ledger) is checked to be pairwise disjoint; without
    it, disjointness is the caller's promise. It holds when the assignment of an example to a shard does not
    depend on the other examples (e.g. by a hash of its id), and for models computed from the shard models alone
    with data-independent weights (uniform α; weights by shard size use the sizes, which are then treated as
    public). Retraining a shard (forgetting) and releasing both the old and the new model of that shard composes
    sequentially on that shard's data: the ledger of the retrained shard must then account for both."""
    items = [x if isinstance(x, PrivacyLedger) else PrivacyLedger.from_dict(x) for x in ledgers]
    if not items:
        raise TaftError("parallel composition needs at least one shard ledger")
    if shard_ids is not None:
        if len(shard_ids) != len(items):
            raise TaftError(f"{len(shard_ids)} id sets for {len(items)} ledgers")
        seen: dict[str, int] = {}
        for i, ids in enumerate(shard_ids):
            for ex in ids:
                if ex in seen and seen[ex] != i:
                    raise TaftError(f"shards {seen[ex]} and {i} both hold example {ex!r}: parallel composition "
                                    "needs disjoint shards")
                seen[ex] = i
    eps = None if any(not x.private for x in items) else max(float(x.epsilon) for x in items)
    notes = sorted({note for x in items for note in x.notes})
    return PrivacyLedger(epsilon=eps, delta=max(float(x.delta) for x in items), n=sum(int(x.n) for x in items),
                         mechanism=PARALLEL, seeded=any(x.seeded for x in items),
                         libraries=dict(sorted({k: v for x in items for k, v in x.libraries.items()}.items())),
                         notes=notes, components=[x.to_dict() for x in items])


def sequential_composition(ledgers: Iterable[Mapping[str, Any] | PrivacyLedger]) -> PrivacyLedger:
    """The guarantee of several releases computed from the same data (or overlapping data), e.g. a shard's model
    and its retrained successor after forgetting, when the earlier one may already be public: (Σ ε_i, Σ δ_i)-DP
    (add/remove one example) by the basic composition theorem. That bound holds whatever accountant each run used;
    it is looser than accounting all runs' (σ, q, steps) together, which `taft.privacy.accounting` does not offer
    for runs of different parameters. The runs must use independent noise (different seeds).

    A ledger that is itself a sequential composition contributes its runs (the result is flat: `components` lists
    every release in order). n is the last release's (the data the newest model was trained on). A release
    without a finite ε makes the whole non-private (ε None)."""
    items: list[PrivacyLedger] = []
    for x in ledgers:
        led = x if isinstance(x, PrivacyLedger) else PrivacyLedger.from_dict(x)
        if led.mechanism == SEQUENTIAL and led.components is not None:
            items += [PrivacyLedger.from_dict(c) for c in led.components]
        else:
            items.append(led)
    if not items:
        raise TaftError("sequential composition needs at least one ledger")
    eps = None if any(not x.private for x in items) else sum(float(x.epsilon) for x in items)
    return PrivacyLedger(epsilon=eps, delta=sum(float(x.delta) for x in items), n=int(items[-1].n),
                         mechanism=SEQUENTIAL, seeded=any(x.seeded for x in items),
                         libraries=dict(sorted({k: v for x in items for k, v in x.libraries.items()}.items())),
                         notes=sorted({note for x in items for note in x.notes}),
                         components=[x.to_dict() for x in items])
