"""Ctrl-C on `taft shards train` (issue: store defects, 1): the process pool stops at once, the shards already
finished stay in the creation's journal, the user is told how to continue, and a rerun trains only the rest."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import make_classes

SHARDS = 5
# Each shard trains MIN_STEPS steps (~15 ms each here): a few seconds, so that the shards left when the first one
# is done take far longer than an interrupted run may take to stop.
MIN_STEPS = "300"
STOP_WITHIN_S = 10


def finished(store: Path) -> dict[str, dict]:
    """The shards the creation's journal records as finished ({} while there is none)."""
    try:
        return json.loads((store / "pending.json").read_text())["completed"]
    except (FileNotFoundError, ValueError, KeyError):
        return {}


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "killpg"), reason="sends Ctrl-C's SIGINT to a process group (POSIX)")
def test_ctrl_c_stops_shards_train_at_once_and_a_rerun_trains_only_the_rest(tmp_path):
    data = make_classes(tmp_path / "data", classes=("ant", "bee", "cow"), per_class=4)
    store = tmp_path / "store"
    command = [sys.executable, "-m", "taft", "shards", "train", "--data", str(data), "--store", str(store),
               "--shards", str(SHARDS), "--threads", "1", "--min-steps", MIN_STEPS, "--image-size", "28",
               "--epochs", "1"]
    env = {**os.environ, "TAFT_CACHE": str(tmp_path / "cache")}
    stopped_after, stderr = interrupt([*command, "--workers", "1"], store, signal.SIGINT, env, tmp_path / "1.txt")
    assert f"taft store resume {store}" in stderr and "rerun the same command" in stderr
    assert stopped_after < STOP_WITHIN_S, f"took {stopped_after:.1f} s to stop"
    kept = finished(store)
    assert 1 <= len(kept) < SHARDS - 1

    resume = [sys.executable, "-m", "taft", "store", "resume", str(store), "--workers", "1"]
    stopped_after, stderr = interrupt(resume, store, signal.SIGTERM, env, tmp_path / "2.txt", after=len(kept))
    assert stopped_after < STOP_WITHIN_S, f"took {stopped_after:.1f} s to stop"
    kept = finished(store)
    assert len(kept) < SHARDS

    rerun = subprocess.run([*command, "--workers", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    trained = {int(i) for i in re.findall(r"shard (\d+) done", rerun.stderr)}
    assert trained == set(range(SHARDS)) - {int(i) for i in kept}
    manifest = json.loads((store / "manifest.json").read_text())
    assert all(manifest["shards"][int(i)]["sha256"] == e["sha256"] for i, e in kept.items())


def interrupt(command: list[str], store: Path, signum: int, env: dict[str, str], log: Path, after: int = 0) \
        -> tuple[float, str]:
    """Run `command` until the store's journal records more than `after` finished shards, then send `signum` to
    its process group (as Ctrl-C in a terminal does); (seconds it took to stop, its stderr). The command must
    stop with 128 + signum and say how to continue."""
    with open(log, "w") as err:  # its own session: a signal to its group reaches its workers too
        # SIGINT as in a terminal: a suite started in the background (nohup, `&`) ignores it, and children inherit that
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while len(finished(store)) <= after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(finished(store)) > after, f"no shard finished: {log.read_text()[-2000:]}"
        os.killpg(proc.pid, signum)
        t0 = time.monotonic()
        proc.wait(timeout=120)
        stopped_after = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    stderr = log.read_text()
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert "rerun the same command" in stderr, stderr[-2000:]
    assert "leaked" not in stderr and "Traceback" not in stderr, stderr[-2000:]
    return stopped_after, stderr
