"""Train shards in parallel: one `ShardTask` per shard, run by any `concurrent.futures.Executor`.

A task carries everything its worker needs and pickles cheaply: the training config (with the shard's own data order
seed), the shard's rows of the shared trunk-feature cache (`CachedFeatures` pickles as a path plus row numbers; workers
never recompute features) or, for a store that streams, the shard's part of the raw dataset (its records: paths or
texts; the worker runs the trunk on every batch, `STREAMED_SHARD`), the class names, and the backbone as a
`BackboneSpec` (name, image size, dtype, fingerprint; reloaded from taft's weight cache once per worker process) or the
`Backbone` itself when it cannot be reloaded by name. A task runs with `torch.set_num_threads(task.threads)` and
restores the previous count, so the same task gives the same Δw in any executor (the thread count changes float
summation order). A task with a `DPConfig` trains its shard with DP-SGD (`fit(..., dp=...)`); its result carries the
run's privacy ledger, and only metrics that do not depend on the private data (`PUBLIC_METRICS`).

`run_shards` submits every task (as `executor.portable(task)` where the executor has that: what the task carries
to a worker that may not share this machine's disk), retries a failed one `retries` times, reports each finished
shard (a progress line, and `on_result` so the caller can persist it at once), and raises `ShardTrainingError`
naming every shard that still failed (why, in words: `executor.describe_failure(error)` where the executor has it
and returns a line); a shard is never silently missing.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Union

import torch

from taft.backbones import BUNDLED, load_backbone_like
from taft.backbones.base import Backbone
from taft.data.feature_cache import CachedFeatures
from taft.devices import worker_device
from taft.errors import TaftError
from taft.tensors import device_free
from taft.privacy import DPConfig
from taft.progress import progress_bar
from taft.model import Classifier
from taft.spec import ModelSpec
from taft.train import Compute, TrainConfig, fit
from taft.train.sources import FeatureSource, is_dataset
from taft.wording import counted


@dataclass(frozen=True)
class FeatureUnion:
    """Training features in several parts (a store's creation data and the data of each later addition): every
    shard's ids lie in one part, which `shard_data` takes its rows from."""

    parts: tuple[Any, ...]

    @cached_property
    def part_of(self) -> dict[str, int]:
        """{example id: the index of the part that holds it} (built once, on first use)."""
        return {i: k for k, part in enumerate(self.parts) for i in feature_ids(part)}


FeatureData = Union[CachedFeatures, tuple[torch.Tensor, torch.Tensor, Sequence[str]], FeatureUnion]
# How a shard given its raw dataset trains: streamed through the trunk, read in the shard's own process (the shards
# running side by side are the parallelism); a store that streams keeps streaming, so retraining is bit-identical.
STREAMED_SHARD = FeatureSource("stream", loader_workers=0)
# Metrics that depend only on the data and config (no timings): what a shard checkpoint records.
DETERMINISTIC_METRICS = ("method", "tangent_blocks", "epochs", "steps", "lr", "n_train", "eval_split", "top1", "loss",
                         "final_train_loss")
# Under DP: the metrics that are no statistic of the private training data (n is treated as public).
PUBLIC_METRICS = ("method", "tangent_blocks", "epochs", "steps", "lr", "n_train")


class Deferred:
    """Something a task carries in place of a value, fetched in the worker by `load()` (a backbone by name;
    on Ray, rows or a backbone in the object store: `taft.parallel.ray_cluster`)."""

    def load(self) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class BackboneSpec(Deferred):
    """A backbone by name (registry name or local weights path) and preprocessing (`preprocess.to_dict()` as
    canonical JSON), to be loaded in the worker."""

    name: str
    preprocess: str
    dtype: str
    fingerprint: str

    @classmethod
    def of(cls, name: str, preprocess: dict, dtype: str, fingerprint: str) -> BackboneSpec:
        return cls(name, json.dumps(preprocess, sort_keys=True), dtype, fingerprint)

    def load(self) -> Backbone:
        key = (self.name, self.preprocess, self.dtype)
        if key not in _LOADED:
            bb = load_backbone_like(self.name, json.loads(self.preprocess))
            bb.model.to(getattr(torch, self.dtype))
            bb._fingerprint = None
            _LOADED[key] = bb
        bb = _LOADED[key]
        if bb.fingerprint != self.fingerprint:
            raise TaftError(f"backbone {self.name!r} loaded in worker {socket.gethostname()}:{os.getpid()} has "
                            f"fingerprint {bb.fingerprint[:12]}…, expected {self.fingerprint[:12]}… (other weights "
                            "there?)")
        return bb


_LOADED: dict[tuple[str, str, str], Backbone] = {}


def backbone_ref(backbone: Backbone, by_name: bool = True) -> Backbone | BackboneSpec:
    """What a task carries: a `BackboneSpec` when the backbone can be reloaded by its name (and `by_name`), else
    the backbone itself (pickled to each worker)."""
    if by_name and (backbone.name in BUNDLED or Path(backbone.name).exists()):
        dtype = str(backbone.dtype).removeprefix("torch.")
        return BackboneSpec.of(backbone.name, backbone.preprocess.to_dict(), dtype, backbone.fingerprint)
    return backbone


def feature_ids(train: FeatureData) -> list[str]:
    """The example ids of training data (every part's, for a `FeatureUnion`)."""
    if isinstance(train, FeatureUnion):
        return [i for p in train.parts for i in feature_ids(p)]
    if isinstance(train, CachedFeatures) or is_dataset(train):
        return [str(i) for i in train.ids]
    return [str(i) for i in train[2]]


def shard_data(train: FeatureData, ids: Sequence[str]) -> FeatureData:
    """The rows of `train` with the given ids, in sorted id order (the canonical order a shard trains in).
    `CachedFeatures` stay a (path, rows) view of the same cache entry; a raw dataset (streamed through the trunk)
    is `select`ed. `TaftError` naming ids not in `train`."""
    want = sorted(str(i) for i in ids)
    if isinstance(train, FeatureUnion):
        return shard_data(train.parts[train.part_of.get(want[0], 0) if want else 0], want)
    if is_dataset(train):
        missing = sorted(set(want) - set(str(i) for i in train.ids))
        if missing:
            raise TaftError(f"{len(missing)} ids of the shard are not in the training data, e.g. {missing[:10]}")
        return train.select(want)
    if isinstance(train, CachedFeatures):
        full = CachedFeatures(train.path)
        index = {i: r for r, i in enumerate(full.ids)}
        have = set(train.ids)
        missing = [i for i in want if i not in have]
        if missing:
            raise TaftError(f"{len(missing)} ids of the shard are not in the training features, e.g. {missing[:10]}")
        return CachedFeatures(train.path, [index[i] for i in want])
    if not (isinstance(train, (tuple, list)) and len(train) == 3):
        raise TaftError("shard training data must be CachedFeatures or a tuple (features, labels, ids)")
    x, y, all_ids = train
    index = {str(i): r for r, i in enumerate(all_ids)}
    missing = [i for i in want if i not in index]
    if missing:
        raise TaftError(f"{len(missing)} ids of the shard are not in the training features, e.g. {missing[:10]}")
    rows = torch.tensor([index[i] for i in want], dtype=torch.int64)
    return torch.as_tensor(x)[rows], torch.as_tensor(y)[rows], want


@dataclass(frozen=True)
class ShardTask:
    """Train shard `index`, the model `spec` describes for `class_names`, with the recipe `config` on `data` (already restricted to the shard, in training order); with
    `dp`, by DP-SGD (its seed, if any, is this shard's own); on `device` ("auto" / "cuda": the worker's pinned GPU,
    `taft.devices.worker_device`)."""

    index: int
    spec: ModelSpec
    config: TrainConfig
    data: FeatureData | Deferred
    class_names: tuple[str, ...]
    backbone: Backbone | Deferred
    fingerprint: str
    threads: int = 1
    dp: DPConfig | None = None
    device: str = "cpu"


@dataclass
class ShardResult:
    """The trained tensors (Δw for taft), base head, ids in training order, deterministic metrics, where and how
    long it ran; `privacy`: the DP-SGD run's ledger (`PrivacyLedger.to_dict()`), None without DP; `warnings`: the
    messages of the warnings its training gave (a worker's would not reach the user)."""

    index: int
    tensors: dict[str, torch.Tensor]
    head_weight0: torch.Tensor
    head_bias0: torch.Tensor
    ids: list[str]
    config: dict[str, Any]
    metrics: dict[str, Any]
    seconds: float
    worker: str
    attempts: int = 1
    privacy: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)  # what training warned of, said again by the caller


