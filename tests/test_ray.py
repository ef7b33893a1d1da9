"""Shard training on a real (local) Ray cluster: Δw bit-identical to the process pool and inline executors,
per-shard progress, workers without the driver's feature cache (rows through the object store), faults (a
SIGKILLed worker is retried; a shard that keeps dying is reported by index and the store stays consistent; a
killed driver leaves a store that `taft store resume` completes on Ray or locally), `--ray-address`, GPUs per
shard, bad input. (Ray not installed: test_parallel.)

One Ray instance serves the module (started by `ray.init` here; the CLI subprocesses attach to its address)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from helpers import bad
from taft import TaftError
from taft.cli import main
from taft.parallel import RayExecutor, ShardTrainingError, run_shards, train_shard
from taft.parallel.ray_cluster import NodeFeatures
from taft.store import Execution, ModelStore
from taft.store.layout import StoreLayout
from taft.store.layout import CRASH_ENV, CRASH_EXIT
from helpers import make_classes
from test_parallel import shard_tensors, tasks
from test_store import CONFIG, INLINE, K, composed_delta, create, same_tensors, tiny_features

REPO = Path(__file__).resolve().parents[1]
SESSION_DIR = Path(f"/tmp/taft-ray-{os.getpid()}")  # short: Ray's socket paths must stay under 108 bytes


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance of 2 CPUs and one nominal GPU (a resource count; none is used); its address."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's task functions travel by value
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, _temp_dir=str(SESSION_DIR))
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="module")
def data():
    return tiny_features()


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    bb, cf = data
    return create(tmp_path_factory.mktemp("ref") / "s", cf, bb, CONFIG, shards=K, threads=1)


@pytest.mark.slow
def test_ray_gives_the_process_pool_and_inline_delta_with_progress_per_shard(cluster, data, reference, tmp_path,
                                                                            capsys):
    bb, cf = data
    on_ray = create(tmp_path / "ray", cf, bb, CONFIG, shards=K, execution=Execution("ray"), threads=1)
    err = capsys.readouterr().err
    for i in range(K):
        assert f"shard {i} done (" in err
    workers = {line.rsplit(" on ", 1)[1] for line in err.splitlines() if " done (" in line}
    assert all(int(w.rsplit(":", 1)[1]) != os.getpid() for w in workers)  # in Ray workers, not here
    pool = create(tmp_path / "process", cf, bb, CONFIG, shards=K,
                  execution=Execution("process", workers=2, progress=False), threads=1)
    assert ModelStore(on_ray).manifest.threads == ModelStore(reference).manifest.threads == 1
    for x, y, z in zip(shard_tensors(on_ray), shard_tensors(pool), shard_tensors(reference)):
        assert same_tensors(x, y) and same_tensors(x, z)
    assert same_tensors(composed_delta(on_ray), composed_delta(reference))


def where_rows_came_from(task) -> str:
    return "node cache" if task.data.local() is not None else "object store"


@pytest.mark.slow
def test_workers_without_the_driver_cache_get_the_rows_through_the_object_store(cluster, data, reference,
                                                                                 tmp_path):
    bb, cf = data
    elsewhere = RayExecutor(runtime_env={"env_vars": {"TAFT_CACHE": str(tmp_path / "other-node-cache")}})
    here = RayExecutor()
    ts = tasks(data, 2)
    for ex, want in ((here, "node cache"), (elsewhere, "object store")):
        portable = [ex.portable(t) for t in ts]
        assert all(isinstance(t.data, NodeFeatures) for t in portable)
        assert [ex.submit(where_rows_came_from, t).result() for t in portable] == [want, want]
    other = create(tmp_path / "s", cf, bb, CONFIG, shards=K, execution=Execution(elsewhere, progress=False),
                   threads=1)
    assert not (tmp_path / "other-node-cache" / "features").exists()  # the workers computed no features
    for x, y in zip(shard_tensors(other), shard_tensors(reference)):
        assert same_tensors(x, y)


class SleepUntilKilled:
    """A shard task whose first attempt writes its worker's pid to `marker` and then waits (to be SIGKILLed)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __call__(self, task):
        if not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            time.sleep(600)
        return train_shard(task)


