"""Conjugate gradient on the squared loss (`taft.train.solver`), against closed-form optima built from an explicit
Jacobian: torch.func.jacrev of the plain (non-fused, manual-attention) tail for TAFT, the pooled features for a
probe. Everything runs in float64 on a tiny random ViT, so the only error left is the solver's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev

from helpers import CLASSES, TINY_VIT
from reference import PlainTail, base_and_delta, random_backbone
from taft.errors import TaftError
from taft.losses import classification_loss, proximity
from taft.model import Classifier
from taft.train.config import TrainConfig
from taft.train.examples import Examples, Prepared
from taft.train.solver import conjugate_gradient

pytestmark = pytest.mark.usefixtures("one_thread")

KAPPA = 15.0
COND = 1e3  # λ is set so that cond(A) = (σ_max²/N + λ) / λ = COND


@pytest.fixture(scope="module")
def backbone():
    return random_backbone(TINY_VIT, 12, seed=0)  # float64


def data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random trunk features (n, 10 tokens, width 32) and balanced labels."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, TINY_VIT.dim, generator=gen, dtype=torch.float64), torch.arange(n) % len(CLASSES)


def classifier(backbone, method: str = "taft") -> Classifier:
    return Classifier(backbone, class_names=CLASSES, method=method, seed=3)


def tangent_jacobian(model: Classifier, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(J (N × P), f(θ0) (n, C)) of the plain tail at w0, columns in the order of `tail.named_parameters()`."""
    tail, (base, _) = PlainTail(model), base_and_delta(model)
    f = lambda w: functional_call(tail, w, (features,))  # noqa: E731
    jac = jacrev(f)(base)
    names = [n for n, _ in model.tail.named_parameters()]
    return torch.cat([jac[n].reshape(features.shape[0] * len(CLASSES), -1) for n in names], 1), f(base)


def ridge(jacobian: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(x*, L(x*), λ) for min (1/N)‖Jx − t‖² + λ‖x‖², λ chosen for cond(A) = COND; solved in the dual
    x* = Jᵀ(JJᵀ + NλI)⁻¹t (A = JᵀJ/N + λI has the same non-trivial spectrum as JJᵀ/N + λ)."""
    n_out = jacobian.shape[0]
    gram = jacobian @ jacobian.T
    reg = float(torch.linalg.eigvalsh(gram)[-1]) / n_out / (COND - 1)
    x = jacobian.T @ torch.linalg.solve(gram + n_out * reg * torch.eye(n_out, dtype=gram.dtype), target)
    return x, float((jacobian @ x - target).pow(2).mean() + reg * x.pow(2).sum()), reg


def flat(model: Classifier) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.tail.parameters()])


def direct(model: Classifier, prepared: Prepared, reg: float, start: dict[str, torch.Tensor]):
    """(L, ‖∇L‖) at the model's parameters, by evaluating the training loss and backpropagating it."""
    params = dict(model.tail.named_parameters())
    loss = classification_loss(model.train_logits(prepared.x), prepared.labels, "mse", KAPPA)
    loss = loss + reg * proximity(params, start)
    grads = torch.autograd.grad(loss, list(params.values()))
    return float(loss.detach()), float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))


def test_cg_reaches_the_closed_form_optimum_of_taft(backbone):
    features, labels = data(12)  # N = 48 outputs, P ≈ 12.8k parameters: unique only with λ > 0
    model = classifier(backbone)
    jacobian, base = tangent_jacobian(model, features)
    target = (F.one_hot(labels, len(CLASSES)).double() * KAPPA - base).reshape(-1)
    x_star, objective_star, reg = ridge(jacobian, target)
    prepared = Prepared(model, Examples((features, labels)))
    config = TrainConfig(reg=reg, kappa=KAPPA)
    history = conjugate_gradient(model, config, prepared, iterations=200, tol=1e-10, progress=False)
    # Stopped by the tolerance: ‖r‖/‖b‖ ≤ 1e-10, so ‖x − x*‖/‖x*‖ ≤ cond(A)·1e-10 = 1e-7 (for the true residual;
    # allow 10× for the drift of CG's recursive residual in float64). A has at most N + 1 = 49 distinct eigenvalues,
    # so exact CG ends by iteration 49; rounding adds a few.
    assert history[-1]["grad_norm"] <= 1e-10 and len(history) - 1 < 100
    assert torch.linalg.norm(flat(model) - x_star) <= 1e-6 * torch.linalg.norm(x_star)
    assert history[-1]["objective"] == pytest.approx(objective_star, rel=1e-9)
    assert [r["passes"] for r in history] == list(range(1, len(history) + 1))  # the b pass, then one each
    assert history[0]["objective"] == pytest.approx(float(target.pow(2).mean()), rel=1e-12)  # L(0) = ‖t‖²/N

    one = classifier(backbone)  # one iteration is far from the optimum: the tolerance above can fail
    conjugate_gradient(one, config, prepared, iterations=1, tol=0.0, progress=False)
    assert torch.linalg.norm(flat(one) - x_star) > 1e-2 * torch.linalg.norm(x_star)


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_objective_and_gradient_norm_from_cg_identities(backbone, iterations):
    """L(x) = L(0) − bᵀx − rᵀx and ‖∇L‖ = 2‖r‖ (reported relative to θ0's) match a direct evaluation."""
    features, labels = data(10, seed=1)
    model = classifier(backbone)
    prepared = Prepared(model, Examples((features, labels)))
    reg = 1e-3
    start = {n: torch.zeros_like(p) for n, p in model.tail.named_parameters()}
    _, grad0 = direct(model, prepared, reg, start)
    history = conjugate_gradient(model, TrainConfig(reg=reg, kappa=KAPPA), prepared, iterations=iterations,
                                 tol=0.0, progress=False)
    objective, grad = direct(model, prepared, reg, start)
    assert len(history) == iterations + 1
    assert history[-1]["objective"] == pytest.approx(objective, rel=1e-10)
    assert history[-1]["grad_norm"] == pytest.approx(grad / grad0, rel=1e-8)
    assert all(a["objective"] > b["objective"] for a, b in zip(history, history[1:]))  # CG descends