class ShardTrainingError(TaftError):
    """Some shards failed after all retries. `failures`: {index: (attempts, message)}; `results`: the shards that
    did finish (already passed to `on_result`)."""

    def __init__(self, failures: dict[int, tuple[int, str]], results: dict[int, ShardResult]):
        self.failures, self.results = failures, results
        listed = "; ".join(f"shard {i} ({a} attempt{'s' if a > 1 else ''}): {m}"
                           for i, (a, m) in sorted(failures.items()))
        total = counted(len(failures) + len(results), "shard")
        super().__init__(f"{len(failures)} of {total} failed: {listed}")


def train_shard(task: ShardTask) -> ShardResult:
    """Run one task (in a worker); see the module doc."""
    t0 = time.perf_counter()
    previous = torch.get_num_threads()
    torch.set_num_threads(task.threads)
    try:
        backbone = task.backbone.load() if isinstance(task.backbone, Deferred) else task.backbone
        data = task.data.load() if isinstance(task.data, Deferred) else task.data
        device = worker_device(task.device)
        model = Classifier.from_spec(backbone, task.class_names, task.spec)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fit(model, data, task.config, dp=task.dp, compute=Compute(device), progress=False,
                         features=STREAMED_SHARD if is_dataset(data) else "auto")
    finally:
        torch.set_num_threads(previous)
    clf = result.classifier
    if not clf.accepts_fingerprint(task.fingerprint):
        raise TaftError(f"shard {task.index} trained around other base weights (fingerprint "
                        f"{clf.fingerprint[:12]}…) than the store's ({task.fingerprint[:12]}…)")
    keep = DETERMINISTIC_METRICS if task.dp is None else PUBLIC_METRICS
    metrics = {k: result.metrics[k] for k in keep if k in result.metrics}
    saved = device_free({**clf.trainable_state_dict(), "head_weight0": clf.head_weight0,
                         "head_bias0": clf.head_bias0})  # CPU tensors: results cross process boundaries
    head_weight0, head_bias0 = saved.pop("head_weight0"), saved.pop("head_bias0")
    return ShardResult(index=task.index, tensors=saved, head_weight0=head_weight0, head_bias0=head_bias0,
                       ids=list(result.train_ids or []),
                       config=dict(clf.train_config or {}), metrics=metrics, seconds=time.perf_counter() - t0,
                       worker=f"{socket.gethostname()}:{os.getpid()}", privacy=result.privacy,
                       warnings=[str(w.message) for w in caught])


