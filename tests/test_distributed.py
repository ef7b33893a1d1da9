"""Data-parallel training under torchrun (`taft.train.distributed`): each rank's part of every global batch, the
torchrun environment, the refusals, and end to end with two gloo ranks (`python -m torch.distributed.run
--nproc-per-node 2 -m taft train ...`): the same model as one process, one run directory, and a rank that dies or
stalls ends the run with one line per rank and no checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import bad, write_image
from taft.cli import main
from taft.errors import TaftError
from taft.train.distributed import (FAULT_ENV, TIMEOUT_ENV, TIMEOUT_S, check_rank_device, launched, rank_device,
                                    refuse_private, timeout_s)
from taft.train.steps import PermutationSampler, rank_part

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # a free port
SRC = str(Path(__file__).resolve().parents[1] / "src")
TESTS = str(Path(__file__).resolve().parent)


# ----------------------------------------------------------------------------------------------- batch parts
@pytest.mark.parametrize("n, batch, world", [(17, 8, 2), (10, 4, 3), (5, 8, 2), (9, 3, 1)])
def test_each_global_batch_is_the_union_of_the_ranks_parts(n, batch, world):
    single = PermutationSampler(n, batch, seed=7)
    ranks = [PermutationSampler(n, batch, seed=7, part=(r, world)) for r in range(world)]
    for _ in range(3):  # epochs: every rank's generator advances with the single process's
        parts = [s.epoch() for s in ranks]
        for i, whole in enumerate(single.epoch()):
            pieces = [p[i] for p in parts]
            assert torch.equal(torch.cat(pieces), whole)  # in order, no example twice, none missing
            sizes = [len(p) for p in pieces]
            assert max(sizes) - min(sizes) <= 1
    assert all(s.steps_per_epoch == single.steps_per_epoch for s in ranks)
    assert len(rank_part(torch.arange(1), 1, 2)) == 0  # a short last batch can leave a rank nothing


# ----------------------------------------------------------------------------------------------- environment
@pytest.fixture
def rank_zero_of_two(monkeypatch):
    """This process looks like rank 0 of a two-rank torchrun job (no process group is started by the refusals)."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)


def test_the_torchrun_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", TIMEOUT_ENV):
        monkeypatch.delenv(name, raising=False)
    assert launched() is None and timeout_s() == TIMEOUT_S
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert launched() is None  # a job of one process trains as one process
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    launch = launched()
    assert (launch.rank, launch.world, launch.local_rank) == (3, 4, 1)
    assert rank_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert rank_device("auto") == torch.device("cpu")
    with pytest.raises(TaftError, match="runs on CPUs .gloo. or CUDA GPUs"):
        check_rank_device(torch.device("mps"), launch)
    with pytest.raises(TaftError, match=r"rank 3 \(local rank 1\) was given cuda:0; use device=auto"):
        check_rank_device(torch.device("cuda", 0), launch)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(TaftError, match="RANK 4, WORLD_SIZE 4"):
        launched()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(TaftError, match="must be integers"):
        launched()
    monkeypatch.setenv(TIMEOUT_ENV, "2.5")
    assert timeout_s() == 2.5
    monkeypatch.setenv(TIMEOUT_ENV, "0")
    with pytest.raises(TaftError, match=TIMEOUT_ENV):
        timeout_s()


def test_dp_and_stores_are_refused_under_torchrun_before_any_work(rank_zero_of_two, tmp_path, capsys):
    from taft.parallel import Execution
    from taft.privacy import DPConfig

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TaftError, match="DP-SGD training does not run under torchrun"):
        refuse_private(DPConfig(epsilon=3.0, delta=1e-5))
    refuse_private(None)
    bad(capsys, ["train", "--data", str(tmp_path / "absent"), "--dp", "--epsilon", "3", "--delta", "1e-5",
             "--out", str(tmp_path / "run")],
        "DP-SGD training does not run under torchrun")
    assert not (tmp_path / "run").exists()
    bad(capsys, ["shards", "train", "--data", str(tmp_path / "absent"), "--store", str(tmp_path / "store")],
        "taft shards does not run under torchrun")
    assert not (tmp_path / "store").exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # SIGTERM is an error only while a command runs
    with pytest.raises(TaftError, match="a model store's training does not run under torchrun"):
        with Execution().connected():
            pass


