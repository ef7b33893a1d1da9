"""Privacy accounting: Opacus' PRV and RDP accountants against Google's dp_accounting (an independent
implementation), PRV ≤ RDP, σ calibration to a target ε (within 1 % from below), impossible budgets."""

from __future__ import annotations

import math

import pytest

from taft import TaftError
from taft.privacy import calibrate_noise, compute_epsilon, epsilon_dp_accounting

pytest.importorskip("opacus")

# (σ, q, steps, δ): a CIFAR-like run (n = 3000, B = 32, 10 epochs), an MNIST-like one (n = 60000, B = 256,
# 15 epochs), a large-q short run.
SETTINGS = [(1.0, 32 / 3000, 940, 1e-5), (1.1, 256 / 60000, 15 * 235, 1e-5), (2.0, 0.1, 50, 1e-6)]


@pytest.mark.parametrize("sigma, q, steps, delta", SETTINGS)
def test_two_libraries_agree(sigma, q, steps, delta):
    pytest.importorskip("dp_accounting")
    prv = compute_epsilon(sigma, q, steps, delta, "prv")
    rdp = compute_epsilon(sigma, q, steps, delta, "rdp")
    pld = epsilon_dp_accounting(sigma, q, steps, delta, "pld")
    rdp2 = epsilon_dp_accounting(sigma, q, steps, delta, "rdp")
    assert prv == pytest.approx(pld, rel=0.01)  # PRV (Opacus) vs PLD (dp_accounting): numerical, both tight
    assert rdp == pytest.approx(rdp2, rel=0.01)  # the same RDP bound by two implementations
    assert prv <= rdp <= 1.3 * prv  # RDP is an upper bound, and a close one here


def test_epsilon_behaves():
    base = compute_epsilon(1.0, 0.01, 1000, 1e-5)
    assert 0 < compute_epsilon(2.0, 0.01, 1000, 1e-5) < base  # more noise
    assert compute_epsilon(1.0, 0.01, 2000, 1e-5) > base  # more steps
    assert compute_epsilon(1.0, 0.02, 1000, 1e-5) > base  # larger sample rate
    assert compute_epsilon(1.0, 0.01, 1000, 1e-3) < base  # larger δ


@pytest.mark.parametrize("target, accountant", [(3.0, "prv"), (1.0, "prv"), (3.0, "rdp")])
def test_calibration_reaches_the_target_from_below(target, accountant):
    q, steps, delta = 32 / 3000, 940, 1e-5
    sigma, eps = calibrate_noise(target, delta, q, steps, accountant)
    assert 0.99 * target <= eps <= target
    assert compute_epsilon(sigma, q, steps, delta, accountant, eps_error=min(0.01, target / 100)) == eps
    # the smallest such σ: 1 % less noise spends more than the target
    assert compute_epsilon(0.99 * sigma, q, steps, delta, accountant, eps_error=min(0.01, target / 100)) > target


def test_impossible_budgets_are_named():
    with pytest.raises(TaftError, match="target epsilon must be"):
        calibrate_noise(0.0, 1e-5, 0.01, 100)
    with pytest.raises(TaftError, match="delta must be"):
        calibrate_noise(1.0, 0.0, 0.01, 100)
    with pytest.raises(TaftError, match="unreachable"):
        calibrate_noise(0.01, 1e-6, 0.1, 100, "rdp")
    with pytest.raises(TaftError, match="least noise"):
        calibrate_noise(200.0, 1e-5, 0.01, 100, "rdp")
    with pytest.raises(TaftError, match="sample rate"):
        compute_epsilon(1.0, 1.5, 10, 1e-5)
    with pytest.raises(TaftError, match="steps must be"):
        compute_epsilon(1.0, 0.1, 0, 1e-5)
    with pytest.raises(TaftError, match="noise multiplier"):
        compute_epsilon(0.01, 0.1, 10, 1e-5)
    with pytest.raises(TaftError, match="accountant must be"):
        compute_epsilon(1.0, 0.1, 10, 1e-5, "moments")
    assert math.isfinite(compute_epsilon(0.3, 1.0, 1, 1e-5, "rdp"))
