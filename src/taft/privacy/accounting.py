"""Privacy accounting for DP-SGD with Poisson sampling and Gaussian noise, by maintained libraries.

The mechanism: each of `steps` steps samples every training example independently with probability q (Poisson
sampling), sums the per-example gradients clipped to L2 norm C and adds N(0, σ²C²) noise to every coordinate.
Its (ε, δ) guarantee (add/remove-one adjacency) comes from an accountant:

- "prv" (default): Opacus' `PRVAccountant`, numerical composition of privacy-loss random variables (Gopi et al.,
  2021); it returns an upper bound on ε (the estimate plus its error bound `eps_error`, 0.01 by default here).
- "rdp": Opacus' `RDPAccountant` (Rényi DP of the sampled Gaussian, Mironov et al.); a looser upper bound.

`epsilon_dp_accounting` computes the same ε with Google's `dp_accounting` (PLD or RDP), an independent
implementation used to cross-check (tests).

`calibrate_noise` finds the smallest σ (to a relative tolerance) whose ε does not exceed a target, by a
bracketing search on log σ with the accountant itself (ε is decreasing in σ): the returned σ spends
ε ∈ [(1 − rel_tol)·target, target] by that accountant.
"""

from __future__ import annotations

import math
import warnings
from importlib import metadata

import numpy as np

from taft.errors import TaftError

ACCOUNTANTS = ("prv", "rdp")
# σ below this: the accountants get slow or unstable (PRV at σ = 0.05 takes minutes) and ε is so large (≳ 20 for
# any sampling rate with at least one epoch) that the guarantee means little.
MIN_NOISE_MULTIPLIER = 0.3
MAX_NOISE_MULTIPLIER = 1000.0
PRV_EPS_ERROR = 0.01  # absolute error bound of the PRV accountant's ε (its upper bound includes it)


def _opacus():
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise TaftError("differential privacy needs the `opacus` package: pip install 'taft-torch[dp]' "
                        f"(or opacus==1.6.0) ({e})") from e
    return PRVAccountant, RDPAccountant


