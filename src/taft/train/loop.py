"""The training loop, one for plain and private training: epochs of index batches from a sampler, each batch
handed to a pluggable gradient step, the learning-rate schedule stepped after it, validation and a record per
epoch.

- Plain training: `PermutationSampler` (one seeded permutation per epoch, cut into batches) and `AutogradStep`
  (the batch loss plus the proximity term λ‖θ − θ0‖², backpropagated; autocast, fp16 loss scaling and a compiled
  forward optional), with resumable state after every epoch.
- DP-SGD: `taft.privacy.PoissonSampler` and `taft.privacy.DPStep` (clipped per-example gradients plus noise);
  `dp_train_loop` wires them to a `DPPlan` and returns the ledger too.

A step is any callable `(inputs, mask, labels) → (sum of the batch's example losses, examples)` that updates the
trainable tensors, with an attribute `private` (a private step's losses stay out of the progress bar);
a sampler has `steps_per_epoch` and `epoch() → [index batch, ...]`. A loss, gradient or weight that is not finite
stops training with a one-line "training diverged" `DivergedError` (a `TaftError`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from taft.errors import DivergedError, NonFiniteError, TaftError
from taft.losses import classification_loss, proximity
from taft.model import Classifier
from taft.precision import autocast as autocast_context
from taft.precision import grad_scaler
from taft.privacy import DPPlan, DPStep, PoissonSampler, PrivacyLedger
from taft.privacy.dpsgd import dp_generators
from taft.progress import ProgressBar, progress_bar
from taft.train.config import TrainConfig
from taft.train.evaluation import evaluate_prepared
from taft.train.examples import Prepared


class GradientStep(Protocol):
    private: bool

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None, y: torch.Tensor) -> tuple[float, int]: ...


class Sampler(Protocol):
    steps_per_epoch: int

    def epoch(self) -> list[torch.Tensor]: ...


def lr_factor(schedule: str, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """Multiplier of the base learning rate at step s (0-based) of `total_steps`: (s + 1) / W during the first
    W = `warmup_steps` steps, then the schedule ("cosine" decays from 1 at step W to 0 at `total_steps`; "step"
    is ×0.1 from 50 % and ×0.01 from 75 % of `total_steps`; "constant" stays 1)."""
    w = min(warmup_steps, total_steps)

    def factor(s: int) -> float:
        if s < w:
            return (s + 1) / w
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * (s - w) / max(1, total_steps - w)))
        if schedule == "step":
            return 0.1 ** ((s >= 0.5 * total_steps) + (s >= 0.75 * total_steps))
        return 1.0

    return factor


def require_resolved(config: TrainConfig, where: str) -> None:
    """Raise `TaftError` unless the recipe of `config` is filled in (lr, optimizer, warmup, epochs:
    `config.resolved`)."""
    missing = [name for name in ("lr", "optimizer", "warmup", "epochs") if getattr(config, name) is None]
    if missing:
        raise TaftError(f"{where} needs a resolved training config ({', '.join(missing)} unset): use "
                        f"config.resolved(text=..., private=...), which fills in the default recipe")


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    """W, the number of warm-up steps: `config.warmup` of `total_steps`, rounded (a resolved config)."""
    require_resolved(config, "warmup_steps")
    return round(config.warmup * total_steps)


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


def diverged(config: TrainConfig, value: float, where: str) -> DivergedError:
    """The one-line error for a non-finite loss, gradient or weight at `where`, suggesting a lower rate."""
    lr = config.learning_rate
    return DivergedError(f"training diverged: {where} is {value} (method {config.method}, lr {lr:g}); "
                     f"use a lower learning rate, e.g. lr={lr / 10:g}")


class PermutationSampler:
    """Plain training's batches: a permutation of range(n) per epoch from a generator seeded `seed`, cut into
    batches of `batch_size` (the last one shorter)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.steps_per_epoch = math.ceil(n / batch_size)
        self.generator = torch.Generator().manual_seed(seed)

    def epoch(self) -> list[torch.Tensor]:
        return list(torch.randperm(self.n, generator=self.generator).split(self.batch_size))


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

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None, y: torch.Tensor) -> tuple[float, int]:
        cfg = self.config
        with autocast_context(self.autocast, self.device):
            logits = self.forward(x, mask)
        loss = classification_loss(logits.to(self.dtype), y, cfg.loss, cfg.kappa)
        if cfg.reg > 0:
            loss = loss + cfg.reg * proximity(self.params, self.start)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteError("the batch loss", value)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:  # fp16: scale the loss so small gradients do not underflow; skips steps that overflow
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return value * len(y), len(y)