def kill_when_started(marker: Path, killed: list[int]) -> None:
    """SIGKILL the pid in `marker` once it appears (a loaded machine may take minutes to start a Ray worker)."""
    deadline = time.monotonic() + 500
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if marker.exists():
        pid = int(marker.read_text())
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)


@pytest.mark.slow
def test_a_ray_worker_sigkilled_mid_shard_is_retried(cluster, data, tmp_path, capsys):
    ts = tasks(data, 1)
    marker, killed = tmp_path / "pid", []
    killer = threading.Thread(target=kill_when_started, args=(marker, killed))
    killer.start()
    results = run_shards(ts, RayExecutor(), retries=1, fn=SleepUntilKilled(marker))
    killer.join()
    assert len(killed) == 1 and results[0].attempts == 2 and int(results[0].worker.rsplit(":", 1)[1]) != killed[0]
    assert "shard 0 failed (attempt 1), retrying: the Ray worker process died" in capsys.readouterr().err
    assert same_tensors(results[0].tensors, train_shard(ts[0]).tensors)


def die(task):
    os.kill(os.getpid(), signal.SIGKILL)


class KillShard(RayExecutor):
    """Ray, but the worker running shard `index` is SIGKILLed on every attempt."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def submit(self, fn, /, *args, **kwargs):
        return super().submit(die if args[0].index == self.index else fn, *args, **kwargs)


@pytest.mark.slow
def test_a_shard_that_keeps_dying_is_reported_by_index_and_the_store_stays_consistent(cluster, data, reference,
                                                                                      tmp_path):
    bb, cf = data
    root = tmp_path / "s"
    with pytest.raises(ShardTrainingError, match=r"1 of 3 shards failed: shard 1 \(2 attempts\): the Ray worker "
                                                 r"process died"):
        create(root, cf, bb, CONFIG, shards=K, execution=Execution(KillShard(1), progress=False), threads=1)
    store = ModelStore(root)
    report = store.verify()
    assert [p for p in report.problems if "creation" not in p] == []  # only "interrupted: rerun it"
    create(root, cf, bb, CONFIG, shards=K, execution=Execution("ray", progress=False), threads=1)
    assert store.verify().ok and same_tensors(composed_delta(root), composed_delta(reference))

    m = store.manifest
    ids = [m.shards[0].ids[0], m.shards[1].ids[0]]
    before = composed_delta(root)
    with pytest.raises(ShardTrainingError, match=r"1 of 2 shards failed: shard 1 \(2 attempts\)"):
        store.forget(ids, "retrain", backbone=bb, execution=Execution(KillShard(1), progress=False))
    report = store.verify()
    assert report.ok and "did not commit" in report.notes[0]  # the old state is in force
    assert same_tensors(composed_delta(root), before)
    store.forget(ids, "retrain", backbone=bb, execution=Execution("ray", progress=False))
    expected = Path(shutil.copytree(reference, tmp_path / "expected"))
    ModelStore(expected).forget(ids, "retrain", backbone=bb, execution=INLINE)
    assert same_tensors(composed_delta(root), composed_delta(expected))


# ------------------------------------------------------------------------------------------------------------ CLI
TINY = ["--image-size", "28", "--epochs", "1", "--lr", "1e-3", "--threads", "1", "--shards", "3"]


def taft(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "taft.cli", *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def drivers() -> int:
    """Drivers that have attached to the module's Ray instance (one core-driver log each)."""
    return len(list(SESSION_DIR.glob("session_latest/logs/python-core-driver-*.log")))


