"""The parts a training run plugs into its loop: the optimizer, a sampler of index batches, a gradient step.

- `make_optimizer`: AdamW (no weight decay) or SGD with momentum, the head at its own rate.
- `PermutationSampler`: plain training's batches, one seeded permutation per epoch (`taft.privacy.PoissonSampler`
  is DP-SGD's).
- `AutogradStep`: plain training's step, the batch loss (+ λ‖θ − θ0‖²) backpropagated (`taft.privacy.DPStep`
  is DP-SGD's).

A step is any callable `(inputs, labels, mask) → (sum of the batch's example losses, examples)` that updates the
trainable tensors, with an attribute `private` (a private step's losses stay out of the progress bar); a sampler
has `steps_per_epoch` and `epoch() → [index batch, ...]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from taft.errors import NonFiniteError, TaftError
from taft.losses import classification_loss, proximity
from taft.model import Classifier
from taft.precision import autocast as autocast_context
from taft.precision import grad_scaler
from taft.tails import key_bias_rows
from taft.train.config import TrainConfig


class GradientStep(Protocol):
    private: bool

    def __call__(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, int]: ...


class Sampler(Protocol):
    steps_per_epoch: int

    def epoch(self) -> list[torch.Tensor]: ...


def require_resolved(config: TrainConfig, where: str) -> None:
    """Raise `TaftError` unless the recipe of `config` is filled in (lr, optimizer, warmup, epochs:
    `config.resolved`)."""
    missing = [name for name in ("lr", "optimizer", "warmup", "epochs") if getattr(config, name) is None]
    if missing:
        raise TaftError(f"{where} needs a resolved training config ({', '.join(missing)} unset): use "
                        f"config.resolved(method, text=..., private=...), which fills in the default recipe")


def make_optimizer(config: TrainConfig, params: dict[str, nn.Parameter]) -> torch.optim.Optimizer:
    """`config.optimizer` ("adamw" without weight decay, or "sgd" with `config.momentum`) over `params`, in two
    groups: the head's tensors (names starting "head.") at `config.head_learning_rate`, the rest at
    `config.learning_rate` (a probe's only group is its head, at `learning_rate`). `config` must be resolved
    (`TrainConfig.resolved`), so that a user's loop gets the same recipe as `fit`."""
    require_resolved(config, "make_optimizer")
    head = [p for n, p in params.items() if n.startswith("head.")]
    body = [p for n, p in params.items() if not n.startswith("head.")]
    head_rate = config.head_learning_rate if body else config.learning_rate
    groups = [g for g in ({"params": body, "lr": config.learning_rate}, {"params": head, "lr": head_rate})
              if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=0.0)


def rank_part(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s part of a global index batch shared by `world` ranks: its contiguous slice, the slices' sizes
    differing by at most one (earlier ranks take the extra examples; a rank may get none of a short last batch)."""
    return batch.tensor_split(world)[rank]


class PermutationSampler:
    """Plain training's batches: a permutation of range(n) per epoch from a generator seeded `seed`, cut into
    batches of `batch_size` (the last one shorter). With `part=(rank, world)` (data-parallel training), each batch
    is rank `rank`'s part of that global batch (`rank_part`): every rank draws the same order."""

    def __init__(self, n: int, batch_size: int, seed: int, part: tuple[int, int] = (0, 1)):
        self.n, self.batch_size, self.part = n, batch_size, part
        self.steps_per_epoch = math.ceil(n / batch_size)
        self.generator = torch.Generator().manual_seed(seed)

    def epoch(self) -> list[torch.Tensor]:
        batches = torch.randperm(self.n, generator=self.generator).split(self.batch_size)
        return [rank_part(b, *self.part) for b in batches]


class AutogradStep:
    """Plain training's step: loss = classification loss of `forward(x, mask)` (+ λ‖θ − θ0‖² for `config.reg`),
    backpropagated, then `optimizer.step()`; the forward runs under `autocast` (fp16: the loss is scaled and steps
    that overflow are skipped). `forward`: `classifier.train_logits` or its compiled form (`CompiledStep`)."""

    private = False

    def __init__(self, classifier: Classifier, optimizer: torch.optim.Optimizer, config: TrainConfig, *,
                 forward: Callable[..., torch.Tensor] | None = None, autocast: str = "none"):
        self.optimizer, self.config, self.autocast = optimizer, config, autocast
        self.forward = forward or classifier.train_logits
        self.device, self.dtype = classifier.device, classifier.dtype
        self.scaler = grad_scaler(autocast, classifier.device)
        self.params = dict(classifier.tail.named_parameters())
        self.start = {n: p.detach().clone() for n, p in self.params.items()} if config.reg > 0 else {}
        self.null_rows = key_bias_rows(classifier.tail)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, int]:
        loss = self.loss(x, y, mask)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteError("the batch loss", value)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        self.update()
        return value * len(y), len(y)

    def loss(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The batch's mean loss (+ λ‖θ − θ0‖²), its forward under `autocast`."""
        cfg = self.config
        with autocast_context(self.autocast, self.device):
            logits = self.forward(x, mask)
        loss = classification_loss(logits.to(self.dtype), y, cfg.loss, cfg.kappa)
        return loss + cfg.reg * proximity(self.params, self.start) if cfg.reg > 0 else loss

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of `loss` (fp16: of the scaled loss, so small gradients do not underflow)."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def update(self) -> None:
        """The optimizer's step on the accumulated gradients (fp16: unscaled; a step that overflows is skipped),
        the attention key biases' gradients zeroed first (they are rounding noise: `taft.tails.key_bias_rows`)."""
        for name, rows in self.null_rows.items():
            grad = self.params[name].grad
            if grad is not None:
                grad[rows] = 0
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
