"""Differential privacy: DP-SGD on the tangent model (and on nlft / probe), accounting, and the privacy ledger.

    dp = taft.privacy.DPConfig(epsilon=3.0, delta=1e-5, clip=1.0)   # σ calibrated with the PRV accountant
    result = taft.fit(model, train_f, val=val_f, dp=dp, run_dir="runs/dp")
    result.privacy                                                   # the ledger (also in the checkpoint's metadata)

- `accounting`: ε of (σ, q, steps) at δ by Opacus' PRV (default) or RDP accountant; σ calibration for a target ε;
  an independent cross-check with Google's dp_accounting.
- `config`: `DPConfig`, `plan_dp` (q = B/n, steps = epochs·⌈n/B⌉, σ or ε).
- `dpsgd`: the clipped sum of per-example gradients, noise, Poisson sampling, and `DPStep`: the gradient step that
  `fit`'s training loop plugs in for private runs; per-example gradients themselves (vmap over grad).
- `ghost`: the clipped sum without forming per-example gradients, from each layer's inputs and output gradients.
(`taft.train.make_private(model, optimizer, data, dp)` wires the same step and sampling into your own loop.)
- `ledger`: `PrivacyLedger`, `parallel_composition` for disjoint shards, `sequential_composition` for repeated
  releases on the same data (a retrained store shard).

What the guarantee does not cover is listed in each ledger's `notes`; in particular validation data must be
disjoint from the private training data, and `head_init="probe"` (a probe fitted on the private data without
noise) is refused under DP.
"""

from taft.privacy.accounting import (ACCOUNTANTS, MAX_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER, calibrate_noise,
                                     compute_epsilon, epsilon_dp_accounting)
from taft.privacy.config import DPConfig, DPPlan, plan_dp
from taft.privacy.dpsgd import DPStep, PoissonSampler
from taft.privacy.ledger import MECHANISM, PrivacyLedger, describe, parallel_composition, sequential_composition

__all__ = ["ACCOUNTANTS", "MAX_NOISE_MULTIPLIER", "MECHANISM", "MIN_NOISE_MULTIPLIER", "DPConfig", "DPPlan",
           "DPStep", "PoissonSampler", "PrivacyLedger", "calibrate_noise", "compute_epsilon", "describe",
           "epsilon_dp_accounting", "parallel_composition", "plan_dp", "sequential_composition"]
