"""Training losses: the rescaled squared loss (default) and cross-entropy; both convex in the logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from taft.errors import TaftError

DEFAULT_KAPPA = 15.0  # κ: the squared loss's target scale, κ·onehot(y)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str = "mse", kappa: float = DEFAULT_KAPPA,
                        reduction: str = "mean") -> torch.Tensor:
    """Per-example loss reduced by `reduction` ("mean", "sum" or "none").

    "mse": mean over classes of (logits − κ·onehot(y))², so "mean" is the mean over batch and classes.
    "ce":  cross-entropy of softmax(logits).
    """
    if kind == "mse":
        target = F.one_hot(labels, logits.shape[-1]).to(logits.dtype).mul_(kappa)
        per_example = (logits - target).pow(2).mean(-1)
    elif kind == "ce":
        per_example = F.cross_entropy(logits, labels, reduction="none")
    else:
        raise TaftError(f"unknown loss {kind!r}; use mse or ce")
    if reduction == "none":
        return per_example
    return per_example.sum() if reduction == "sum" else per_example.mean()


def loss_targets(labels: torch.Tensor, num_classes: int, kind: str, kappa: float, dtype: torch.dtype) -> torch.Tensor:
    """The target rows of `example_loss`: one-hot (× κ for "mse"); made outside vmap (one_hot is data-dependent)."""
    onehot = F.one_hot(labels, num_classes).to(dtype)
    return onehot.mul_(kappa) if kind == "mse" else onehot


def example_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """`classification_loss` of each example (over the last dimension) from its `loss_targets` row: "mse"
    mean((z − κ e_y)²), "ce" −log softmax(z)_y. Written without data-dependent indexing, so it can be vmapped."""
    if kind == "mse":
        return (logits - target).pow(2).mean(-1)
    if kind == "ce":
        return -(logits.log_softmax(-1) * target).sum(-1)
    raise TaftError(f"unknown loss {kind!r}; use mse or ce")


def proximity(params: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> torch.Tensor:
    """‖θ − θ0‖² summed over all tensors (θ0 = `start`; for TAFT θ0 = 0, i.e. ‖Δw‖²)."""
    return sum((p - start[n]).pow(2).sum() for n, p in params.items())
