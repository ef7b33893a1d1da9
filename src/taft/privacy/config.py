"""DP-SGD settings (`DPConfig`) and the plan they give for a training set (`plan_dp`: q, steps, σ, ε)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from taft.errors import TaftError
from taft.privacy.accounting import (ACCOUNTANTS, MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER, calibrate_noise,
                                     check_accountant, compute_epsilon, library_versions)
from taft.privacy.ledger import PrivacyLedger
from taft.version import __version__

# Examples per pass of DP-SGD's clipped sum. Ghost clipping holds the tail's activations of a chunk (a batch of 1,024
# at 56 px, taft k = 1: 3.9 s at 32, 3.2 s at 128, 2.8 s at 512 per batch on one CPU thread).
DEFAULT_CHUNK = 128
# The default expected batch size of DP-SGD: a tenth of the data, at most DP_MAX_DEFAULT_BATCH (see `expected_batch_size`).
DP_BATCH_FRACTION = 0.1
DP_MAX_DEFAULT_BATCH = 1024

NOTES = (
    "the guarantee covers the trained tensors; training losses in the run's metrics.jsonl/metrics.json are "
    "computed on the private data and are not covered (the checkpoint's metrics omit them)",
    "validation data must be disjoint from the private training data; metrics on it are not covered",
    "the checkpoint metadata lists the training example ids (needed for forgetting): release the trained tensors "
    "without data.ids to keep membership private",
    "the number of training examples n is treated as public",
    "sampling and noise come from torch's seeded PRNG, not a cryptographically secure generator",
)
SEEDED_NOTE = ("sampling and noise were seeded by the user: anyone who knows the seed can undo the noise; the "
               "guarantee assumes the seed is secret")


@dataclass(frozen=True)
class DPConfig:
    """How to train privately (DP-SGD with Poisson sampling and Gaussian noise).

    clip: C, the L2 bound of each example's gradient (over all trainable tensors together). math.inf only with
        noise_multiplier=0 (no privacy; for checks).
    epsilon, delta: the target budget; σ is calibrated for it (give epsilon or noise_multiplier, not both).
        δ must be < 1/n.
    noise_multiplier: σ, the noise std in units of C; then the ε spent at δ is reported. 0 disables the noise
        (no guarantee, ε None).
    accountant: "prv" (default, tight) or "rdp".
    expected_batch_size: B; every example joins each step's batch with probability q = B/n. Default
        (`expected_batch_size(...)`): ⌊DP_BATCH_FRACTION · n⌋ capped at DP_MAX_DEFAULT_BATCH, at least the training
        config's batch_size, at most n: large batches shrink the noise per step (σC/B). One epoch is ⌈n/B⌉ steps.
    chunk_size: examples per pass of the clipped sum (bounds memory: the tail's activations of that many
        examples; not part of the guarantee).
    seed: seeds the Poisson sampling and the noise (reproducible runs, tests). None (default): a fresh random
        seed that is not stored anywhere; with a known seed the noise can be undone.
    """

    clip: float = 1.0
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    accountant: str = "prv"
    expected_batch_size: int | None = None
    chunk_size: int = DEFAULT_CHUNK
    seed: int | None = None

    def __post_init__(self) -> None:
        check_accountant(self.accountant)
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise TaftError("give exactly one of a target epsilon (σ is then calibrated) or a noise multiplier "
                            "(the ε spent is then reported)")
        if self.epsilon is not None and (not _num(self.epsilon) or not math.isfinite(self.epsilon)
                                         or self.epsilon <= 0):
            raise TaftError(f"epsilon must be a finite number > 0, got {self.epsilon!r}")
        if self.delta is None:
            raise TaftError("delta is required (a common choice is well below 1/n, e.g. 1e-5)")
        if not _num(self.delta) or not 0 < self.delta < 1:
            raise TaftError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.noise_multiplier is not None:
            s = self.noise_multiplier
            if not _num(s) or not (s == 0 or MIN_NOISE_MULTIPLIER <= s <= MAX_NOISE_MULTIPLIER):
                raise TaftError(f"noise multiplier must be 0 (no privacy) or in [{MIN_NOISE_MULTIPLIER}, "
                                f"{MAX_NOISE_MULTIPLIER:g}], got {s!r} (below {MIN_NOISE_MULTIPLIER}, ε ≳ 20: "
                                "next to no protection)")
        if not _num(self.clip) or math.isnan(self.clip) or self.clip <= 0:
            raise TaftError(f"clip must be a number > 0, got {self.clip!r}")
        if math.isinf(self.clip) and self.noise_multiplier != 0:
            raise TaftError("clip=inf leaves per-example gradients unbounded: only allowed with noise_multiplier=0")
        for name in ("expected_batch_size", "chunk_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise TaftError(f"{name} must be an integer ≥ 1, got {v!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise TaftError(f"seed must be an integer ≥ 0 or None, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DPPlan:
    """The resolved DP-SGD run for n examples: sample rate q = B/n, steps = epochs·⌈n/B⌉, σ and ε at δ."""

    config: DPConfig
    n: int
    expected_batch_size: int
    sample_rate: float
    steps_per_epoch: int
    steps: int
    noise_multiplier: float
    epsilon: float | None

    def ledger(self) -> PrivacyLedger:
        c = self.config
        return PrivacyLedger(
            epsilon=self.epsilon, delta=float(c.delta), n=self.n, noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate, steps=self.steps, clip=float(c.clip), accountant=c.accountant,
            expected_batch_size=self.expected_batch_size, target_epsilon=c.epsilon, seeded=c.seed is not None,
            libraries={"opacus": library_versions().get("opacus", "not installed"), "taft": __version__,
                       "torch": torch.__version__},
            notes=[*NOTES, *([SEEDED_NOTE] if c.seed is not None else [])])


def expected_batch_size(dp: DPConfig, n: int, batch_size: int) -> int:
    """B of a DP-SGD run on n examples: `dp.expected_batch_size`, else the default (see `DPConfig`)."""
    if dp.expected_batch_size is not None:
        return dp.expected_batch_size
    return min(n, max(batch_size, min(DP_MAX_DEFAULT_BATCH, int(DP_BATCH_FRACTION * n))))


def plan_dp(dp: DPConfig, n: int, epochs: int, batch_size: int) -> DPPlan:
    """Checks the budget against the data and calibrates σ (for a target ε) or computes ε (for a given σ)."""
    if n < 2:
        raise TaftError(f"DP-SGD needs at least 2 training examples, got {n}")
    if dp.delta >= 1 / n:
        raise TaftError(f"delta={dp.delta:g} is not below 1/n = {1 / n:.3g} for n={n} training examples: such a δ "
                        "allows releasing an example outright; use a smaller delta (e.g. ≤ 1/(10 n))")
    B = expected_batch_size(dp, n, batch_size)
    if B > n:
        raise TaftError(f"expected batch size {B} exceeds the {n} training examples (sample rate q = B/n > 1)")
    q = B / n
    per_epoch = math.ceil(n / B)
    steps = epochs * per_epoch
    if dp.noise_multiplier is not None:
        sigma = float(dp.noise_multiplier)
        eps = None if sigma == 0 else compute_epsilon(sigma, q, steps, dp.delta, dp.accountant)
        if eps is not None and not math.isfinite(eps):
            raise TaftError(f"the {dp.accountant} accountant cannot bound ε for σ={sigma:g}, q={q:.4g}, {steps} "
                            "steps: use more noise")
    else:
        sigma, eps = calibrate_noise(dp.epsilon, dp.delta, q, steps, dp.accountant)
    return DPPlan(config=dp, n=n, expected_batch_size=B, sample_rate=q, steps_per_epoch=per_epoch, steps=steps,
                  noise_multiplier=sigma, epsilon=eps)


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


__all__ = ["ACCOUNTANTS", "DPConfig", "DPPlan", "plan_dp"]