def library_versions() -> dict[str, str]:
    """Versions of the accounting libraries that are installed."""
    out = {}
    for name in ("opacus", "dp-accounting"):
        try:
            out[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise TaftError(f"accountant must be one of {', '.join(ACCOUNTANTS)}; got {accountant!r}")
    return accountant


def check_mechanism(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
    """Names the first bad parameter: σ ≥ MIN_NOISE_MULTIPLIER, 0 < q ≤ 1, steps ≥ 1, 0 < δ < 1."""
    if not _finite(noise_multiplier) or not MIN_NOISE_MULTIPLIER <= noise_multiplier <= MAX_NOISE_MULTIPLIER:
        raise TaftError(f"noise multiplier σ must be in [{MIN_NOISE_MULTIPLIER}, {MAX_NOISE_MULTIPLIER:g}] for "
                        f"accounting, got {noise_multiplier!r} (below {MIN_NOISE_MULTIPLIER} the guarantee is "
                        "ε ≳ 20, i.e. next to none)")
    if not _finite(sample_rate) or not 0 < sample_rate <= 1:
        raise TaftError(f"sample rate q must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TaftError(f"steps must be an integer ≥ 1, got {steps!r}")
    if not _finite(delta) or not 0 < delta < 1:
        raise TaftError(f"delta must be in (0, 1), got {delta!r}")


def compute_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "prv", *, eps_error: float = PRV_EPS_ERROR) -> float:
    """ε spent by `steps` steps of the Poisson-sampled Gaussian mechanism (σ, q) at δ, by Opacus' accountant.

    Returns math.inf when the accountant cannot bound ε (extreme parameters)."""
    check_accountant(accountant)
    check_mechanism(noise_multiplier, sample_rate, steps, delta)
    PRVAccountant, RDPAccountant = _opacus()
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    kwargs = {"eps_error": eps_error} if accountant == "prv" else {}
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        # RDP: "optimal order is the largest alpha" means the bound could be tighter; it is still an upper bound
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        try:
            eps = float(acc.get_epsilon(delta=float(delta), **kwargs))
        except (ValueError, FloatingPointError, OverflowError, ZeroDivisionError):
            return math.inf
    return eps if math.isfinite(eps) and eps >= 0 else math.inf


def epsilon_dp_accounting(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                          method: str = "pld") -> float:
    """The same ε by Google's `dp_accounting` (an independent implementation): "pld" (privacy loss
    distributions) or "rdp". For cross-checks; needs `pip install dp-accounting`."""
    check_mechanism(noise_multiplier, sample_rate, steps, delta)
    try:
        import dp_accounting
        from dp_accounting import pld, rdp
    except ImportError as e:
        raise TaftError(f"the cross-check needs the `dp-accounting` package: pip install dp-accounting ({e})") from e
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)
    if method == "pld":
        acc = pld.PLDAccountant()
    elif method == "rdp":
        acc = rdp.RdpAccountant()
    else:
        raise TaftError(f"method must be 'pld' or 'rdp', got {method!r}")
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "prv", *, rel_tol: float = 0.01,
                    sigma_range: tuple[float, float] = (MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER),
                    ) -> tuple[float, float]:
    """(σ, ε): the smallest noise multiplier σ (to `rel_tol`) whose ε at δ after `steps` Poisson steps of rate
    q is at most `target_epsilon`, and that ε, with (1 − rel_tol)·target ≤ ε ≤ target.

    ε(σ) is decreasing. The search brackets the target (σ_lo with ε > target, σ_hi with ε ≤ target), starting
    for PRV from the (fast, looser) RDP solution, then narrows the bracket by interpolating log ε linearly in
    log σ, with bisection in log σ as the fallback when one end stays put. Raises TaftError when the target is
    outside what σ in `sigma_range` can give."""
    check_accountant(accountant)
    if not _finite(target_epsilon) or target_epsilon <= 0:
        raise TaftError(f"target epsilon must be a finite number > 0, got {target_epsilon!r}")
    if not 0 < rel_tol < 0.5:
        raise TaftError(f"rel_tol must be in (0, 0.5), got {rel_tol!r}")
    s_min, s_max = (float(s) for s in sigma_range)
    check_mechanism(s_min, sample_rate, steps, delta)
    check_mechanism(s_max, sample_rate, steps, delta)
    # The PRV bound includes its absolute error: keep it small next to the target.
    eps_error = min(PRV_EPS_ERROR, target_epsilon * rel_tol)

    def eps(sigma: float) -> float:
        return compute_epsilon(sigma, sample_rate, steps, delta, accountant, eps_error=eps_error)

    where = f"over {steps} steps at sample rate q={sample_rate:.4g} ({accountant} accountant)"
    start = 1.0
    if accountant == "prv":  # RDP's ε bounds PRV's from above: its σ is a close starting point, and it is cheap
        try:
            start = calibrate_noise(target_epsilon, delta, sample_rate, steps, "rdp", rel_tol=0.05,
                                    sigma_range=sigma_range)[0]
        except TaftError:
            start = 1.0
    start = min(max(start, s_min), s_max)
    lo, eps_lo, hi, eps_hi = _bracket(eps, target_epsilon, start, s_min, s_max)
    if hi is None:
        raise TaftError(
            f"target ε={target_epsilon:g} at δ={delta:g} is unreachable: even noise multiplier σ={s_max:g} spends "
            f"ε={eps_lo:.4g} {where}; allow a larger ε, train fewer epochs, or use more training data "
            "(a smaller q)")
    if lo is None:
        raise TaftError(
            f"target ε={target_epsilon:g} at δ={delta:g} is larger than what the least noise considered "
            f"(σ={s_min:g}) spends (ε={eps_hi:.4g} {where}); such a budget gives next to no protection: choose a "
            "smaller ε or give the noise multiplier directly")
    floor = (1 - rel_tol) * target_epsilon
    aim = math.log((1 - rel_tol / 2) * target_epsilon)
    run = 0  # consecutive updates of the same end: > 0 the low end moved, < 0 the high end
    for _ in range(100):
        if eps_hi >= floor:
            return hi, eps_hi
        a, b = math.log(lo), math.log(hi)
        t = 0.5
        if math.isfinite(eps_lo) and abs(run) < 2:
            la, lb = math.log(eps_lo), math.log(eps_hi)
            t = min(max((la - aim) / (la - lb), 0.05), 0.95) if la > lb else 0.5
        mid = math.exp(a + t * (b - a))
        if not lo < mid < hi:
            break
        e = eps(mid)
        if e <= target_epsilon:
            hi, eps_hi, run = mid, e, min(run, 0) - 1
        else:
            lo, eps_lo, run = mid, e, max(run, 0) + 1
    # The accountant's ε jumps across the tolerance band (numerical discretisation): σ_hi still keeps ε ≤ target.
    return hi, eps_hi


def _bracket(eps, target: float, start: float, s_min: float, s_max: float, factor: float = 1.5):
    """(σ_lo, ε_lo, σ_hi, ε_hi) with ε(σ_lo) > target ≥ ε(σ_hi), searching geometrically from `start` within
    [s_min, s_max]. σ_hi is None when even s_max spends more (then ε_lo = ε(s_max)); σ_lo is None when even s_min
    spends at most the target (then ε_hi = ε(s_min))."""
    sigma, e = start, eps(start)
    if e <= target:
        while True:
            if sigma <= s_min:
                return None, None, sigma, e
            nxt = max(sigma / factor, s_min)
            e_nxt = eps(nxt)
            if e_nxt > target:
                return nxt, e_nxt, sigma, e
            sigma, e = nxt, e_nxt
    while True:
        if sigma >= s_max:
            return sigma, e, None, None
        nxt = min(sigma * factor, s_max)
        e_nxt = eps(nxt)
        if e_nxt <= target:
            return sigma, e, nxt, e_nxt
        sigma, e = nxt, e_nxt


def _finite(x) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) and math.isfinite(x)
