"""`fit`: train one method on cached trunk features and write a run directory.

`fit` trains with the configured optimizer on batches in a seeded order (one `torch.Generator` permutation per
epoch; `taft.train.loop`), stops with a `TaftError` as soon as a batch loss is not finite, and writes to `run_dir`:

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

With `dp=DPConfig(...)`, the same loop runs DP-SGD's step instead (`taft.privacy.dpsgd`: Poisson-sampled
batches, clipped per-example gradients, Gaussian noise), stores the privacy ledger in the checkpoint's metadata
(`privacy`) and in metrics.json, and keeps training-data statistics out of the checkpoint's metrics. Validation
data must be disjoint from the private training data.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from taft.backbones.base import Backbone
from taft.devices import resolve_device
from taft.errors import FingerprintMismatchError, TaftError
from taft.fileio import atomic_write, write_json
from taft.model import Classifier
from taft.precision import check_autocast
from taft.privacy import DPConfig, DPPlan, plan_dp
from taft.privacy.config import expected_batch_size
from taft.train.compiled import CompiledStep
from taft.train.config import TrainConfig
from taft.train.curves import CURVE_NAME, plot_training_curve
from taft.train.evaluation import Evaluation, evaluate_prepared
from taft.train.examples import Examples, FeatureData, Prepared
from taft.train.feeding import FEEDS
from taft.train.loop import dp_train_loop, train_loop

CHECKPOINT_NAME = "checkpoint.safetensors"
RESUME_NAME = "resume_state.pt"
FEW_STEPS = 100
FEW_DP_STEPS = 25  # half the 50 large steps of the DP-SGD defaults at ε < 3 (n/10 per step, 5 epochs), which train well

def build_classifier(config: TrainConfig, backbone: Backbone, class_names: Sequence[str], *,
                     head_weight: torch.Tensor | None = None,
                     head_bias: torch.Tensor | None = None) -> Classifier:
    """A fresh classifier for `config.method` around `backbone`'s pretrained weights w0 (eval mode), carrying
    `config` as its training recipe. The base head w0_head is `random_head(dim, C, config.head_seed)` unless
    `head_weight` (and optionally `head_bias`) is given, identically for all methods."""
    return Classifier(backbone, tangent_blocks=config.tangent_blocks, seed=config.head_seed,
                      head_weight=head_weight, head_bias=head_bias, pooling=config.pooling, method=config.method,
                      class_names=class_names, train_config=config.to_dict()).eval()


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


def ids_key(examples: Examples) -> str | None:
    """A hash of the training ids, in order: what a resumed run checks its data against."""
    return None if examples.ids is None else hashlib.sha256(json.dumps(examples.ids).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- before training
def check_compute(backbone: Backbone, device: torch.device | str | None, autocast: str, compile: bool, feed: str,
                  dp: DPConfig | None) -> torch.device:
    """The device to train on, after checking the compute options (and that DP runs eagerly in float32)."""
    where = resolve_device(device) if device is not None else backbone.device
    check_autocast(autocast, where)
    if feed not in FEEDS:
        raise TaftError(f"feed must be one of {', '.join(FEEDS)}, got {feed!r}")
    if dp is not None and (autocast != "none" or compile):
        raise TaftError("DP-SGD trains in float32 and eagerly (per-example gradients by torch.func): autocast and "
                        "compile are not supported with dp")
    return where


def resolve_run(config: TrainConfig, backbone: Backbone, n: int,
                dp: DPConfig | None) -> tuple[TrainConfig, DPPlan | None]:
    """(the config with its defaults resolved for this backbone and data, the DP plan or None). σ is calibrated
    (or ε computed) here, before anything is written."""
    if dp is None:
        return config.resolved(text=backbone.is_text, n=n), None
    config = config.resolved(text=backbone.is_text, private=True, n=n, epsilon=dp.epsilon,
                             batch_size=expected_batch_size(dp, n, config.batch_size))
    if config.head_init == "probe":
        raise TaftError("head_init='probe' fits a linear probe on the training data without noise, which "
                        "breaks the privacy guarantee: use head_init='random' with DP")
    return config, plan_dp(dp, n, config.epochs, config.batch_size)


def class_names_of(given: Sequence[str] | None, train: Examples) -> list[str]:
    if given is not None:
        return [str(c) for c in given]
    if train.class_names is None:
        raise TaftError("class_names are required when the training data is a tensor tuple")
    return list(train.class_names)


def warn_if_few_steps(config: TrainConfig, n: int, plan: DPPlan | None) -> None:
    """Warn when the run has fewer than FEW_STEPS optimizer steps (DP-SGD: FEW_DP_STEPS, as its large batches take
    few steps by design): too few for the defaults to train reliably."""
    batch = plan.expected_batch_size if plan is not None else config.batch_size
    per_epoch = math.ceil(n / batch)
    steps = config.epochs * per_epoch
    if steps < (FEW_STEPS if plan is None else FEW_DP_STEPS):
        more = "more epochs (--epochs)" + (" or a smaller --expected-batch-size" if plan is not None
                                           else " or a smaller batch (--batch-size)")
        warnings.warn(f"only {steps} optimizer steps ({config.epochs} epochs of ~{per_epoch} batches of {batch} on "
                      f"{n} examples): likely too few to train; use {more}", stacklevel=3)


def warn_if_at_chance(top1: float, labels: torch.Tensor) -> None:
    """Warn when validation top-1 is at or below chance: the rate of always predicting the most frequent class."""
    chance = float(torch.bincount(labels).max()) / len(labels)
    if top1 <= chance:
        warnings.warn(f"validation top-1 {100 * top1:.1f}% is at or below chance ({100 * chance:.1f}%, always "
                      "predicting the most frequent class): the model has not learned; check the learning rate, "
                      "the number of steps and the labels", stacklevel=3)


def resume_state(out: Path | None, config: TrainConfig, train: Examples, dp: DPConfig | None) -> dict[str, Any]:
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
    if state["train_ids"] != ids_key(train):
        raise TaftError(f"cannot resume {out}: the training data (its example ids) differs from the run's")
    return state


class RunDir:
    """The run directory's files (see the module doc), or nothing at all when `fit` has no `run_dir`."""

    def __init__(self, out: str | Path | None):
        self.out = Path(out) if out is not None else None

    def start(self, config: TrainConfig, state: dict[str, Any] | None) -> None:
        """config.json, and metrics.jsonl holding the epochs done so far (a resumed run's)."""
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "config.json", config.to_dict())
        done = "".join(json.dumps(r) + "\n" for r in state["history"]) if state is not None else ""
        atomic_write(self.out / "metrics.jsonl", lambda p: p.write_text(done))

    def log_epoch(self, record: dict[str, Any]) -> None:
        if self.out is not None:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def save_state(self, state: dict[str, Any]) -> None:
        if self.out is not None:
            atomic_write(self.out / RESUME_NAME, lambda p: torch.save(state, p))

    def checkpoint(self, classifier: Classifier, train: Examples, metrics: dict[str, Any] | None,
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
def probe_head(config: TrainConfig, backbone: Backbone, names: list[str], train: Examples, where: torch.device,
               feed: str, progress: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """`head_init="probe"`: (W, b) of a linear probe trained on `train` with the probe's defaults, and what to
    record of it."""
    probe_cfg = replace(config, method="probe", head_init="random", lr=None, head_lr=None,
                        optimizer=None).resolved(text=backbone.is_text)
    probe = build_classifier(probe_cfg, backbone, names).to(where)
    probe_in = Prepared(probe, train)
    probe_in.place(where, feed)
    hist = train_loop(probe, probe_cfg, probe_in, None, progress=progress, desc="head probe")
    record = {"lr": probe_cfg.learning_rate, "epochs": probe_cfg.epochs, "final_train_loss": hist[-1]["train_loss"]}
    return probe.tail.head.weight.detach(), probe.tail.head.bias.detach(), {"head_probe": record}


def train_classifier(classifier: Classifier, config: TrainConfig, train: Prepared, val: Prepared | None,
                     plan: DPPlan | None, run: RunDir, state: dict[str, Any] | None, extra: dict[str, Any], *,
                     progress: bool, autocast: str, compile: bool) -> tuple[list[dict[str, Any]], dict | None, bool]:
    """Run the training loop (plain, or DP-SGD's step when `plan` is given); (history, privacy ledger or None,
    whether the forward ran compiled)."""
    if plan is not None:
        history, ledger = dp_train_loop(classifier, config, plan, train, val, progress=progress,
                                        on_epoch=run.log_epoch)
        return history, ledger.to_dict(), False

    def save_state(loop_state: dict[str, Any]) -> None:
        run.save_state({**loop_state, "config": config.to_dict(), "head_weight0": classifier.head_weight0.cpu(),
                        "head_bias0": classifier.head_bias0.cpu(), "extra": extra, "train_ids": ids_key(train)})

    compiled_step = CompiledStep(classifier.train_logits, enabled=compile)
    history = train_loop(classifier, config, train, val, progress=progress, on_epoch=run.log_epoch,
                         autocast=autocast, forward=compiled_step, resume=state,
                         on_state=save_state if run.out is not None else None)
    return history, None, compiled_step.active


def run_metrics(config: TrainConfig, final: Evaluation, history: list[dict[str, Any]], train: Examples,
                val: Examples | None, plan: DPPlan | None, compute: dict[str, Any],
                extra: dict[str, Any]) -> dict[str, Any]:
    """metrics.json's content (without the wall time)."""
    train_time = sum(r["train_time_s"] for r in history)
    n = len(train)
    return {
        "method": config.method, "tangent_blocks": config.tangent_blocks, "epochs": config.epochs,
        "steps": plan.steps if plan is not None else config.epochs * math.ceil(n / config.batch_size),
        "lr": config.learning_rate, "n_train": n, "n_val": len(val) if val is not None else 0,
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


def check_model(model: Classifier, config: TrainConfig, backbone: Backbone, names: list[str], resume: bool) -> None:
    """`TaftError` unless `model` (given to `fit`) is `config`'s model around `backbone` for the classes `names`."""
    if model.backbone_fingerprint != backbone.fingerprint:
        raise FingerprintMismatchError(f"the model was built around backbone {model.backbone_name!r}, not "
                                       f"{backbone.name!r}: give fit the backbone it was built with")
    have = {"method": model.method, "tangent_blocks": model.tangent_blocks, "pooling": model.pooling}
    differ = sorted(k for k, v in have.items() if getattr(config, k) != v)
    if differ:
        raise TaftError(f"the model's {', '.join(f'{k}={have[k]!r}' for k in differ)} differ from the config's; "
                        "train it with a config of its own settings")
    if model.class_names != names:
        raise TaftError(f"the model's classes {model.class_names[:10]} differ from the data's {names[:10]}")
    if config.head_init == "probe" or resume:
        raise TaftError("a given model keeps its own base head and tensors: not with head_init='probe' or resume")


def fit(config: TrainConfig, backbone: Backbone, train: FeatureData, *, val: FeatureData | None = None,
        class_names: Sequence[str] | None = None, run_dir: str | Path | None = None,
        device: torch.device | str | None = None, progress: bool = True, dp: DPConfig | None = None,
        resume: bool = False, autocast: str = "none", compile: bool = False, feed: str = "auto",
        model: Classifier | None = None) -> FitResult:
    """Train `config.method` on cached trunk features of (backbone, config.tangent_blocks) (see
    `cache_features`). `train`/`val`: CachedFeatures or (features (n, N, D), labels (n,)[, ids]); class names
    come from the CachedFeatures unless given. Text needs CachedFeatures: they carry each example's token count
    (the padding mask); a tensor tuple is read as unpadded. With `run_dir`, writes config.json, metrics.jsonl,
    metrics.json and checkpoint.safetensors there (see the module doc). Deterministic for a given config and data.

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
    device: "auto", "resident", "stream", "host", `taft.train.feeding`).

    `model`: train this `Classifier` (built around `backbone` with the config's method, k and pooling) in place,
    from its current tensors and base head, instead of a fresh one; `FitResult.classifier` is that model."""
    t_start = time.perf_counter()
    where = check_compute(backbone, device, autocast, compile, feed, dp)
    tr = Examples(train, "training data")
    va = Examples(val, "validation data") if val is not None else None
    config, plan = resolve_run(config, backbone, len(tr), dp)
    names = class_names_of(class_names, tr)
    for ex in (tr, va):
        if ex is not None:
            ex.check(backbone, config.tangent_blocks, names)
    warn_if_few_steps(config, len(tr), plan)
    if model is not None:
        check_model(model, config, backbone, names, resume)
    run = RunDir(run_dir)
    state = resume_state(run.out, config, tr, dp) if resume else None
    run.start(config, state)

    head_weight = head_bias = None
    extra: dict[str, Any] = {}
    if state is not None:
        head_weight, head_bias, extra = state["head_weight0"], state["head_bias0"], dict(state["extra"])
    elif config.head_init == "probe":
        head_weight, head_bias, extra = probe_head(config, backbone, names, tr, where, feed, progress)
    if model is not None:
        model.train_config = config.to_dict()
        classifier = model.to(where)
    else:
        classifier = build_classifier(config, backbone, names, head_weight=head_weight,
                                      head_bias=head_bias).to(where)
    tr_in = Prepared(classifier, tr)
    va_in = Prepared(classifier, va) if va is not None else None
    placement = {"train": tr_in.place(where, feed)}
    if va_in is not None:
        placement["val"] = va_in.place(where, feed)

    history, privacy, compiled = train_classifier(classifier, config, tr_in, va_in, plan, run, state, extra,
                                                  progress=progress, autocast=autocast, compile=compile)
    final = evaluate_prepared(classifier, va_in if va_in is not None else tr_in, config.loss, config.kappa)
    if va_in is not None:
        warn_if_at_chance(final.top1, va_in.labels)
    compute = {"device": str(where), "autocast": autocast, "compiled": compiled, "feed": placement,
               "threads": torch.get_num_threads()}
    metrics = run_metrics(config, final, history, tr, va, plan, compute, extra)
    saved_metrics = released_metrics(metrics, plan is not None, va is not None)
    if privacy is not None:
        metrics = {**metrics, "privacy": privacy}
    checkpoint = run.checkpoint(classifier, tr, saved_metrics, privacy, history)
    metrics["wall_time_s"] = time.perf_counter() - t_start
    run.finish(metrics)
    return FitResult(classifier=classifier, config=config, history=history, metrics=metrics, train_ids=tr.ids,
                     run_dir=run.out, checkpoint=checkpoint, privacy=privacy)
