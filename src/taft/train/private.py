"""DP-SGD for your own training loop, in the spirit of Opacus' `make_private`: the same plan, Poisson sampling,
clipped and noised step, seeding and accounting as `fit(..., dp=...)`, around your model and optimizer.

    inputs, mask = model.train_inputs(features)            # cached trunk features (a probe: its pooled features)
    private = make_private(model, optimizer, (inputs, labels), DPConfig(epsilon=3.0, delta=1e-5),
                           TrainConfig(epochs=10))
    for epoch in range(private.epochs):
        for x, y, mask in private.loader:                    # Poisson-sampled batches (sizes vary, may be empty)
            private.step(x, y, mask)                         # clip each example's gradient, add noise, step
    private.ledger()                                         # the privacy ledger (as `fit(..., dp=...)` records)

`data` holds the model's `train_inputs`, the labels and, for text features, the mask, as tensors with one row per
example. With the same seeds, the step trains the same tensors as `fit` (your optimizer, at your rates).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from taft.errors import TaftError
from taft.model import Classifier
from taft.privacy import DPConfig, DPStep, PoissonSampler, PrivacyLedger
from taft.train.config import TrainConfig
from taft.train.feeding import Batch
from taft.train.plan import RunPlan, plan_run


class PoissonLoader:
    """One epoch of Poisson-sampled batches (x, y, mask or None) of `data` per iteration (`steps_per_epoch`
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
    """What `make_private` returns: the DP step (wrapping the optimizer; `step(x, y, mask)`), the Poisson loader
    and the run plan (its `epochs`, σ, q, steps)."""

    step: DPStep
    loader: PoissonLoader
    plan: RunPlan

    @property
    def epochs(self) -> int:
        """The epochs the privacy accounting assumes (loop over the loader this many times)."""
        return self.plan.config.epochs

    def ledger(self) -> PrivacyLedger:
        """The privacy ledger of the planned run (ε at δ, σ, q, steps, C, accountant, n, notes)."""
        return self.plan.ledger()


def check_data(data: Sequence[torch.Tensor]) -> int:
    """The number of examples of (x, y[, mask]); `TaftError` unless the rows agree."""
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        raise TaftError("data must be a tuple (inputs, labels[, mask]) of tensors with one row per example")
    n = len(data[0])
    if any(len(t) != n for t in data if t is not None):
        raise TaftError(f"data tensors have different numbers of rows: {[len(t) for t in data if t is not None]}")
    return n


def make_private(model: Classifier, optimizer: torch.optim.Optimizer, data: Sequence[torch.Tensor], dp: DPConfig,
                 config: TrainConfig | None = None) -> PrivateTraining:
    """Plan a DP-SGD run of `model` over `data` (`plan_run`: σ calibrated for a target ε, or ε reported for a
    given σ, over `config`'s epochs; its loss, κ and λ are the step's) and wrap `optimizer` (over `model`'s
    trainable tensors) in its DP step. Errors (bad budget, δ ≥ 1/n, ...) come before anything is trained."""
    plan = plan_run(model, config or TrainConfig(), check_data(data), dp)
    sampler, step = plan.start(model, optimizer)
    return PrivateTraining(step, PoissonLoader(data, sampler), plan)  # type: ignore[arg-type]