# ----------------------------------------------------------------------------------------------- two ranks
# Two gloo ranks on the bundled DINOv2 at 28 px (2×2 patches): 17 training images in batches of 8, so the global
# batches are 8, 8, 1 and rank 1 gets no example of the last one.
FAST = ["--image-size", "28", "--epochs", "3", "--batch-size", "8", "--quiet"]
# SGD: its step is linear in the gradient, so the weights carry only the gradients' float summation-order error.
# (AdamW divides each component by its running RMS: where the true gradient is zero, e.g. the attention key bias,
# softmax being shift-invariant, it scales rounding noise up to ±lr per step, and one process with another thread
# count differs from itself as much; measured on this run with AdamW: 4e-3 on qkv.bias either way.)
SGD = ["--optimizer", "sgd", "--loss", "ce", "--lr", "1e-4", "--head-lr", "1e-4"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp-data")
    for c, (name, count) in enumerate((("ant", 6), ("bee", 6), ("cat", 5))):
        for i in range(count):
            write_image(root / "train" / name / f"{i}.png", seed=100 * c + i, size=(20 + c, 20))
        for i in range(2):
            write_image(root / "val" / name / f"{i}.png", seed=1000 + 100 * c + i, size=(20, 20))
    return root


def torchrun(cwd: Path, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 argv` in `cwd`; on a test timeout the whole job (its own session) is killed."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS]), **env}
    with subprocess.Popen([*TORCHRUN, *argv], cwd=cwd, env=environment, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def data_args(folders: Path) -> list[str]:
    return ["--data", str(folders / "train"), "--val-data", str(folders / "val"), "--val-fraction", "0"]


@pytest.mark.slow
def test_two_ranks_train_the_one_process_model(folders, tmp_path):
    proc = torchrun(tmp_path, ["-m", "taft", "train", *data_args(folders), *FAST, *SGD, "--out", "ddp",
                               "--threads", "1"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # rank 0 alone writes: one run directory
    assert proc.stdout.count("run directory: ddp") == 1  # and reports
    threads = torch.get_num_threads()
    try:  # one process on one thread, as each rank: the same summation order within a part
        assert main(["train", *data_args(folders), *FAST, *SGD, "--out", str(tmp_path / "one"), "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)

    ddp, one = load_file(tmp_path / "ddp" / "checkpoint.safetensors"), load_file(tmp_path / "one" /
                                                                                 "checkpoint.safetensors")
    assert ddp.keys() == one.keys()
    for name, value in one.items():
        # Float32 gradients summed in another order (two partial sums, other matmul batch shapes), 9 SGD steps:
        # measured 5.1e-7 of a tensor's largest entry at most (one process on 2 threads differs from itself on 1
        # thread by 2.2e-6). 1e-5 leaves a 20× margin; a wrong step (parts weighted equally although they hold 1
        # and 0 examples, a part dropped or counted twice) moves them by ~30 % of their scale (measured: 3.5e-1).
        assert (ddp[name] - value).abs().max() <= 1e-5 * value.abs().max(), name
    records = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("ddp", "one")]
    assert [r["lr"] for r in records[0]] == [r["lr"] for r in records[1]]  # the same schedule, step for step
    for a, b in zip(*records):  # the global batches' losses, summed over the ranks
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_top1"] == b["val_top1"]
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("ddp", "one")]
    assert metrics[0]["steps"] == metrics[1]["steps"] == 9 and metrics[0]["n_train"] == 17


def assert_stopped_without_checkpoint(proc: subprocess.CompletedProcess, out: Path) -> list[str]:
    """The job failed; each surviving rank said why in one `taft: error:` line (no taft traceback; torchrun's own
    report follows); no checkpoint, final metrics or temporary file was left. Returns the error lines."""
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("taft: error:")]
    assert errors, proc.stderr
    assert not re.search(r'File ".*/taft/', proc.stderr), proc.stderr
    left = sorted(p.name for p in out.iterdir())
    assert "checkpoint.safetensors" not in left and "metrics.json" not in left
    assert not [name for name in left if name.endswith(".tmp")], left
    return errors


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_with_one_line_and_no_checkpoint(folders, tmp_path):
    proc = torchrun(tmp_path, ["-m", "taft", "train", *data_args(folders), *FAST, "--out", "run"],
                    **{FAULT_ENV: "1:exit"})  # rank 1 vanishes at its second step, as a killed process would
    errors = assert_stopped_without_checkpoint(proc, tmp_path / "run")
    assert len(errors) == 1 and "rank 0" in errors[0], errors  # the survivor, stopped by torchrun or by gloo


@pytest.mark.slow
def test_a_stalled_rank_becomes_an_error_after_the_timeout(folders, tmp_path):
    proc = torchrun(tmp_path, ["-m", "taft", "train", *data_args(folders), *FAST, "--out", "run"],
                    **{FAULT_ENV: "1:stall", TIMEOUT_ENV: "2"})
    errors = assert_stopped_without_checkpoint(proc, tmp_path / "run")
    assert any("rank 0" in e and "did not answer within 2 s" in e for e in errors), errors


DIFFERING_DATA = """
import os, sys
import torch
from helpers import TINY_VIT
from reference import random_backbone
import taft

rank = int(os.environ["RANK"])
backbone = random_backbone(TINY_VIT, 12, seed=0, dtype=torch.float32)
x = torch.randn(12, 10, 32, generator=torch.Generator().manual_seed(0))
y = (torch.arange(12) + rank) % 2  # rank 1's labels differ
try:
    taft.fit(taft.Classifier(backbone, ["a", "b"], k=1), (x, y), taft.TrainConfig(epochs=1, batch_size=4),
             progress=False)
except taft.TaftError as e:
    print(f"error: {e}")
    sys.exit(3)
"""


@pytest.mark.slow
def test_ranks_given_different_data_refuse_to_train(tmp_path):
    script = tmp_path / "fit.py"
    script.write_text(DIFFERING_DATA)
    proc = torchrun(tmp_path, [str(script)])
    assert proc.returncode != 0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert lines and all("rank 1's model, settings or training data differs from rank 0's" in line
                         for line in lines), proc.stdout + proc.stderr
