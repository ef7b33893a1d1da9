"""Crash safety: a forget killed at any point leaves a store that `verify` accepts (after repair where needed),
and rerunning the forget completes it with the same result as an uninterrupted forget.

The forget runs in a subprocess killed either at a named step (`TAFT_TEST_CRASH_AT=<step>` makes
`taft.store.layout.crashpoint` call `os._exit`) or by a real SIGKILL at a random moment (steps slowed by
`TAFT_TEST_STEP_DELAY` so the kill lands inside the operation).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taft.store import ModelStore
from taft.store.layout import CRASH_ENV, CRASH_EXIT, DELAY_ENV, StoreLayout
from taft.store.manifest import load_manifest
from test_store import CONFIG, INLINE, K, composed_delta, create, same_tensors, tiny_backbone, tiny_features

TESTS = Path(__file__).resolve().parent
SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from test_store import INLINE, tiny_backbone
from taft.store import ModelStore
print("ready", flush=True)
ModelStore({root!r}).forget(json.loads({ids!r}), {mode!r}, backbone=tiny_backbone(), execution=INLINE)
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    bb, cf = tiny_features()
    root = create(tmp_path_factory.mktemp("crash") / "base", cf, bb, CONFIG, shards=K)
    m = load_manifest(StoreLayout(root))
    ids = [m.shards[0].ids[1], m.shards[2].ids[0], m.shards[2].ids[4]]  # two shards retrain
    return root, ids


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory):
    """The uninterrupted forget, per mode: (composed Δw, manifest)."""
    root, ids = base
    out = {}
    for mode in ("retrain", "drop"):
        copy = Path(shutil.copytree(root, tmp_path_factory.mktemp("ref") / mode))
        ModelStore(copy).forget(ids, mode, backbone=tiny_backbone(), execution=INLINE)
        out[mode] = (composed_delta(copy), load_manifest(StoreLayout(copy)))
    return out


def start(root: Path, ids: list[str], mode: str, env: dict[str, str]) -> subprocess.Popen:
    code = SCRIPT.format(tests=str(TESTS), root=str(root), ids=json.dumps(ids), mode=mode)
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def check_recovery(root: Path, ids: list[str], mode: str, reference) -> None:
    store = ModelStore(root)
    report = store.verify(repair=True)
    assert report.ok, report.lines()
    assert store.verify().ok
    store.forget(ids, mode, backbone=tiny_backbone(), execution=INLINE)
    want_delta, want = reference[mode]
    got = load_manifest(StoreLayout(root))
    assert same_tensors(composed_delta(root), want_delta)
    for key in ("forgotten", "composition"):
        assert getattr(got, key) == getattr(want, key)
    assert [(s.status, s.ids) for s in got.shards] == [(s.status, s.ids) for s in want.shards]
    assert got.composed.shards == want.composed.shards
    after = store.verify()
    assert after.ok and not after.notes and not after.repaired, after.lines()
    layout = StoreLayout(root)
    assert not layout.pending.exists() and not layout.temp_files()
    assert len(layout.shard_files()) == sum(1 for s in got.shards if s.file)
    forgets = [e for e in store.audit() if e["op"] == "forget" and not e.get("noop")]
    assert len(forgets) == 1 and forgets[0]["ids"] == sorted(ids)


NOT_COMMITTED = "note: an interrupted forget of 3 ids"
COMPOSED_STALE = "problem: composed.safetensors does not match its hash"
UNFINISHED = "committed but did not finish its cleanup"


@pytest.mark.parametrize("mode, step, expect", [
    ("retrain", "after-pending", NOT_COMMITTED), ("retrain", "after-shard-file", NOT_COMMITTED),
    ("retrain", "after-composed", COMPOSED_STALE), ("retrain", "after-manifest", UNFINISHED),
    ("retrain", "after-audit", UNFINISHED), ("drop", "after-composed", COMPOSED_STALE),
    ("drop", "after-forgotten", UNFINISHED),
])
def test_forget_killed_at_a_step_recovers(base, reference, tmp_path, mode, step, expect):
    root, ids = base
    store = Path(shutil.copytree(root, tmp_path / "s"))
    proc = start(store, ids, mode, {CRASH_ENV: step})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == CRASH_EXIT, (out, err)
    assert "done" not in out
    lines = "\n".join(ModelStore(store).verify().lines())
    assert expect in lines, lines
    check_recovery(store, ids, mode, reference)


DELAY = "0.1"  # seconds per named step while a kill test runs (a forget here has ~8 steps)


@pytest.fixture(scope="module")
def duration(base, tmp_path_factory) -> float:
    """How long the slowed forget takes from "ready" to "done" on this machine (one uninterrupted run)."""
    root, ids = base
    proc = start(Path(shutil.copytree(root, tmp_path_factory.mktemp("timing") / "s")), ids, "retrain",
                 {DELAY_ENV: DELAY})
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    assert proc.stdout.readline().strip() == "done"
    proc.communicate(timeout=60)
    return time.perf_counter() - t0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_forget_sigkilled_at_a_random_moment_recovers(base, reference, duration, tmp_path, seed):
    root, ids = base
    store = Path(shutil.copytree(root, tmp_path / "s"))
    proc = start(store, ids, "retrain", {DELAY_ENV: DELAY})
    assert proc.stdout.readline().strip() == "ready"
    at = random.Random(seed).uniform(0, duration)
    time.sleep(at)
    os.killpg(proc.pid, signal.SIGKILL)  # the subprocess's own session: it and nothing else
    proc.communicate(timeout=60)
    assert proc.returncode in (-signal.SIGKILL, 0)
    print(f"killed at {at:.2f} s of {duration:.2f} s:", *ModelStore(store).verify().lines()[1:])
    check_recovery(store, ids, "retrain", reference)


def test_a_second_store_writer_says_whom_it_waits_for(tmp_path):
    """The store's lock names its holder: one warning line while waiting, then the operation goes on."""
    import fcntl
    import threading
    import warnings

    from taft.errors import TaftError
    from taft.store.layout import StoreLayout

    layout = StoreLayout(tmp_path / "store")
    layout.root.mkdir()
    with layout.locked():
        pass  # the lock file now names the last holder
    holder = open(layout.lock_file, "a+")
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX)  # another open file: blocks this process's next lock like a process
    holder.seek(0)
    holder.truncate(0)
    holder.write("4242\n")
    holder.flush()
    threading.Timer(0.5, lambda: fcntl.flock(holder.fileno(), fcntl.LOCK_UN)).start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TaftError, match=r"locked by a running operation \(pid 4242\); try again"):
            with layout.locked(wait=False):
                pass
        with layout.locked():
            assert layout.lock_file.read_text().strip() == str(os.getpid())
    holder.close()
    assert [str(w.message) for w in caught] == [f"store {layout.root} is locked by a running operation (pid 4242); "
                                                "waiting for it to end"]