def _message(e: BaseException, executor: Executor) -> str:
    if isinstance(e, BrokenProcessPool):
        return "a worker process died abruptly (killed, or out of memory)"
    described = getattr(executor, "describe_failure", lambda _: None)(e)
    if described is not None:
        return described
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_shards(tasks: Sequence[ShardTask], executor: Executor, *, retries: int = 1,
               on_result: Callable[[ShardResult], None] | None = None, progress: bool = True,
               fn: Callable[[ShardTask], ShardResult] = train_shard) -> dict[int, ShardResult]:
    """Run `fn(task)` for every task on `executor`; returns {shard index: result}. See the module doc."""
    if retries < 0:
        raise TaftError(f"retries must be ≥ 0, got {retries}")
    total = len(tasks)
    attempts = {t.index: 0 for t in tasks}
    running: dict[Future, ShardTask] = {}
    results: dict[int, ShardResult] = {}
    failures: dict[int, tuple[int, str]] = {}
    portable = {t.index: getattr(executor, "portable", lambda t: t)(t) for t in tasks}
    bar = progress_bar(total=total, disable=not progress, desc="shards", unit="shard", file=sys.stderr)

    def say(line: str) -> None:
        if progress:
            bar.write(line, file=sys.stderr)

    def submit(task: ShardTask) -> None:
        attempts[task.index] += 1
        try:
            running[executor.submit(fn, portable[task.index])] = task
        except (BrokenProcessPool, RuntimeError) as e:  # executor unusable (broken pool, shut down)
            failures[task.index] = (attempts[task.index], _message(e, executor))

    def handle(future: Future) -> None:
        task = running.pop(future)
        error = future.exception()
        if error is None:
            result = future.result()
            result.attempts = attempts[task.index]
            results[task.index] = result
            if on_result is not None:
                on_result(result)
            for message in result.warnings:
                warnings.warn(f"shard {task.index}: {message}", stacklevel=2)
            bar.update(1)
            loss = result.metrics.get("final_train_loss")
            say(f"shard {task.index} done ({len(results)}/{total}): {len(result.ids)} examples, "
                + (f"final loss {loss:.4g}, " if loss is not None else "")
                + f"{result.seconds:.1f} s on {result.worker}"
                + (f", attempt {result.attempts}" if result.attempts > 1 else ""))
        elif attempts[task.index] <= retries:
            say(f"shard {task.index} failed (attempt {attempts[task.index]}), retrying: {_message(error, executor)}")
            submit(task)
        else:
            failures[task.index] = (attempts[task.index], _message(error, executor))
            bar.update(1)
            say(f"shard {task.index} FAILED after {attempts[task.index]} attempts: {_message(error, executor)}")

    try:
        for task in tasks:
            submit(task)
            for future in [f for f in running if f.done()]:  # an inline executor finishes at submit
                handle(future)
        while running:
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in done:
                handle(future)
    except BaseException:  # Ctrl-C, or on_result failed: the tasks not started need not run
        for future in running:
            future.cancel()
        raise
    finally:
        bar.close()
    if failures:
        raise ShardTrainingError(failures, results)
    return results


__all__ = ["PUBLIC_METRICS", "BackboneSpec", "Deferred", "FeatureData", "FeatureUnion", "ShardResult", "ShardTask",
           "ShardTrainingError", "backbone_ref", "feature_ids", "run_shards", "shard_data", "train_shard"]