def finish_epoch(classifier: Classifier, config: TrainConfig, val: Prepared | None, record: dict[str, Any],
                 t0: float, bar: ProgressBar, history: list[dict[str, Any]],
                 on_epoch: Callable[[dict[str, Any]], None] | None, **postfix: str) -> None:
    """The end of an epoch: validation (when `val` is given) and the wall time into `record`, the progress bar's
    postfix (epoch, `postfix`, val_top1), `record` onto `history` and to `on_epoch`."""
    if val is not None:
        classifier.eval()
        ev = evaluate_prepared(classifier, val, config.loss, config.kappa)
        record.update(val_top1=ev.top1, val_loss=ev.loss)
        postfix["val_top1"] = f"{record['val_top1']:.3f}"
    record["wall_time_s"] = time.perf_counter() - t0
    bar.set_postfix(epoch=record["epoch"], **postfix)
    history.append(record)
    if on_epoch is not None:
        on_epoch(record)


def restore(resume: dict[str, Any], params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LambdaLR, factor: Callable[[int], float],
            sampler: PermutationSampler) -> tuple[list[dict[str, Any]], int]:
    """Put the state `on_state` saved back into the run; (history so far, first epoch to train)."""
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(resume["params"][name])
    opt.load_state_dict(resume["optimizer"])
    sched.load_state_dict(resume["scheduler"])
    for group in opt.param_groups:  # the rate of this schedule (over the new total) at the step reached
        group["lr"] = group["initial_lr"] * factor(sched.last_epoch)
    sampler.generator.set_state(resume["generator"])
    return list(resume["history"]), int(resume["epoch"]) + 1


