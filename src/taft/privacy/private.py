"""DP-SGD for your own training loop, in the spirit of Opacus' `make_private`:

    private = make_private(model, optimizer, (features, labels), epsilon=3.0, delta=1e-5, clip=1.0,
                           expected_batch_size=256, epochs=10, seed=0)
    for epoch in range(10):
        for x, y, mask in private.loader:        # Poisson-sampled batches (sizes vary, may be empty)
            private.step.step(x, y, mask)        # clipped per-example gradients + noise, then optimizer.step()
    private.ledger()                             # the privacy ledger of the run (as `fit(..., dp=...)` records)

`model` is a `taft.model.Classifier`; `data` holds its `train_inputs` (trunk features, or a probe's pooled
features), the labels and optionally the text masks, as tensors with one row per example. The step, sampling,
seeding and accounting are those of `fit(..., dp=DPConfig(...))`: the same seed gives the same trained tensors.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from taft.errors import TaftError
from taft.losses import DEFAULT_KAPPA
from taft.model import Classifier
from taft.privacy.config import DEFAULT_CHUNK, DPConfig, DPPlan, plan_dp
from taft.privacy.dpsgd import DPStep, PoissonSampler, dp_generators
from taft.privacy.ledger import PrivacyLedger

Batch = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


class PoissonLoader:
    """One epoch of Poisson-sampled batches (x, y, mask or None) of `data` per iteration (`plan.steps_per_epoch`
    batches); rows are taken with the sampled indices, on the tensors' own device."""

    def __init__(self, data: Sequence[torch.Tensor], sampler: PoissonSampler):
        self.data, self.sampler = data, sampler

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    def __iter__(self) -> Iterator[Batch]:
        x, y, *rest = self.data
        mask = rest[0] if rest else None
        for idx in self.sampler.epoch():
            yield x[idx], y[idx], None if mask is None else mask[idx]


@dataclass
class PrivateTraining:
    """What `make_private` returns: the DP step (wrapping the optimizer), the Poisson loader and the plan."""

    step: DPStep
    loader: PoissonLoader
    plan: DPPlan

    def ledger(self) -> PrivacyLedger:
        """The privacy ledger of the planned run (ε at δ, σ, q, steps, C, accountant, n, notes)."""
        return self.plan.ledger()


def check_data(data: Sequence[torch.Tensor]) -> int:
    """The number of examples of (x, y[, mask]); `TaftError` unless the rows agree."""
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        raise TaftError("data must be a tuple (inputs, labels[, mask]) of tensors with one row per example")
    n = len(data[0])
    if any(len(t) != n for t in data):
        raise TaftError(f"data tensors have different numbers of rows: {[len(t) for t in data]}")
    return n


def make_private(model: Classifier, optimizer: torch.optim.Optimizer, data: Sequence[torch.Tensor], *,
                 delta: float, epochs: int, epsilon: float | None = None, noise_multiplier: float | None = None,
                 clip: float = 1.0, expected_batch_size: int | None = None, accountant: str = "prv",
                 seed: int | None = None, loss: str = "mse", kappa: float = DEFAULT_KAPPA,
                 chunk_size: int = DEFAULT_CHUNK) -> PrivateTraining:
    """Plan a DP-SGD run of `epochs` epochs over `data` (σ calibrated for a target `epsilon`, or ε reported for a
    given `noise_multiplier`; see `DPConfig`) and wrap `optimizer` (over `model`'s trainable tensors) in its DP
    step. `loss`/`kappa`: the per-example training loss. Errors (bad budget, δ ≥ 1/n, ...) come before anything
    is trained."""
    n = check_data(data)
    dp = DPConfig(clip=clip, epsilon=epsilon, delta=delta, noise_multiplier=noise_multiplier, accountant=accountant,
                  expected_batch_size=expected_batch_size, chunk_size=chunk_size, seed=seed)
    plan = plan_dp(dp, n, epochs, 1)
    sample_gen, noise_gen = dp_generators(seed, model.device)
    step = DPStep(model, optimizer, clip=dp.clip, noise_multiplier=plan.noise_multiplier,
                  expected_batch_size=plan.expected_batch_size, generator=noise_gen, loss=loss, kappa=kappa,
                  chunk_size=chunk_size)
    sampler = PoissonSampler(n, plan.sample_rate, plan.steps_per_epoch, sample_gen)
    return PrivateTraining(step, PoissonLoader(data, sampler), plan)
