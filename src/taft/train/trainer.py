"""Training and evaluation on cached trunk features, the same loop for all three methods.

`fit` trains with AdamW (weight_decay = 0) on batches in a seeded order (one `torch.Generator` permutation per
epoch), stops with a `TaftError` as soon as a batch loss is not finite, and writes to `run_dir`:

    config.json     the resolved `TrainConfig` (written first)
    metrics.jsonl   one line per epoch: epoch, train_loss, lr, train_time_s, wall_time_s, examples_per_s,
                    val_top1, val_loss (null without validation data)
    metrics.json    at the end: top-1, per-class accuracy and loss on the validation data (or on the training
                    data without it), timings, epochs
    checkpoint.safetensors   what was trained plus metadata (`taft.checkpoint`)
    resume_state.pt          after every epoch: what `fit(..., resume=True)` continues from (not with DP)
    training_curve.png       training loss and validation top-1 per epoch (only with matplotlib installed)

For a probe, the frozen network's pooled features are computed once from the trunk features (no gradient) and
the head is trained on them.

metrics.json also records, as information, how the run computed: `compute` = {device, autocast, compiled, feed
(per split: resident / stream / host, `taft.train.feeding`), threads}; none of it changes what is saved.

With `dp=DPConfig(...)`, `fit` trains with DP-SGD instead (`taft.privacy.dpsgd`: Poisson-sampled batches,
clipped per-example gradients, Gaussian noise), stores the privacy ledger in the checkpoint's metadata (`privacy`)
and in metrics.json, and keeps training-data statistics out of the checkpoint's metrics. Validation data must be
disjoint from the private training data.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from torch import nn

from taft.backbones.base import Backbone
from taft.data.feature_cache import CachedFeatures
from taft.devices import resolve_device
from taft.errors import TaftError
from taft.fileio import atomic_write
from taft.precision import autocast as autocast_context
from taft.precision import check_autocast, grad_scaler
from taft.progress import ProgressBar, progress_bar
from taft.train.classifier import Classifier, build_classifier, feature_key
from taft.train.compiled import CompiledStep
from taft.train.config import TrainConfig
from taft.train.curves import CURVE_NAME, plot_training_curve
from taft.train.feeding import FEEDS, Batch, choose_feed, streamed
from taft.train.losses import classification_loss, proximity

if TYPE_CHECKING:
    from taft.privacy.config import DPConfig, DPPlan

FeatureData = Union[CachedFeatures, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, Sequence[str]]]
EVAL_BATCH = 256
CHECKPOINT_NAME = "checkpoint.safetensors"


class Examples:
    """Features (in memory, or the feature cache's memmap), labels, and when known ids and class names. Text
    features also have `lengths` (real tokens per example; the rest of a row is padding)."""

    def __init__(self, data: FeatureData, what: str = "data"):
        self.what = what
        self.key: dict | None = None
        self.lengths: torch.Tensor | None = None
        self.feed = "host"  # see `place`
        if isinstance(data, CachedFeatures):
            self.x: torch.Tensor | np.ndarray = data.features  # read rows on demand; no full copy of a memmap
            self.labels = torch.tensor(data.labels, dtype=torch.int64)
            if data.lengths is not None:
                self.lengths = torch.tensor(data.lengths, dtype=torch.int64)
            self.ids: list[str] | None = list(data.ids)
            self.class_names: list[str] | None = list(data.class_names)
            key = data.meta.get("key", {})
            self.key = key.get("key") if isinstance(key, dict) else None
        elif isinstance(data, (tuple, list)) and len(data) in (2, 3):
            self.x = torch.as_tensor(data[0])
            self.labels = torch.as_tensor(data[1]).to(torch.int64).reshape(-1)
            self.ids = [str(i) for i in data[2]] if len(data) == 3 and data[2] is not None else None
            self.class_names = None
        else:
            raise TaftError(f"{what} must be CachedFeatures or a tuple (features, labels[, ids]), "
                            f"got {type(data).__name__}")
        n = self.x.shape[0]
        if n == 0:
            raise TaftError(f"{what} is empty")
        if len(self.labels) != n:
            raise TaftError(f"{what}: {n} feature rows but {len(self.labels)} labels")
        if self.ids is not None and len(self.ids) != n:
            raise TaftError(f"{what}: {n} feature rows but {len(self.ids)} ids")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features of rows `idx`, their mask (b, N) or None). Text rows are cut to the longest real length in
        the batch (dynamic padding), the mask marks each row's real tokens."""
        width = None
        if self.lengths is not None:
            lengths = self.lengths[idx]
            width = max(1, int(lengths.max())) if len(idx) else 1
        cols = slice(None) if width is None else slice(0, width)
        if isinstance(self.x, np.ndarray):
            x = torch.from_numpy(np.asarray(self.x[idx.numpy(), cols], dtype=np.float32))
        else:
            x = self.x[idx, cols]
        mask = None if width is None else torch.arange(width) < lengths[:, None]
        return x, mask

    def batch(self, idx: torch.Tensor, device: torch.device,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(features, mask, labels) of rows `idx` on `device` (features in `dtype`)."""
        x, mask = self.rows(idx)
        mask = None if mask is None else mask.to(device, non_blocking=True)
        return x.to(device, dtype, non_blocking=True), mask, self.labels[idx].to(device, non_blocking=True)

    @property
    def nbytes(self) -> int:
        """Bytes of the feature array as stored (memmap or tensor)."""
        x = self.x
        return int(x.nbytes) if isinstance(x, np.ndarray) else x.element_size() * x.numel()

    def place(self, device: torch.device, feed: str = "auto") -> str:
        """Choose how batches reach `device` (`taft.train.feeding`); "resident" copies the features there now.
        Features already on `device` (a probe's pooled features) stay resident. Returns the feed chosen."""
        self.feed = choose_feed(feed, device, self.nbytes)
        if isinstance(self.x, torch.Tensor) and self.x.device == device:
            self.feed = "resident"  # nothing to move
        if self.feed == "resident":
            x = self.x if isinstance(self.x, torch.Tensor) else torch.from_numpy(np.array(self.x))
            self.x = x.to(device)
        return self.feed

    def batches(self, order: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype) -> Iterator[Batch]:
        """`batch(idx, ...)` for each index batch of `order`, streamed ahead when the feed is "stream"."""
        if self.feed == "stream":
            yield from streamed(lambda idx: (*self.rows(idx), self.labels[idx]), order, device, dtype)
            return
        for idx in order:
            yield self.batch(idx, device, dtype)

    def check_labels(self, class_names: Sequence[str]) -> None:
        lo, hi = int(self.labels.min()), int(self.labels.max())
        if lo < 0 or hi >= len(class_names):
            raise TaftError(f"{self.what}: labels must be in [0, {len(class_names)}), found {lo}..{hi}")
        if self.class_names is not None and list(self.class_names) != list(class_names):
            raise TaftError(f"{self.what}: class names {self.class_names[:10]} differ from "
                            f"{list(class_names)[:10]}")

    def check(self, backbone: Backbone, tangent_blocks: int, class_names: Sequence[str]) -> None:
        """Names any mismatch with the run: feature width, labels, class names, trunk (from the cache key)."""
        if len(self.feature_shape) != 2:
            raise TaftError(f"{self.what}: expected trunk features (n, tokens, dim), got shape "
                            f"{tuple(self.x.shape)}")
        dim = backbone.model.cfg.dim
        if self.feature_shape[-1] != dim:
            raise TaftError(f"{self.what}: features have width {self.feature_shape[-1]}, backbone "
                            f"{backbone.name} has width {dim}")
        self.check_labels(class_names)
        if self.key is not None and {"backbone", "trunk_blocks"} <= set(self.key):
            want = feature_key(backbone, tangent_blocks)
            if self.key["backbone"] != want["backbone"]:
                raise TaftError(f"{self.what}: the cached features were computed with another backbone "
                                f"(fingerprint {str(self.key['backbone'])[:12]}…) than {backbone.name} "
                                f"({want['backbone'][:12]}…); cache them with this backbone")
            if self.key["trunk_blocks"] != want["trunk_blocks"]:
                have_k = backbone.model.cfg.depth - int(self.key["trunk_blocks"])
                raise TaftError(f"{self.what}: the cached features are for k={have_k} tangent blocks (trunk of "
                                f"{self.key['trunk_blocks']} blocks), this run uses k={tangent_blocks}; "
                                f"cache them with tangent_blocks={tangent_blocks}")


class Prepared(Examples):
    """What the trainer feeds `Classifier.train_logits`: for a probe, the frozen pooled features (computed once);
    for taft and nlft the trunk features themselves."""

    def __init__(self, classifier: Classifier, examples: Examples, batch_size: int = EVAL_BATCH):
        self.__dict__.update(examples.__dict__)
        if classifier.method == "probe":
            self.x = torch.cat([classifier.train_inputs(*examples.rows(idx))
                                for idx in torch.arange(len(examples)).split(batch_size)])
            self.lengths = None  # pooled features (n, D) have no tokens left to mask


@dataclass
class Evaluation:
    """top1: fraction correct; per_class[c]: accuracy on class c (None when it has no examples); loss: mean
    training loss (without the regularizer)."""

    top1: float
    loss: float
    per_class: list[float | None]
    counts: list[int]
    class_names: list[str]

    @property
    def n(self) -> int:
        return sum(self.counts)

    def to_dict(self) -> dict[str, Any]:
        return {"top1": self.top1, "loss": self.loss, "n": self.n,
                "per_class_accuracy": dict(zip(self.class_names, self.per_class)),
                "per_class_count": dict(zip(self.class_names, self.counts))}


@dataclass
class FitResult:
    """The trained classifier, the resolved config, per-epoch records, final metrics (as in metrics.json), the
    training ids (None when not given), with a run_dir where the run and its checkpoint were written, and for a
    private run its privacy ledger (`PrivacyLedger.to_dict()`)."""

    classifier: Classifier
    config: TrainConfig
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    train_ids: list[str] | None
    run_dir: Path | None = None
    checkpoint: Path | None = None
    privacy: dict[str, Any] | None = None


@torch.no_grad()
def _evaluate(classifier: Classifier, data: Prepared, loss: str, kappa: float,
              batch_size: int = EVAL_BATCH) -> Evaluation:
    n_cls = classifier.num_classes
    correct = torch.zeros(n_cls, dtype=torch.int64)
    counts = torch.zeros(n_cls, dtype=torch.int64)
    total_loss = 0.0
    order = torch.arange(len(data)).split(batch_size)
    for idx, (x, mask, _) in zip(order, data.batches(order, classifier.device, classifier.dtype)):
        logits = classifier.train_logits(x, mask)
        y = data.labels[idx]
        total_loss += float(classification_loss(logits, y.to(logits.device), loss, kappa, reduction="sum"))
        hit = logits.argmax(-1).cpu() == y
        counts += torch.bincount(y, minlength=n_cls)
        correct += torch.bincount(y[hit], minlength=n_cls)
    per_class = [float(c) / float(m) if m else None for c, m in zip(correct.tolist(), counts.tolist())]
    n = int(counts.sum())
    return Evaluation(top1=float(correct.sum()) / n, loss=total_loss / n, per_class=per_class,
                      counts=counts.tolist(), class_names=list(classifier.class_names))


def evaluate(classifier: Classifier, data: FeatureData, *, batch_size: int = EVAL_BATCH, loss: str | None = None,
             kappa: float | None = None, feed: str = "auto") -> Evaluation:
    """Top-1, per-class accuracy and loss of `classifier` (on its device) on cached trunk features `data`
    (CachedFeatures or (features, labels[, ids])). The loss defaults to the classifier's training loss and κ.
    `feed`: how the features reach the device (`taft.train.feeding`)."""
    cfg = classifier.train_config
    examples = Examples(data, "evaluation data")
    examples.check_labels(classifier.class_names)
    classifier.eval()
    prepared = Prepared(classifier, examples, batch_size)
    prepared.place(classifier.device, feed)
    return _evaluate(classifier, prepared, loss or cfg.loss, cfg.kappa if kappa is None else kappa, batch_size)


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
    """W, the number of warm-up steps: `config.warmup` of `total_steps`, rounded."""
    return round(config.warmup * total_steps)


def make_optimizer(config: TrainConfig, params: dict[str, nn.Parameter]) -> torch.optim.Optimizer:
    """`config.optimizer` ("adamw" without weight decay, or "sgd" with `config.momentum`) over `params`, in two
    groups: the head's tensors (names starting "head.") at `config.head_learning_rate`, the rest at
    `config.learning_rate` (a probe's only group is its head, at `learning_rate`)."""
    head = [p for n, p in params.items() if n.startswith("head.")]
    body = [p for n, p in params.items() if not n.startswith("head.")]
    groups = ([{"params": body, "lr": config.learning_rate}, {"params": head, "lr": config.head_learning_rate}]
              if body else [{"params": head, "lr": config.learning_rate}])
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=0.0)


def _diverged(config: TrainConfig, value: float, where: str) -> TaftError:
    lr = config.learning_rate
    return TaftError(f"training diverged: {where} is {value} (method {config.method}, lr {lr:g}); "
                     f"use a lower learning rate, e.g. lr={lr / 10:g}")


def _finish_epoch(classifier: Classifier, config: TrainConfig, val: Prepared | None, record: dict[str, Any],
                  t0: float, bar: ProgressBar, history: list[dict[str, Any]],
                  on_epoch: Callable[[dict[str, Any]], None] | None, **postfix: str) -> None:
    """The end of an epoch of `train_loop` and `dp_train_loop`: validation (when `val` is given) and the wall
    time into `record`, the progress bar's postfix (epoch, `postfix`, val_top1), `record` onto `history` and to
    `on_epoch`."""
    if val is not None:
        classifier.eval()
        ev = _evaluate(classifier, val, config.loss, config.kappa)
        record.update(val_top1=ev.top1, val_loss=ev.loss)
        postfix["val_top1"] = f"{record['val_top1']:.3f}"
    record["wall_time_s"] = time.perf_counter() - t0
    bar.set_postfix(epoch=record["epoch"], **postfix)
    history.append(record)
    if on_epoch is not None:
        on_epoch(record)


def train_loop(classifier: Classifier, config: TrainConfig, train: Prepared, val: Prepared | None = None, *,
               progress: bool = True, on_epoch: Callable[[dict[str, Any]], None] | None = None,
               desc: str | None = None, autocast: str = "none",
               forward: Callable[..., torch.Tensor] | None = None, resume: dict[str, Any] | None = None,
               on_state: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train `classifier`'s parameters in place; returns the per-epoch records (also passed to `on_epoch`).

    `autocast`: the forward runs under it (`taft.precision`; the loss, Δw, gradients and AdamW state stay float32).
    `forward`: `classifier.train_logits` (the default, eager) or the same function compiled (`CompiledStep`).
    After each epoch `on_state` gets the resumable state (epoch, trained parameters, optimizer, scheduler, data
    order generator, history); `resume=` such a state continues from it: the same steps as an uninterrupted run
    of `config.epochs` epochs whose schedule is defined over that total."""
    forward = forward or classifier.train_logits
    scaler = grad_scaler(autocast, classifier.device)
    params = dict(classifier.tail.named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()} if config.reg > 0 else {}
    opt = make_optimizer(config, params)
    n = len(train)
    steps_per_epoch = math.ceil(n / config.batch_size)
    total = steps_per_epoch * config.epochs
    factor = lr_factor(config.schedule, total, warmup_steps(config, total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(config.seed)
    device, dtype = classifier.device, classifier.dtype
    history: list[dict[str, Any]] = []
    first = 1
    if resume is not None:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(resume["params"][name])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        for group in opt.param_groups:  # the rate of this schedule (over the new total) at the step reached
            group["lr"] = group["initial_lr"] * factor(sched.last_epoch)
        gen.set_state(resume["generator"])
        history, first = list(resume["history"]), int(resume["epoch"]) + 1
    bar = progress_bar(total=total, initial=steps_per_epoch * (first - 1), disable=not progress, unit="step",
                       desc=desc or f"{config.method} k={config.tangent_blocks}")
    try:
        for epoch in range(first, config.epochs + 1):
            classifier.train()
            t0 = time.perf_counter()
            loss_sum = 0.0
            order = torch.randperm(n, generator=gen).split(config.batch_size)
            for step, (idx, (x, mask, y)) in enumerate(zip(order, train.batches(order, device, dtype))):
                with autocast_context(autocast, device):
                    logits = forward(x, mask)
                loss = classification_loss(logits.to(dtype), y, config.loss, config.kappa)
                if config.reg > 0:
                    loss = loss + config.reg * proximity(params, start)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise _diverged(config, value, f"the batch loss at epoch {epoch}, step {step + 1}")
                opt.zero_grad(set_to_none=True)
                if scaler is None:
                    loss.backward()
                    opt.step()
                else:  # fp16: scale the loss so small gradients do not underflow; skips steps that overflow
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                sched.step()
                loss_sum += value * len(idx)
                bar.update(1)
            train_time = time.perf_counter() - t0
            record: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / n,
                                      "lr": opt.param_groups[0]["lr"], "train_time_s": train_time,
                                      "examples_per_s": n / train_time if train_time > 0 else None,
                                      "val_top1": None, "val_loss": None}
            _finish_epoch(classifier, config, val, record, t0, bar, history, on_epoch,
                          loss=f"{record['train_loss']:.4g}")
            if on_state is not None:
                on_state({"epoch": epoch, "params": {k: p.detach().cpu() for k, p in params.items()},
                          "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "generator": gen.get_state(), "history": history})
    finally:
        bar.close()
        classifier.eval()
    bad = [name for name, p in params.items() if not torch.isfinite(p).all()]
    if bad:
        raise _diverged(config, math.nan, f"a trained weight ({bad[0]})")
    return history


def _class_names(given: Sequence[str] | None, train: Examples) -> list[str]:
    if given is not None:
        return [str(c) for c in given]
    if train.class_names is None:
        raise TaftError("class_names are required when the training data is a tensor tuple")
    return list(train.class_names)


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1, allow_nan=False)))


FEW_STEPS = 100
RESUME_NAME = "resume_state.pt"


def _ids_key(examples: Examples) -> str | None:
    return None if examples.ids is None else hashlib.sha256(json.dumps(examples.ids).encode()).hexdigest()


def _resume_state(out: Path | None, config: TrainConfig, train: Examples, dp: DPConfig | None) -> dict[str, Any]:
    """The resumable state saved in run directory `out`, checked against this run (TaftError naming a mismatch)."""
    if out is None:
        raise TaftError("resuming needs the run directory (run_dir) of the run to continue")
    if dp is not None:
        raise TaftError("resuming DP-SGD training is not supported (the privacy accounting covers one run)")
    path = out / RESUME_NAME
    if not path.is_file():
        raise TaftError(f"{out} has no {RESUME_NAME} to resume from (not a run directory, or a DP-SGD run)")
    try:
        state = torch.load(path, weights_only=True)
        saved = TrainConfig.from_dict(state["config"])
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError) as e:
        raise TaftError(f"{path} is unreadable or corrupt ({type(e).__name__}); rerun without resuming") from e
    if replace(saved, epochs=config.epochs) != config:
        differ = sorted(k for k, v in config.to_dict().items() if k != "epochs" and saved.to_dict()[k] != v)
        raise TaftError(f"cannot resume {out}: its settings differ in {differ}; only the epochs may change")
    if state["epoch"] > config.epochs:
        raise TaftError(f"{out} has already trained {state['epoch']} epochs; ask for more than that to continue")
    if state["train_ids"] != _ids_key(train):
        raise TaftError(f"cannot resume {out}: the training data (its example ids) differs from the run's")
    return state


def _warn_if_few_steps(config: TrainConfig, n: int, plan: DPPlan | None) -> None:
    """Warn when the run has fewer than FEW_STEPS optimizer steps: too few for the defaults to train reliably."""
    batch = plan.expected_batch_size if plan is not None else config.batch_size
    per_epoch = math.ceil(n / batch)
    steps = config.epochs * per_epoch
    if steps < FEW_STEPS:
        more = "more epochs (--epochs)" + (" or a smaller --expected-batch-size" if plan is not None
                                           else " or a smaller batch (--batch-size)")
        warnings.warn(f"only {steps} optimizer steps ({config.epochs} epochs of ~{per_epoch} batches of {batch} on "
                      f"{n} examples): likely too few to train; use {more}", stacklevel=3)


def _warn_if_at_chance(top1: float, labels: torch.Tensor) -> None:
    """Warn when validation top-1 is at or below chance: the rate of always predicting the most frequent class."""
    chance = float(torch.bincount(labels).max()) / len(labels)
    if top1 <= chance:
        warnings.warn(f"validation top-1 {100 * top1:.1f}% is at or below chance ({100 * chance:.1f}%, always "
                      "predicting the most frequent class): the model has not learned; check the learning rate, "
                      "the number of steps and the labels", stacklevel=3)


def fit(config: TrainConfig, backbone: Backbone, train: FeatureData, *, val: FeatureData | None = None,
        class_names: Sequence[str] | None = None, run_dir: str | Path | None = None,
        device: torch.device | str | None = None, progress: bool = True, dp: DPConfig | None = None,
        resume: bool = False, autocast: str = "none", compile: bool = False, feed: str = "auto") -> FitResult:
    """Train `config.method` on cached trunk features of (backbone, config.tangent_blocks) (see
    `cache_features`). `train`/`val`: CachedFeatures or (features (n, N, D), labels (n,)[, ids]); class names
    come from the CachedFeatures unless given. Text needs CachedFeatures: they carry each example's token count
    (the padding mask); a tensor tuple is read as unpadded. With `run_dir`, writes config.json, metrics.jsonl, metrics.json
    and checkpoint.safetensors there (see the module doc). Deterministic for a given config and data.

    `dp`: train with DP-SGD (see `taft.privacy`); σ is calibrated (or ε computed) before anything is written, and
    `head_init="probe"` is refused (the probe would be fitted on the private data without noise).

    `resume`: continue the run in `run_dir` from its last finished epoch (resume_state.pt, written after every
    epoch) up to `config.epochs`, on the same data with the same settings otherwise. The schedule is defined over
    the final total: continuing an interrupted run, or any run with the constant schedule, gives exactly the
    uninterrupted run's result; extending a finished cosine/step run continues on the longer schedule from the
    step reached (not the same as having planned that many epochs from the start). Not with `dp`.

    How it computes, never what is saved (checkpoints hold float32 CPU tensors; metrics.json records these as
    information): `device` ("auto", "cpu", "cuda[:N]", "mps"; default the backbone's), `autocast` ("none", "bf16",
    "fp16": the training forward's precision, `taft.precision`; not with `dp`), `compile` (`torch.compile` the
    training forward, eager fallback: `taft.train.compiled`; not with `dp`), `feed` (how cached features reach the
    device: "auto", "resident", "stream", "host", `taft.train.feeding`)."""
    t_start = time.perf_counter()
    where = resolve_device(device) if device is not None else backbone.device
    check_autocast(autocast, where)
    if feed not in FEEDS:
        raise TaftError(f"feed must be one of {', '.join(FEEDS)}, got {feed!r}")
    if dp is not None and (autocast != "none" or compile):
        raise TaftError("DP-SGD trains in float32 and eagerly (per-example gradients by torch.func): autocast and "
                        "compile are not supported with dp")
    tr = Examples(train, "training data")
    va = Examples(val, "validation data") if val is not None else None
    plan = None
    if dp is None:
        config = config.resolved(text=backbone.is_text, n=len(tr))
    else:
        from taft.privacy.config import expected_batch_size, plan_dp

        config = config.resolved(text=backbone.is_text, private=True, n=len(tr),
                                 batch_size=expected_batch_size(dp, len(tr), config.batch_size))
        if config.head_init == "probe":
            raise TaftError("head_init='probe' fits a linear probe on the training data without noise, which "
                            "breaks the privacy guarantee: use head_init='random' with DP")
        plan = plan_dp(dp, len(tr), config.epochs, config.batch_size)
    names = _class_names(class_names, tr)
    for ex in (tr, va):
        if ex is not None:
            ex.check(backbone, config.tangent_blocks, names)
    _warn_if_few_steps(config, len(tr), plan)
    out = Path(run_dir) if run_dir is not None else None
    state = _resume_state(out, config, tr, dp) if resume else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", config.to_dict())
        done = "".join(json.dumps(r) + "\n" for r in state["history"]) if state is not None else ""
        atomic_write(out / "metrics.jsonl", lambda p: p.write_text(done))

    head_weight = head_bias = None
    extra: dict[str, Any] = {}
    if state is not None:
        head_weight, head_bias, extra = state["head_weight0"], state["head_bias0"], dict(state["extra"])
    elif config.head_init == "probe":
        probe_cfg = replace(config, method="probe", head_init="random", lr=None, head_lr=None,
                            optimizer=None).resolved(text=backbone.is_text)
        probe = build_classifier(probe_cfg, backbone, names).to(where)
        probe_in = Prepared(probe, tr)
        probe_in.place(where, feed)
        hist = train_loop(probe, probe_cfg, probe_in, None, progress=progress, desc="head probe")
        head_weight, head_bias = probe.tail.head.weight.detach(), probe.tail.head.bias.detach()
        extra["head_probe"] = {"lr": probe_cfg.learning_rate, "epochs": probe_cfg.epochs,
                               "final_train_loss": hist[-1]["train_loss"]}

    classifier = build_classifier(config, backbone, names, head_weight=head_weight, head_bias=head_bias).to(where)
    tr_in = Prepared(classifier, tr)
    va_in = Prepared(classifier, va) if va is not None else None
    placement = {"train": tr_in.place(where, feed)}
    if va_in is not None:
        placement["val"] = va_in.place(where, feed)

    def log_epoch(record: dict[str, Any]) -> None:
        if out is not None:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def save_state(loop_state: dict[str, Any]) -> None:
        if out is not None:
            full = {**loop_state, "config": config.to_dict(), "head_weight0": classifier.head_weight0.cpu(),
                    "head_bias0": classifier.head_bias0.cpu(), "extra": extra, "train_ids": _ids_key(tr)}
            atomic_write(out / RESUME_NAME, lambda p: torch.save(full, p))

    privacy = None
    if plan is None:
        compiled_step = CompiledStep(classifier.train_logits, enabled=compile)
        history = train_loop(classifier, config, tr_in, va_in, progress=progress, on_epoch=log_epoch,
                             autocast=autocast, forward=compiled_step, resume=state, on_state=save_state)
        compiled = compiled_step.active
    else:
        from taft.privacy.dpsgd import dp_train_loop

        history, ledger = dp_train_loop(classifier, config, plan, tr_in, va_in, progress=progress,
                                        on_epoch=log_epoch)
        privacy = ledger.to_dict()
        compiled = False
    final = _evaluate(classifier, va_in if va_in is not None else tr_in, config.loss, config.kappa)
    if va_in is not None:
        _warn_if_at_chance(final.top1, va_in.labels)
    train_time = sum(r["train_time_s"] for r in history)
    metrics: dict[str, Any] = {
        "method": config.method, "tangent_blocks": config.tangent_blocks, "epochs": config.epochs,
        "steps": config.epochs * math.ceil(len(tr) / config.batch_size), "lr": config.learning_rate,
        "n_train": len(tr), "n_val": len(va) if va is not None else 0,
        "eval_split": "val" if va is not None else "train", **final.to_dict(),
        "final_train_loss": history[-1]["train_loss"], "train_time_s": train_time,
        "examples_per_s": len(tr) * config.epochs / train_time if train_time > 0 else None,
        "compute": {"device": str(where), "autocast": autocast, "compiled": compiled, "feed": placement,
                    "threads": torch.get_num_threads()},
        **extra,
    }
    saved_metrics: dict[str, Any] | None = metrics
    if plan is not None:
        metrics["steps"] = plan.steps
        # The checkpoint is what gets released: keep statistics of the private training data out of it.
        saved_metrics = ({k: v for k, v in metrics.items() if k != "final_train_loss"}
                         if va is not None else None)
        metrics["privacy"] = privacy
    checkpoint = None
    if out is not None:
        from taft.checkpoint import save_checkpoint  # checkpoint imports this package

        checkpoint = out / CHECKPOINT_NAME
        save_checkpoint(checkpoint, classifier, train_ids=tr.ids, n_train=len(tr), metrics=saved_metrics,
                        privacy=privacy)
    if out is not None:
        plot_training_curve(history, out / CURVE_NAME, title=f"{config.method} k={config.tangent_blocks}")
    metrics["wall_time_s"] = time.perf_counter() - t_start
    if out is not None:
        _write_json(out / "metrics.json", metrics)
    return FitResult(classifier=classifier, config=config, history=history, metrics=metrics, train_ids=tr.ids,
                     run_dir=out, checkpoint=checkpoint, privacy=privacy)