# ------------------------------------------------------------------------------------------- add and import
GROW = """
import sys
sys.path.insert(0, {tests!r})
from test_store import INLINE, tiny_backbone
from test_store_living import features_of, new_images
from taft.store import ModelStore
store = ModelStore({root!r})
if {op!r} == "add":
    store.add(features_of(new_images("new")), shards=2, backbone=tiny_backbone(), execution=INLINE)
else:
    store.import_checkpoints({checkpoints!r})
print("done", flush=True)
"""


def grow(root: Path, op: str, checkpoints: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    code = GROW.format(tests=str(TESTS), root=str(root), op=op, checkpoints=checkpoints)
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def partner_shards(tmp_path_factory) -> list[str]:
    from test_store_living import features_of, new_images

    root = create(tmp_path_factory.mktemp("partner") / "p", features_of(new_images("new")), tiny_backbone(), CONFIG,
                  shards=2)
    return [str(ModelStore(root).shard_path(i)) for i in range(2)]


@pytest.mark.parametrize("op, step", [
    ("add", "after-shard-file"), ("import", "after-manifest"),
    pytest.param("add", "after-pending", marks=pytest.mark.slow),
    pytest.param("add", "after-composed", marks=pytest.mark.slow),
    pytest.param("add", "after-manifest", marks=pytest.mark.slow),
    pytest.param("add", "after-audit", marks=pytest.mark.slow),
    pytest.param("import", "after-shard-file", marks=pytest.mark.slow),
    pytest.param("import", "after-composed", marks=pytest.mark.slow),
])
def test_add_and_import_killed_at_a_step_recover(base, partner_shards, tmp_path, op, step):
    root, _ = base
    want = Path(shutil.copytree(root, tmp_path / "want"))
    assert grow(want, op, partner_shards).returncode == 0
    store = Path(shutil.copytree(root, tmp_path / "s"))
    crashed = grow(store, op, partner_shards, {CRASH_ENV: step})
    assert crashed.returncode == CRASH_EXIT and "done" not in crashed.stdout, crashed.stderr
    assert ModelStore(store).verify(repair=True).ok
    if step == "after-shard-file" and op == "add":  # completed by resume, from the journal alone
        assert "completed the addition of 24 examples" in ModelStore(store).resume(backbone=tiny_backbone(), execution=INLINE)
    else:
        rerun = grow(store, op, partner_shards)
        assert rerun.returncode == 0, rerun.stderr
    got, expected = load_manifest(StoreLayout(store)), load_manifest(StoreLayout(want))
    assert same_tensors(composed_delta(store), composed_delta(want))
    assert [(s.status, s.ids, s.seed) for s in got.shards] == [(s.status, s.ids, s.seed) for s in expected.shards]
    assert got.plan == expected.plan and [a.shards for a in got.additions] == [a.shards for a in expected.additions]
    after = ModelStore(store).verify()
    assert after.ok and not after.notes and not after.repaired, after.lines()
    ops = [e["op"] for e in ModelStore(store).audit() if not e.get("noop")]  # a rerun after repair: a logged no-op
    assert ops == [e["op"] for e in ModelStore(want).audit()]
    layout = StoreLayout(store)
    assert not layout.pending.exists() and len(layout.shard_files()) == len(got.trained())