def test_cg_fits_a_probe_around_its_initial_head(backbone):
    """Probe: θ = (W, b), x = θ − θ0; the normal equations (Z₁ᵀZ₁/N + λI) X = Z₁ᵀT/N with Z₁ = [pooled, 1] and
    T = κ·onehot − f(θ0), one column per class."""
    features, labels = data(48, seed=2)
    model = classifier(backbone, "probe")
    weight0, bias0 = model.tail.head.weight.detach().clone(), model.tail.head.bias.detach().clone()
    prepared = Prepared(model, Examples((features, labels)))
    z1 = torch.cat([prepared.x, torch.ones(len(labels), 1, dtype=torch.float64)], 1)
    n_out = len(labels) * len(CLASSES)
    t = F.one_hot(labels, len(CLASSES)).double() * KAPPA - (prepared.x @ weight0.T + bias0)
    gram = z1.T @ z1 / n_out
    reg = float(torch.linalg.eigvalsh(gram)[-1]) / (COND - 1)  # the LayerNorm makes 1 a combination of the features
    x_star = torch.linalg.solve(gram + reg * torch.eye(len(gram), dtype=gram.dtype), z1.T @ t / n_out)
    history = conjugate_gradient(model, TrainConfig(reg=reg, kappa=KAPPA), prepared, iterations=100,
                                 tol=1e-10, progress=False)
    # As above: relative error ≤ cond·tol = 1e-7, 10× for rounding; the Gram matrix has ≤ 33 + 1 eigenvalues.
    assert history[-1]["grad_norm"] <= 1e-10 and len(history) - 1 < 60
    head = model.tail.head
    solved = torch.cat([head.weight.detach() - weight0, (head.bias.detach() - bias0)[:, None]], 1).T
    assert torch.linalg.norm(solved - x_star) <= 1e-6 * torch.linalg.norm(x_star)


def test_cg_reports_validation_accuracy_and_stops_at_the_tolerance(backbone):
    features, labels = data(16, seed=3)
    model = classifier(backbone)
    train = Prepared(model, Examples((features[:12], labels[:12])))
    val = Prepared(model, Examples((features[12:], labels[12:])))
    history = conjugate_gradient(model, TrainConfig(reg=1e-2, kappa=KAPPA), train, val, iterations=500, tol=1e-3,
                                 progress=False)
    assert history[-1]["grad_norm"] <= 1e-3 < history[-2]["grad_norm"]  # stopped at the first iterate below tol
    assert all(r["val_top1"] is not None and 0 <= r["val_top1"] <= 1 for r in history)
    assert all(a["elapsed_s"] <= b["elapsed_s"] for a, b in zip(history, history[1:]))


def test_cg_refusals(backbone):
    features, labels = data(4)
    taft, nlft = classifier(backbone), classifier(backbone, "nlft")
    prepared = Prepared(taft, Examples((features, labels)))
    cases = [(nlft, TrainConfig(), {}, "nlft is not"),
             (taft, TrainConfig(loss="ce"), {}, "loss='ce'"),
             (taft, TrainConfig(), {"iterations": 0}, "iterations must be an integer ≥ 1, got 0"),
             (taft, TrainConfig(), {"iterations": True}, "iterations must be"),
             (taft, TrainConfig(), {"iterations": 2.5}, "iterations must be"),
             (taft, TrainConfig(), {"tol": -1.0}, "tol must be"),
             (taft, TrainConfig(), {"tol": float("nan")}, "tol must be")]
    for model, config, kw, message in cases:
        before = flat(model)
        with pytest.raises(TaftError, match=message.replace("(", r"\(")) as err:
            conjugate_gradient(model, config, prepared, progress=False, **kw)
        assert "\n" not in str(err.value)
        assert torch.equal(flat(model), before)  # refused before touching the parameters
