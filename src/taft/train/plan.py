"""One plan for every training run, plain or DP-SGD: `plan_run(model, config, n, dp)` resolves the recipe for
the model and data, calibrates DP-SGD's noise (before anything is trained or written), and `RunPlan.start` gives
the run's sampler and gradient step. `fit`, `train_loop`, `make_private` and the store's shards all train from a
`RunPlan`.

- plain: batches of `batch_size` from a seeded permutation per epoch (`PermutationSampler`), `AutogradStep`.
- DP-SGD: Poisson batches with rate q = B/n (`PoissonSampler`, B the expected batch size), `DPStep` (clipped
  per-example gradients plus noise); the plan's `ledger()` is the run's privacy ledger.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from taft.errors import TaftError
from taft.model import Classifier
from taft.privacy import DPConfig, DPPlan, DPStep, PoissonSampler, PrivacyLedger, plan_dp
from taft.privacy.config import expected_batch_size
from taft.privacy.dpsgd import dp_generators
from taft.train.config import TrainConfig
from taft.train.distributed import AllReduceStep, Group, refuse_private
from taft.train.steps import AutogradStep, GradientStep, PermutationSampler, Sampler


@dataclass(frozen=True)
class RunPlan:
    """A resolved run on n examples: the recipe (`config`, defaults filled in), the batch size (DP-SGD: the
    expected batch size B), steps per epoch and in all, and for DP-SGD the `DPPlan` (σ, q, ε at δ)."""

    config: TrainConfig
    n: int
    batch_size: int
    dp: DPPlan | None = None

    @property
    def private(self) -> bool:
        return self.dp is not None

    @property
    def steps_per_epoch(self) -> int:
        return self.dp.steps_per_epoch if self.dp is not None else math.ceil(self.n / self.batch_size)

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    def ledger(self) -> PrivacyLedger | None:
        """The privacy ledger of a DP-SGD run (None for plain training)."""
        return self.dp.ledger() if self.dp is not None else None

    def start(self, model: Classifier, optimizer: torch.optim.Optimizer, *,
              forward: Callable[..., torch.Tensor] | None = None, autocast: str = "none",
              batches: Sequence[torch.Tensor] | None = None,
              group: Group | None = None) -> tuple[Sampler, GradientStep]:
        """(the sampler, the gradient step updating `model` through `optimizer`) of this run. Plain training:
        `forward` (e.g. a compiled `train_logits`) and `autocast` apply; with a torchrun `group`, this rank's part
        of every global batch and the all-reduced step (`taft.train.distributed`). DP-SGD: sampling and noise are
        seeded by the DP seed (fresh when None); `batches` replaces Poisson sampling by a fixed schedule, for
        checks only."""
        cfg = self.config
        if self.dp is None:
            if batches is not None:
                raise TaftError("a fixed batch schedule applies to DP-SGD runs only")
            if group is not None:
                return (PermutationSampler(self.n, self.batch_size, cfg.seed, part=group.part),
                        AllReduceStep(model, optimizer, cfg, group, forward=forward, autocast=autocast))
            return (PermutationSampler(self.n, self.batch_size, cfg.seed),
                    AutogradStep(model, optimizer, cfg, forward=forward, autocast=autocast))
        if group is not None:
            refuse_private(self.dp.config)
        if batches is not None and len(batches) != self.dp.steps:
            raise TaftError(f"a fixed batch schedule needs {self.dp.steps} batches, got {len(batches)}")
        dp = self.dp.config
        sample_gen, noise_gen = dp_generators(dp.seed, model.device)
        step = DPStep(model, optimizer, clip=dp.clip, noise_multiplier=self.dp.noise_multiplier,
                      expected_batch_size=self.dp.expected_batch_size, generator=noise_gen, loss=cfg.loss,
                      kappa=cfg.kappa, chunk_size=dp.chunk_size, reg=cfg.reg)
        sampler = PoissonSampler(self.n, self.dp.sample_rate, self.dp.steps_per_epoch, sample_gen, batches)
        return sampler, step


def plan_run(model: Classifier, config: TrainConfig, n: int, dp: DPConfig | None = None) -> RunPlan:
    """The plan of training `model` on n examples with `config` (its defaults resolved for the model's method and
    backbone kind, the epochs raised to `config.min_steps`), privately when `dp` is given: σ is calibrated (or ε
    computed) here, and a probe-fitted base head is refused (fitted on the private data without noise)."""
    if dp is None:
        config = config.resolved(model.method, text=model.is_text, n=n)
        return RunPlan(config, n, config.batch_size)
    if model.spec.head_init == "probe":
        raise TaftError("head_init='probe' fits a linear probe on the training data without noise, which "
                        "breaks the privacy guarantee: use head_init='random' with DP")
    batch = expected_batch_size(dp, n, config.batch_size)
    config = config.resolved(model.method, text=model.is_text, private=True, n=n, epsilon=dp.epsilon,
                             batch_size=batch)
    return RunPlan(config, n, batch, plan_dp(dp, n, config.epochs, config.batch_size))
