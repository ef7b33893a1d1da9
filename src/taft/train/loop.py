"""The training loop, one for plain and private training: epochs of index batches from the run plan's sampler,
each batch handed to its gradient step (`taft.train.plan.RunPlan.start`), the learning-rate schedule stepped after
it, validation and a record per epoch, and for plain training a resumable state after every epoch. A loss,
gradient or weight that is not finite stops training with a one-line "training diverged" `DivergedError`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from taft.errors import DivergedError, NonFiniteError, TaftError
from taft.model import Classifier
from taft.progress import ProgressBar, progress_bar
from taft.train.config import TrainConfig
from taft.train.distributed import Group
from taft.train.evaluation import evaluate_prepared
from taft.train.examples import Prepared
from taft.train.plan import RunPlan
from taft.train.steps import PermutationSampler, Sampler, make_optimizer, require_resolved


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


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    """W, the number of warm-up steps: `config.warmup` of `total_steps`, rounded (a resolved config)."""
    require_resolved(config, "warmup_steps")
    return round(config.warmup * total_steps)


def diverged(method: str, config: TrainConfig, value: float, where: str) -> DivergedError:
    """The one-line error for a non-finite loss, gradient or weight at `where`, suggesting a lower rate."""
    lr = config.learning_rate
    return DivergedError(f"training diverged: {where} is {value} (method {method}, lr {lr:g}); "
                         f"use a lower learning rate, e.g. lr={lr / 10:g}")


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
            sampler: Sampler) -> tuple[list[dict[str, Any]], int]:
    """Put the state `on_state` saved back into the run; (history so far, first epoch to train)."""
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(resume["params"][name])
    opt.load_state_dict(resume["optimizer"])
    sched.load_state_dict(resume["scheduler"])
    for group in opt.param_groups:  # the rate of this schedule (over the new total) at the step reached
        group["lr"] = group["initial_lr"] * factor(sched.last_epoch)
    if not isinstance(sampler, PermutationSampler):
        raise TaftError("resumable state is kept for plain training only")
    sampler.generator.set_state(resume["generator"])
    return list(resume["history"]), int(resume["epoch"]) + 1


def train_loop(classifier: Classifier, plan: RunPlan, train: Prepared, val: Prepared | None = None, *,
               progress: bool = True, on_epoch: Callable[[dict[str, Any]], None] | None = None,
               desc: str | None = None, autocast: str = "none", forward: Callable[..., torch.Tensor] | None = None,
               resume: dict[str, Any] | None = None, on_state: Callable[[dict[str, Any]], None] | None = None,
               batches: Sequence[torch.Tensor] | None = None, group: Group | None = None) -> list[dict[str, Any]]:
    """Train `classifier`'s parameters in place as `plan` says (`taft.train.plan`: plain or DP-SGD); returns the
    per-epoch records (also passed to `on_epoch`): epoch, train_loss (mean example loss of the epoch's batches;
    DP-SGD: of the examples sampled, before their step, outside the guarantee), lr, train_time_s, examples_per_s,
    (DP-SGD: mean_batch_size), val_top1, val_loss, wall_time_s.

    The optimizer is `make_optimizer(plan.config, ...)`, its rate scheduled over all the plan's steps. Plain
    training: `autocast` and `forward` (e.g. a compiled `train_logits`) apply; after each epoch `on_state` gets the
    resumable state (epoch, trained parameters, optimizer, scheduler, data order generator, history), and
    `resume=` such a state continues from it: the same steps as an uninterrupted run of `plan.config.epochs`
    epochs whose schedule is defined over that total. DP-SGD: `batches` replaces Poisson sampling by a fixed
    schedule (checks only; the guarantee assumes Poisson sampling). `group`: train data-parallel under torchrun,
    each rank on its part of every global batch (`taft.train.distributed`); the records are the global batches'."""
    config = plan.config
    if len(train) != plan.n:
        raise TaftError(f"the run is planned for {plan.n} training examples, the data has {len(train)}")
    params = dict(classifier.tail.named_parameters())
    opt = make_optimizer(config, params)
    sampler, step = plan.start(classifier, opt, forward=forward, autocast=autocast, batches=batches, group=group)
    if (resume is not None or on_state is not None) and step.private:
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
                       unit="step", desc=desc or f"{classifier.method} k={classifier.tangent_blocks}"
                       + (" DP-SGD" if step.private else ""))
    try:
        for epoch in range(first, config.epochs + 1):
            classifier.train()
            t0 = time.perf_counter()
            loss_sum, seen = 0.0, 0
            order = sampler.epoch()
            for i, (x, y, mask) in enumerate(train.batches(order, device, dtype, epoch)):
                try:
                    batch_loss, count = step(x, y, mask)
                except NonFiniteError as e:
                    raise diverged(classifier.method, config, e.value,
                                   f"{e.what} at epoch {epoch}, step {i + 1}") from None
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
        raise diverged(classifier.method, config, math.nan, f"a trained weight ({bad[0]})")
    return history
