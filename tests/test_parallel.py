"""Parallel shard training: process pool vs in-process give identical Δw, any Executor works, failed shards are
retried or reported by index (never silently missing), an interrupted creation resumes, Ray is optional."""

from __future__ import annotations

import pickle
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import bad
from taft import TaftError
from taft.parallel import (InlineExecutor, RayExecutor, ShardTask, ShardTrainingError, make_executor, run_shards,
                           shard_data, train_shard)
from taft.store import Execution, ModelStore
from taft.checkpoint import read_checkpoint
from taft.store.layout import StoreLayout
from taft.store.journal import read_pending
from helpers import make_classes
from helpers import CLASSES
from test_store import CONFIG, K, QUIET, create, same_tensors, tiny_features, tiny_model


@pytest.fixture(scope="module")
def data():
    return tiny_features()


def shard_tensors(root: Path) -> list[dict[str, torch.Tensor]]:
    return [read_checkpoint(ModelStore(root).shard_path(i)).tensors for i in range(K)]


@pytest.mark.slow
def test_process_pool_and_inline_give_identical_delta(data, tmp_path):
    bb, cf = data
    a = create(tmp_path / "process", cf, bb, CONFIG, shards=K, execution=Execution("process", workers=2, progress=False))
    b = create(tmp_path / "inline", cf, bb, CONFIG, shards=K, execution=Execution("inline", workers=2, progress=False))
    assert ModelStore(a).manifest.threads == ModelStore(b).manifest.threads
    for x, y in zip(shard_tensors(a), shard_tensors(b)):
        assert same_tensors(x, y)
    assert same_tensors(read_checkpoint(ModelStore(a).composed_path).tensors,
                        read_checkpoint(ModelStore(b).composed_path).tensors)
    # any concurrent.futures.Executor works (Dask's client.get_executor() is one)
    with ThreadPoolExecutor(max_workers=1) as ex:
        c = create(tmp_path / "thread", cf, bb, CONFIG, shards=K, execution=Execution(ex, progress=False),
                   threads=ModelStore(a).manifest.threads)
    for x, y in zip(shard_tensors(a), shard_tensors(c)):
        assert same_tensors(x, y)


def test_shard_data_is_a_cheap_sorted_view_of_the_cache(data):
    _, cf = data
    ids = [cf.ids[7], cf.ids[2], cf.ids[30]]
    view = shard_data(cf, ids)
    assert view.ids == sorted(ids) and view.path == cf.path
    assert len(pickle.dumps(view)) < 4000  # a path and row numbers, not the features
    x, y, got = shard_data((torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 0]), ["c", "a", "b"]), ["b", "c"])
    assert got == ["b", "c"] and x.tolist() == [[4.0, 5.0], [0.0, 1.0]] and y.tolist() == [0, 0]
    with pytest.raises(TaftError, match="not in the training features"):
        shard_data(cf, ["nope"])


def tasks(data, n: int = 2) -> list[ShardTask]:
    bb, cf = data
    model = tiny_model(bb)
    return [ShardTask(index=i, spec=model.spec, config=replace(CONFIG, seed=i), data=shard_data(cf, cf.ids[i::n]),
                      class_names=tuple(CLASSES), backbone=bb, fingerprint=model.fingerprint) for i in range(n)]


class Flaky:
    """train_shard that fails the first `fails[index]` calls for a shard."""

    def __init__(self, fails: dict[int, int]):
        self.fails, self.calls = dict(fails), {}

    def __call__(self, task: ShardTask):
        self.calls[task.index] = self.calls.get(task.index, 0) + 1
        if self.calls[task.index] <= self.fails.get(task.index, 0):
            raise RuntimeError(f"flaky failure {self.calls[task.index]}")
        return train_shard(task)


def test_a_failed_shard_is_retried_then_reported_by_index(data, capsys):
    ts = tasks(data)
    seen = []
    results = run_shards(ts, InlineExecutor(), retries=1, fn=Flaky({1: 1}), on_result=lambda r: seen.append(r.index))
    assert sorted(results) == [0, 1] and results[1].attempts == 2 and sorted(seen) == [0, 1]
    assert "shard 1 failed (attempt 1), retrying: RuntimeError: flaky failure 1" in capsys.readouterr().err
    with pytest.raises(ShardTrainingError, match=r"1 of 2 shards failed: shard 0 \(2 attempts\): RuntimeError: "
                                                 r"flaky failure 2") as e:
        run_shards(ts, InlineExecutor(), retries=1, fn=Flaky({0: 5}), progress=False)
    assert sorted(e.value.results) == [1] and list(e.value.failures) == [0]
    with pytest.raises(ShardTrainingError, match=r"shard 1 \(1 attempt\)"):
        run_shards(ts, InlineExecutor(), retries=0, fn=Flaky({1: 1}), progress=False)