@pytest.mark.slow
def test_cli_on_ray_address_killed_driver_resumes_on_ray_or_locally(cluster, tmp_path, capsys):
    images = make_classes(tmp_path / "data", classes=("ant", "bee", "cow"), per_class=4)
    inline = tmp_path / "inline"
    assert main(["shards", "train", "--min-steps", "0", "--data", str(images), "--store", str(inline), "--executor", "inline", "--quiet",
                 *TINY]) == 0
    root = tmp_path / "store"
    before = drivers()
    r = taft("shards", "train", "--min-steps", "0", "--data", str(images), "--store", str(root), "--executor", "ray", "--ray-address",
             cluster, *TINY, env={CRASH_ENV: "after-shard-file"})  # the driver dies after its first shard
    assert r.returncode == CRASH_EXIT, r.stderr
    assert drivers() == before + 1  # it attached to this cluster instead of starting its own
    assert not StoreLayout(root).manifest.exists()
    local = Path(shutil.copytree(root, tmp_path / "local"))
    r = taft("store", "resume", str(root), "--executor", "ray", "--ray-address", cluster, "--quiet")
    assert r.returncode == 0 and "completed the store's creation" in r.stdout, r.stderr
    assert main(["store", "resume", str(local), "--executor", "inline", "--quiet"]) == 0
    assert "completed the store's creation" in capsys.readouterr().out
    for s in (root, local):
        assert ModelStore(s).verify().ok and same_tensors(composed_delta(s), composed_delta(inline))


def test_unreachable_ray_address_fails_before_the_store_is_touched(tmp_path, capsys):
    images = make_classes(tmp_path / "data", per_class=2)
    store = tmp_path / "store"
    with socket_nobody_listens_on() as port:
        bad(capsys, ["shards", "train", "--min-steps", "0", "--data", str(images), "--store", str(store), "--executor", "ray",
                     "--ray-address", f"127.0.0.1:{port}", "--quiet"],
            f"cannot reach the Ray cluster at 127.0.0.1:{port}")
    assert not store.exists()
    bad(capsys, ["shards", "train", "--min-steps", "0", "--data", str(images), "--store", str(store), "--executor", "ray",
                 "--ray-address", "nowhere", "--quiet"], "is not host:port")
    bad(capsys, ["shards", "train", "--min-steps", "0", "--data", str(images), "--store", str(store), "--ray-address", "127.0.0.1:1",
                 "--quiet"], "--ray-address applies to the ray executor only")
    bad(capsys, ["shards", "train", "--min-steps", "0", "--data", str(images), "--store", str(store), "--executor", "ray",
                 "--ray-gpus-per-shard", "-1", "--quiet"], "--ray-gpus-per-shard must be ≥ 0")
    assert not store.exists()


class socket_nobody_listens_on:
    """A local TCP port that refuses connections (bound, never listening), for the duration of the block."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


def gpus_given(task) -> list:
    return [int(g) for g in ray.get_gpu_ids()]


@pytest.mark.slow
def test_gpus_per_shard_are_requested_from_ray(cluster, data):
    """The module's Ray instance declares one (nominal) GPU: a task is given it only when it asks for it."""
    task = tasks(data, 1)[0]
    assert RayExecutor().submit(gpus_given, task).result() == []
    assert RayExecutor(num_gpus=0.5).submit(gpus_given, task).result() == [0]
    with pytest.raises(TaftError, match="GPUs per shard must be a number ≥ 0"):
        RayExecutor(num_gpus=-1)


@pytest.mark.slow
def test_benchmark_smoke(cluster, capsys):
    """benchmarks/ray_overhead.py at a tiny size: CIFAR-10 mini when shared/ is beside the repository (it is not
    shipped to users), else synthetic images; every executor gives the same Δw."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import ray_overhead
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    cifar = REPO.parent / "shared" / "data" / "cifar10-mini"
    data = ["--data", str(cifar), "--per-class", "2"] if (cifar / "train").is_dir() else ["--synthetic", "2"]
    r = ray_overhead.main([*data, "--image-size", "28", "--shards", "2", "--epochs", "1", "--workers", "1"])
    assert set(r["wall_s"]) == {"inline", "process", "ray"} and r["identical"] and r["n"] == 20
    assert r["ray_over_process"] == r["wall_s"]["ray"] / r["wall_s"]["process"]
    out = capsys.readouterr().out
    assert "Ray / process pool:" in out and "bit-identical across executors: yes" in out
