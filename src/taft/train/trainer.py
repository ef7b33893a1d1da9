"""`fit(model, train, config)`: train a model in place on trunk features (cached, or streamed through its trunk:
`taft.train.sources`) and write a run directory.

The model says what is trained (method, k, pooling, base head: `taft.spec.ModelSpec`); `config` says how
(`TrainConfig`, the recipe; its defaults are resolved for the model by `taft.train.plan.plan_run`). `fit` trains
on batches in a seeded order (`taft.train.loop`), stops with a `TaftError` as soon as a batch loss is not finite,
and writes to `run_dir`:

    config.json     the run's record: the model's spec and the resolved recipe (`run_record`; written first)
    metrics.jsonl   one line per epoch: epoch, train_loss, lr, train_time_s, wall_time_s, examples_per_s,
                    val_top1, val_loss (null without validation data)
    metrics.json    at the end: top-1, per-class accuracy and loss on the validation data (or on the training
                    data without it), timings, epochs
    checkpoint.safetensors   what was trained plus metadata (`taft.checkpoint`)
    resume_state.pt          after every epoch: what `fit(..., resume=True)` continues from (not with DP)
    training_curve.png       training loss and validation top-1 per epoch (only with matplotlib installed)
    .lock                    held while a run writes the directory: a second run into it fails at once

metrics.json also records, as information, how the run computed: `compute` = {device, autocast, compiled, feed
(per split: resident / stream / host, `taft.train.feeding`, or trunk when streamed), threads}; none of it changes
what is saved.

With `dp=DPConfig(...)`, the same loop runs DP-SGD's step instead (`taft.privacy.dpsgd`: Poisson-sampled
batches, clipped per-example gradients, Gaussian noise), stores the privacy ledger in the checkpoint's metadata
(`privacy`) and in metrics.json, and keeps training-data statistics out of the checkpoint's metrics. Validation
data must be disjoint from the private training data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from taft.data.feature_cache import LabelledDataset
from taft.errors import TaftError
from taft.fileio import atomic_write, exclusive_lock, write_json
from taft.model import Classifier
from taft.precision import check_autocast
from taft.privacy import DPConfig
from taft.train.compiled import CompiledStep
from taft.train.config import TrainConfig, run_record
from taft.train.curves import CURVE_NAME, plot_training_curve
from taft.train.distributed import Group, join, rank_device, refuse_private
from taft.train.evaluation import Evaluation, evaluate_prepared
from taft.train.examples import FeatureData
from taft.train.feeding import FEEDS
from taft.train.loop import train_loop
from taft.train.plan import RunPlan, plan_run
from taft.train.sources import (FeatureSource, TrainingData, feature_source, prepared, training_data,
                                validation_source)
from taft.wording import counted

CHECKPOINT_NAME = "checkpoint.safetensors"
RESUME_NAME = "resume_state.pt"
LOCK_NAME = ".lock"  # held (flock) while a run writes the directory
FEW_STEPS = 100
FEW_DP_STEPS = 25  # half the 50 large steps of the DP-SGD defaults at ε < 3 (n/10 per step, 5 epochs), which train well


@dataclass(frozen=True)
class Compute:
    """How `fit` computes, never what it saves (checkpoints hold float32 CPU tensors; metrics.json records these
    as information). device: "auto", "cpu", "cuda[:N]", "mps" or None (the model's; the model moves there);
    autocast: "none", "bf16", "fp16" (the training forward's precision, `taft.precision`; not with DP);
    compile: `torch.compile` the training forward, eager fallback (`taft.train.compiled`; not with DP);
    feed: how cached features reach the device ("auto", "resident", "stream", "host"; `taft.train.feeding`)."""

    device: str | torch.device | None = None
    autocast: str = "none"
    compile: bool = False
    feed: str = "auto"


@dataclass
class FitResult:
    """The trained classifier, the resolved recipe, per-epoch records, final metrics (as in metrics.json), the
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


def ids_key(examples: TrainingData) -> str | None:
    """A hash of the training ids, in order: what a resumed run checks its data against."""
    return None if examples.ids is None else hashlib.sha256(json.dumps(examples.ids).encode()).hexdigest()


def run_digest(model: Classifier, record: dict[str, Any], train: TrainingData) -> str:
    """A hash of what the ranks of a data-parallel run must share: the model's fingerprint, the run record, and the
    training data's ids, labels and feature shape (cached features)."""
    labels = hashlib.sha256(train.labels.numpy().tobytes()).hexdigest()
    shape = getattr(train, "feature_shape", None)
    return hashlib.sha256(json.dumps([model.fingerprint, record, ids_key(train), labels, len(train),
                                      shape]).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- before training
def check_compute(model: Classifier, compute: Compute, dp: DPConfig | None) -> torch.device:
    """The device to train on, after checking the compute options (and that DP runs eagerly in float32)."""
    where = rank_device(compute.device) if compute.device is not None else model.device
    check_autocast(compute.autocast, where)
    if compute.feed not in FEEDS:
        raise TaftError(f"feed must be one of {', '.join(FEEDS)}, got {compute.feed!r}")
    if dp is not None and (compute.autocast != "none" or compute.compile):
        raise TaftError("DP-SGD trains in float32 and eagerly (per-example gradients by torch.func): autocast and "
                        "compile are not supported with dp")
    return where


def warn_if_few_steps(plan: RunPlan) -> None:
    """Warn when the run has fewer than FEW_STEPS optimizer steps (DP-SGD: FEW_DP_STEPS, as its large batches take
    few steps by design): too few for the defaults to train reliably."""
    if plan.steps < (FEW_DP_STEPS if plan.private else FEW_STEPS):
        batch = "a smaller expected_batch_size" if plan.private else "a smaller batch_size"
        warnings.warn(f"only {counted(plan.steps, 'optimizer step')} ({counted(plan.config.epochs, 'epoch')} of "
                      f"~{counted(plan.steps_per_epoch, 'batch', 'batches')} of {plan.batch_size} on "
                      f"{counted(plan.n, 'example')}): likely too few to train; use more epochs or {batch}",
                      stacklevel=3)


def warn_if_loss_rose(history: list[dict[str, Any]], private: bool) -> None:
    """Warn when the last epoch's mean training loss is above the first's: the run diverged or oscillates (most
    often a learning rate too high for the data). A private run's message gives no loss values."""
    losses = [r["train_loss"] for r in history if r["train_loss"] is not None]
    if len(losses) >= 2 and losses[-1] > losses[0]:
        values = "" if private else f" ({losses[0]:.4g} in the first epoch, {losses[-1]:.4g} in the last)"
        warnings.warn(f"the training loss rose over the run{values}: the learning rate is likely too high for "
                      "this data; try a lower lr", stacklevel=3)


def warn_if_at_chance(top1: float, labels: torch.Tensor, split: str = "validation") -> None:
    """Warn when top-1 on `split` is at or below chance: the rate of always predicting the most frequent class."""
    chance = float(torch.bincount(labels).max()) / len(labels)
    if top1 <= chance:
        warnings.warn(f"{split} top-1 {100 * top1:.1f}% is at or below chance ({100 * chance:.1f}%, always "
                      "predicting the most frequent class): the model has not learned; check the learning rate, "
                      "the number of steps and the labels", stacklevel=3)


def resume_state(out: Path | None, record: dict[str, Any], train: TrainingData, dp: DPConfig | None
                 ) -> dict[str, Any]:
    """The resumable state saved in run directory `out`, checked against this run's `record` (TaftError naming a
    mismatch)."""
    if out is None:
        raise TaftError("resuming needs the run directory (run_dir) of the run to continue")
    if dp is not None:
        raise TaftError("resuming DP-SGD training is not supported (the privacy accounting covers one run)")
    path = out / RESUME_NAME
    if not path.is_file():
        raise TaftError(f"{out} has no {RESUME_NAME} to resume from (not a run directory, or a DP-SGD run)")
    try:
        state = torch.load(path, weights_only=True)
        saved = {**TrainConfig.from_dict(state["config"]).to_dict(),
                 **{k: state["config"][k] for k in record if k in state["config"]}}
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError) as e:
        raise TaftError(f"{path} is unreadable or corrupt ({type(e).__name__}); rerun without resuming") from e
    differ = sorted(k for k, v in record.items() if k != "epochs" and saved.get(k) != v)
    if differ:
        raise TaftError(f"cannot resume {out}: its settings differ in {differ}; only the epochs may change")
    if state["epoch"] > record["epochs"]:
        raise TaftError(f"{out} has already trained {state['epoch']} epochs; ask for more than that to continue")
    if state["train_ids"] != ids_key(train):
        raise TaftError(f"cannot resume {out}: the training data (its example ids) differs from the run's")
    return state


class RunDir:
    """The run directory's files (see the module doc), or nothing at all when `fit` has no `run_dir`."""

    def __init__(self, out: str | Path | None):
        self.out = Path(out) if out is not None else None

    def locked(self) -> contextlib.AbstractContextManager:
        """Hold the run directory for this run: a second run into it fails at once, naming this process."""
        if self.out is None:
            return contextlib.nullcontext()
        return exclusive_lock(self.out / LOCK_NAME, f"run directory {self.out} is in use by another process")

    def start(self, record: dict[str, Any], state: dict[str, Any] | None) -> None:
        """config.json, and metrics.jsonl holding the epochs done so far (a resumed run's)."""
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "config.json", record)
        done = "".join(json.dumps(r) + "\n" for r in state["history"]) if state is not None else ""
        atomic_write(self.out / "metrics.jsonl", lambda p: p.write_text(done))

    def log_epoch(self, record: dict[str, Any]) -> None:
        if self.out is not None:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def save_state(self, state: dict[str, Any]) -> None:
        if self.out is not None:
            atomic_write(self.out / RESUME_NAME, lambda p: torch.save(state, p))

    def checkpoint(self, classifier: Classifier, train: TrainingData, metrics: dict[str, Any] | None,
                   privacy: dict[str, Any] | None, history: list[dict[str, Any]]) -> Path | None:
        """checkpoint.safetensors and the training curve; the checkpoint's path."""
        if self.out is None:
            return None
        path = classifier.save(self.out / CHECKPOINT_NAME, train_ids=train.ids, n_train=len(train),
                               metrics=metrics, privacy=privacy)
        plot_training_curve(history, self.out / CURVE_NAME,
                            title=f"{classifier.method} k={classifier.tangent_blocks}")
        return path

    def finish(self, metrics: dict[str, Any]) -> None:
        if self.out is not None:
            write_json(self.out / "metrics.json", metrics)


# ----------------------------------------------------------------------------------------------- training
def probe_head(model: Classifier, plan: RunPlan, train: TrainingData, feed: str, progress: bool,
               group: Group | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """`head_init="probe"`: (W, b) of a linear probe trained on `train` with the probe's default rates and the
    run's other settings (data-parallel in a torchrun `group`), and what to record of it."""
    probe = model.derive(method="probe", head_init="random")
    probe_plan = plan_run(probe, replace(plan.config, lr=None, head_lr=None, optimizer=None), plan.n)
    probe_in = prepared(probe, train)
    probe_in.place(probe.device, feed)
    hist = train_loop(probe, probe_plan, probe_in, None, progress=progress, desc="head probe", group=group)
    record = {"lr": probe_plan.config.learning_rate, "epochs": probe_plan.config.epochs,
              "final_train_loss": hist[-1]["train_loss"]}
    return probe.tail.head.weight.detach(), probe.tail.head.bias.detach(), {"head_probe": record}


def run_metrics(model: Classifier, plan: RunPlan, final: Evaluation, history: list[dict[str, Any]],
                val: TrainingData | None, compute: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """metrics.json's content (without the wall time)."""
    train_time = sum(r["train_time_s"] for r in history)
    config, n = plan.config, plan.n
    return {
        "method": model.method, "tangent_blocks": model.tangent_blocks, "epochs": config.epochs,
        "steps": plan.steps, "lr": config.learning_rate, "n_train": n, "n_val": len(val) if val is not None else 0,
        "eval_split": "val" if val is not None else "train", **final.to_dict(),
        "final_train_loss": history[-1]["train_loss"], "train_time_s": train_time,
        "examples_per_s": n * config.epochs / train_time if train_time > 0 else None,
        "compute": compute, **extra,
    }


def released_metrics(metrics: dict[str, Any], private: bool, has_val: bool) -> dict[str, Any] | None:
    """The metrics the checkpoint keeps: all of them, except that a private run's checkpoint (what gets released)
    keeps no statistics of the private training data (none at all without validation data)."""
    if not private:
        return metrics
    return {k: v for k, v in metrics.items() if k != "final_train_loss"} if has_val else None


def fit(model: Classifier, train: FeatureData | LabelledDataset, config: TrainConfig | None = None, *,
        val: FeatureData | LabelledDataset | None = None, run_dir: str | Path | None = None,
        dp: DPConfig | None = None, resume: bool = False, compute: Compute | None = None, progress: bool = True,
        features: FeatureSource | str = "auto") -> FitResult:
    """Train `model` in place, from its current tensors, on trunk features of its trunk, with the recipe `config`
    (default `TrainConfig()`). `train`/`val`: cached features (CachedFeatures from `model.cache_features(...)`, or
    (features (n, N, D), labels (n,)[, ids])), or the raw dataset (images, texts), with labels indexing
    `model.class_names`. Text features need CachedFeatures: they carry each example's token count (the padding
    mask). `features` (a `FeatureSource` or its mode "auto", "cache", "stream"): whether a raw dataset is cached
    or streamed through the trunk on every batch (`taft.train.sources`); `config.augment` needs streamed images.
    With `run_dir`, writes the run directory (see the module doc). Deterministic for a given model, config and
    data.

    A model with `head_init="probe"` first gets a linear probe fitted on `train` as its base head.
    `dp`: train with DP-SGD (see `taft.privacy`); σ is calibrated (or ε computed) before anything is written.
    `resume`: continue the run in `run_dir` from its last finished epoch up to `config.epochs`, on the same data
    with the same model and settings otherwise (its base head and tensors come from the run). Interrupted runs,
    and any run with the constant schedule, then give exactly the uninterrupted run's result; extending a finished
    cosine/step run continues on the longer schedule from the step reached. Not with `dp`.
    `compute`: the device, autocast, compile and feed (`Compute`).

    Under torchrun (`taft.train.distributed`), the ranks train the model data-parallel, each on its part of
    every global batch of `config.batch_size`, with the single-process run's steps; every rank must pass the same
    model, data and settings (checked), and only rank 0 writes `run_dir` (elsewhere the result's `run_dir` and
    `checkpoint` are None). Not with `dp`."""
    t_start = time.perf_counter()
    refuse_private(dp)
    compute = compute or Compute()
    where = check_compute(model, compute, dp)
    group = join(where)
    progress = progress and (group is None or group.rank == 0)
    config, source = config or TrainConfig(), feature_source(features)
    tr = training_data(model.to(where), train, source, "training data", augment=config.augment, seed=config.seed,
                       progress=progress)
    va = (training_data(model, val, validation_source(source, tr), "validation data", progress=progress)
          if val is not None else None)
    plan = plan_run(model, config, len(tr), dp)
    for ex in (tr, va):
        if ex is not None:
            ex.check(model)
    warn_if_few_steps(plan)
    record = run_record(model.spec, plan.config)
    if group is not None:
        group.check_same(run_digest(model, record, tr), "model, settings or training data")
    run = RunDir(run_dir if group is None or group.rank == 0 else None)
    with run.locked():
        state = resume_state(None if run_dir is None else Path(run_dir), record, tr, dp) if resume else None
        run.start(record, state)

        model.to(where)
        extra: dict[str, Any] = {}
        if state is not None:
            model.set_base_head(state["head_weight0"].to(where), state["head_bias0"].to(where))
            extra = dict(state["extra"])
        elif model.spec.head_init == "probe":
            weight, bias, extra = probe_head(model, plan, tr, compute.feed, progress, group)
            model.set_base_head(weight, bias)
        model.train_config = record
        tr_in = prepared(model, tr)
        va_in = prepared(model, va) if va is not None else None
        placement = {"train": tr_in.place(where, compute.feed)}
        if va_in is not None:
            placement["val"] = va_in.place(where, compute.feed)

        def save_state(loop_state: dict[str, Any]) -> None:
            run.save_state({**loop_state, "config": record, "head_weight0": model.head_weight0.cpu(),
                            "head_bias0": model.head_bias0.cpu(), "extra": extra, "train_ids": ids_key(tr)})

        compiled = CompiledStep(model.train_logits, enabled=compute.compile and not plan.private)
        history = train_loop(model, plan, tr_in, va_in, progress=progress, on_epoch=run.log_epoch,
                             autocast=compute.autocast, forward=compiled, resume=state,
                             on_state=save_state if run.out is not None and not plan.private else None, group=group)
        warn_if_loss_rose(history, plan.private)
        ledger = plan.ledger()
        privacy = ledger.to_dict() if ledger is not None else None
        final = evaluate_prepared(model, va_in if va_in is not None else tr_in.unaugmented(), plan.config.loss,
                                  plan.config.kappa)
        if va_in is not None:
            warn_if_at_chance(final.top1, va_in.labels)
        info = {"device": str(where), "autocast": compute.autocast, "compiled": compiled.active, "feed": placement,
                "threads": torch.get_num_threads()}
        metrics = run_metrics(model, plan, final, history, va, info, extra)
        saved_metrics = released_metrics(metrics, plan.private, va is not None)
        if privacy is not None:
            metrics = {**metrics, "privacy": privacy}
        checkpoint = run.checkpoint(model, tr, saved_metrics, privacy, history)
        metrics["wall_time_s"] = time.perf_counter() - t_start
        run.finish(metrics)
        return FitResult(classifier=model, config=plan.config, history=history, metrics=metrics, train_ids=tr.ids,
                         run_dir=run.out, checkpoint=checkpoint, privacy=privacy)