def test_an_interrupted_run_cancels_the_tasks_not_started():
    """Ctrl-C while shards run (here: in `on_result`, the first time a shard is done): the queued tasks are
    cancelled, so no executor keeps training shards whose results nobody will take."""
    started = []

    def fn(task):
        started.append(task.index)
        time.sleep(0.05)  # all tasks are submitted before the first is done
        return SimpleNamespace(index=task.index, ids=[], metrics={}, seconds=0.0, worker="w")

    def on_result(result):
        raise KeyboardInterrupt

    with ThreadPoolExecutor(max_workers=1) as ex, pytest.raises(KeyboardInterrupt):
        run_shards([SimpleNamespace(index=i) for i in range(20)], ex, on_result=on_result, fn=fn, progress=False)
    assert len(started) < 5


class FailShard(InlineExecutor):
    """Runs inline, but every task of shard `index` fails."""

    def __init__(self, index: int):
        self.index = index

    def submit(self, fn, /, *args, **kwargs):
        if args and getattr(args[0], "index", None) == self.index:
            f: Future = Future()
            f.set_exception(RuntimeError("worker lost"))
            return f
        return super().submit(fn, *args, **kwargs)


@pytest.mark.parametrize("how", ["rerun", "resume"])
def test_store_creation_with_a_failing_shard_fails_clearly_and_a_rerun_resumes(data, tmp_path, how):
    bb, cf = data
    root = tmp_path / "s"
    with pytest.raises(TaftError, match=r"1 of 3 shards failed: shard 2 \(2 attempts\): RuntimeError: worker lost"):
        create(root, cf, bb, CONFIG, shards=K, execution=Execution(FailShard(2), progress=False), threads=1)
    layout = StoreLayout(root)
    pending = read_pending(layout)
    assert not layout.manifest.exists() and sorted(pending.completed) == [0, 1]
    finished = {i: layout.path(pending.completed[i].file).stat().st_mtime_ns for i in (0, 1)}
    if how == "rerun":
        create(root, cf, bb, CONFIG, shards=K, threads=1)
    else:
        assert ModelStore(root).resume(backbone=bb, execution=QUIET) == "completed the store's creation"
    m = ModelStore(root).manifest
    assert [s.status for s in m.shards] == ["trained"] * K and not layout.pending.exists()
    for i in (0, 1):  # reused, not retrained
        assert layout.path(m.shards[i].file).stat().st_mtime_ns == finished[i]
    ref = create(tmp_path / "ref", cf, bb, CONFIG, shards=K, threads=1)
    assert same_tensors(read_checkpoint(ModelStore(root).composed_path).tensors,
                        read_checkpoint(ModelStore(ref).composed_path).tensors)


def test_executor_choices():
    assert isinstance(make_executor("inline"), InlineExecutor)
    with pytest.raises(TaftError, match="executor must be one of process, inline, ray"):
        make_executor("dask")
    with pytest.raises(TaftError, match="workers"):
        make_executor("process", workers=0)
    with pytest.raises(TaftError, match="ray executor only"):
        make_executor("process", ray_address="ray://x:10001")


def test_ray_not_installed_names_the_install_command(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(TaftError, match=r"needs Ray, which is not installed: pip install 'taft-torch\[ray\]'"):
        RayExecutor()
    images = make_classes(tmp_path / "data", per_class=2)
    bad(capsys, ["shards", "train", "--min-steps", "0", "--data", str(images), "--store", str(tmp_path / "s"), "--executor", "ray",
                 "--quiet"], "pip install 'taft-torch[ray]'")
    assert not (tmp_path / "s").exists()


def test_a_shards_training_warnings_reach_the_caller_named_by_shard(data):
    """Warnings in a worker would be lost (or printed raw); each comes back with its shard's index."""
    import warnings

    ts = [replace(t, config=replace(t.config, epochs=1)) for t in tasks(data)]  # few steps: fit warns of them
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run_shards(ts, InlineExecutor(), progress=False)
    assert all(any("optimizer step" in m for m in r.warnings) for r in results.values())
    said = [str(w.message) for w in caught]
    assert any(m.startswith("shard 0: only ") for m in said) and any(m.startswith("shard 1: only ") for m in said)