def train_loop(classifier: Classifier, config: TrainConfig, train: Prepared, val: Prepared | None = None, *,
               progress: bool = True, on_epoch: Callable[[dict[str, Any]], None] | None = None,
               desc: str | None = None, autocast: str = "none",
               forward: Callable[..., torch.Tensor] | None = None, resume: dict[str, Any] | None = None,
               on_state: Callable[[dict[str, Any]], None] | None = None,
               optimizer: torch.optim.Optimizer | None = None, step: GradientStep | None = None,
               sampler: Sampler | None = None) -> list[dict[str, Any]]:
    """Train `classifier`'s parameters in place for `config.epochs` epochs; returns the per-epoch records (also
    passed to `on_epoch`): epoch, train_loss (mean example loss of the epoch's batches), lr, train_time_s,
    examples_per_s, (private steps: mean_batch_size), val_top1, val_loss, wall_time_s.

    By default plain training: `make_optimizer(config, ...)`, `PermutationSampler(n, batch_size, seed)` and
    `AutogradStep` with `autocast` and `forward`. `optimizer`, `step` and `sampler` replace them (a given step
    must update through the given optimizer, whose rate the loop schedules over all the sampler's steps).
    After each epoch `on_state` gets the resumable state of plain training (epoch, trained parameters, optimizer,
    scheduler, data order generator, history); `resume=` such a state continues from it: the same steps as an
    uninterrupted run of `config.epochs` epochs whose schedule is defined over that total.
    Settings `config` leaves None come from the default recipe of ordinary training for `classifier`'s backbone
    kind (`TrainConfig.resolved`; `dp_train_loop` resolves DP-SGD's)."""
    config = config.resolved(text=classifier.is_text)
    params = dict(classifier.tail.named_parameters())
    opt = optimizer or make_optimizer(config, params)
    n = len(train)
    sampler = sampler or PermutationSampler(n, config.batch_size, config.seed)
    step = step or AutogradStep(classifier, opt, config, forward=forward, autocast=autocast)
    if (resume is not None or on_state is not None) and not isinstance(sampler, PermutationSampler):
        raise TaftError("resumable state is kept for plain training only")
    total = sampler.steps_per_epoch * config.epochs
    factor = lr_factor(config.schedule, total, warmup_steps(config, total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    device, dtype = classifier.device, classifier.dtype
    history: list[dict[str, Any]] = []
    first = 1
    if resume is not None:
        history, first = restore(resume, params, opt, sched, factor, sampler)
    bar = progress_bar(total=total, initial=sampler.steps_per_epoch * (first - 1), disable=not progress,
                       unit="step", desc=desc or f"{config.method} k={config.tangent_blocks}"
                       + (" DP-SGD" if step.private else ""))
    try:
        for epoch in range(first, config.epochs + 1):
            classifier.train()
            t0 = time.perf_counter()
            loss_sum, seen = 0.0, 0
            order = sampler.epoch()
            for i, (x, mask, y) in enumerate(train.batches(order, device, dtype)):
                try:
                    batch_loss, count = step(x, mask, y)
                except NonFiniteError as e:
                    raise diverged(config, e.value, f"{e.what} at epoch {epoch}, step {i + 1}") from None
                sched.step()
                loss_sum += batch_loss
                seen += count
                bar.update(1)
            train_time = time.perf_counter() - t0
            record: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / seen if seen else None,
                                      "lr": opt.param_groups[0]["lr"], "train_time_s": train_time,
                                      "examples_per_s": seen / train_time if train_time > 0 else None}
            if step.private:
                record["mean_batch_size"] = seen / sampler.steps_per_epoch
            record.update(val_top1=None, val_loss=None)
            shown = {} if step.private else {"loss": f"{record['train_loss']:.4g}"}
            finish_epoch(classifier, config, val, record, t0, bar, history, on_epoch, **shown)
            if on_state is not None:
                on_state({"epoch": epoch, "params": {k: p.detach().cpu() for k, p in params.items()},
                          "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "generator": sampler.generator.get_state(), "history": history})
    finally:
        bar.close()
        classifier.eval()
        if step.private:
            for p in params.values():
                p.grad = None
    bad = [name for name, p in params.items() if not torch.isfinite(p).all()]
    if bad:
        raise diverged(config, math.nan, f"a trained weight ({bad[0]})")
    return history


def dp_train_loop(classifier: Classifier, config: TrainConfig, plan: DPPlan, train: Prepared,
                  val: Prepared | None = None, *, progress: bool = True,
                  on_epoch: Callable[[dict[str, Any]], None] | None = None, desc: str | None = None,
                  batches: Sequence[torch.Tensor] | None = None) -> tuple[list[dict[str, Any]], PrivacyLedger]:
    """Train `classifier` in place with DP-SGD as `plan` says: `train_loop` with `DPStep` and `PoissonSampler`;
    returns (per-epoch records, privacy ledger). `train_loss` is the mean per-example loss of the examples
    sampled in the epoch, before their step (a diagnostic on private data, outside the guarantee). `batches`
    replaces Poisson sampling by a fixed schedule of index batches (one per planned step) for checks; the
    guarantee (and the ledger) assume Poisson sampling."""
    dp = plan.config
    config = config.resolved(text=classifier.is_text, private=True, epsilon=dp.epsilon)
    if len(train) != plan.n:
        raise TaftError(f"the DP plan is for {plan.n} training examples, the data has {len(train)}")
    if batches is not None and len(batches) != plan.steps:
        raise TaftError(f"a fixed batch schedule needs {plan.steps} batches, got {len(batches)}")
    opt = make_optimizer(config, dict(classifier.tail.named_parameters()))
    sample_gen, noise_gen = dp_generators(dp.seed, classifier.device)
    step = DPStep(classifier, opt, clip=dp.clip, noise_multiplier=plan.noise_multiplier,
                  expected_batch_size=plan.expected_batch_size, generator=noise_gen, loss=config.loss,
                  kappa=config.kappa, chunk_size=dp.chunk_size, reg=config.reg)
    sampler = PoissonSampler(plan.n, plan.sample_rate, plan.steps_per_epoch, sample_gen, batches)
    history = train_loop(classifier, config, train, val, progress=progress, on_epoch=on_epoch, desc=desc,
                         optimizer=opt, step=step, sampler=sampler)
    return history, plan.ledger()
