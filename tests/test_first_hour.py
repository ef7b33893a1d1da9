"""What a new user hits in their first hour with the CLI (issue 14): small data, messages in the CLI's own terms,
one-line warnings and no tracebacks, partial class sets in eval, predict with a bad path, comparable model
hashes, file modes, and warnings about runs that cannot have learned much."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from helpers import bad
from reference import random_backbone
from taft.backbones.vit import ViTConfig
from taft.cli import main
from taft.model import Classifier
from taft.train import TrainConfig, fit
from helpers import make_classes
from test_cli import FAST

pytestmark = pytest.mark.usefixtures("isolated_cache")


def run_cli(*argv: str, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    """`taft argv` as a user runs it: a separate process (its own warning and pipe handling)."""
    return subprocess.run([sys.executable, "-m", "taft.cli", *argv], capture_output=True, text=True, cwd=cwd,
                          env=os.environ.copy(), **kw)


@pytest.fixture(scope="module")
def three_class_run(tmp_path_factory):
    """A taft run on three classes (ant, bee, cow), no validation split."""
    root = tmp_path_factory.mktemp("three")
    data = make_classes(root / "data", classes=("ant", "bee", "cow"), per_class=4)
    out = root / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--val-fraction", "0", *FAST]) == 0
    return data, out


# ----------------------------------------------------------------------------------------- 1. small data trains
def test_tiny_folder_trains_with_one_validation_example_per_class(tmp_path, capsys):
    data = make_classes(tmp_path / "tiny", per_class=3)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *FAST]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n_val"] == 2 and metrics["n_train"] == 4 and metrics["eval_split"] == "val"


@pytest.mark.slow
def test_one_example_per_class_trains_without_validation_and_says_so(tmp_path):
    data = make_classes(tmp_path / "tiny", per_class=3)
    proc = run_cli("train", "--data", str(data), "--per-class", "1", "--out", str(tmp_path / "run"), *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "no validation" in proc.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n_val"] == 0 and metrics["eval_split"] == "train"


# ------------------------------------------------------------------------------------ 2. messages in CLI terms
def test_corrupt_image_error_names_the_flag(tmp_path, capsys):
    data = make_classes(tmp_path / "data")
    (data / "ant" / "broken.png").write_bytes(b"not a png")
    assert main(["train", "--data", str(data), *FAST]) == 2
    err = capsys.readouterr().err
    assert "--skip-corrupt" in err and "skip_corrupt=True" not in err and "1 unreadable image:" in err


@pytest.mark.parametrize("argv, flag, python_name", [
    (["-k", "0"], "-k", "tangent_blocks"), (["--epochs", "0"], "--epochs", "epochs must"),
    (["--batch-size", "-1"], "--batch-size", "batch_size"), (["--lr", "0"], "--lr", "lr must"),
    (["--dp", "--epsilon", "-1", "--delta", "1e-5"], "--epsilon", "epsilon must"),
    (["--dp", "--epsilon", "1", "--delta", "2"], "--delta", "delta must"),
])
def test_bad_numbers_name_the_flag(tmp_path, argv, flag, python_name):
    data = make_classes(tmp_path / "data")
    proc = run_cli("train", "--data", str(data), *FAST, *argv, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("taft: error:") and flag in proc.stderr and python_name not in proc.stderr


def test_store_verify_on_a_folder_that_is_not_a_store_does_not_suggest_repair(tmp_path, capsys):
    assert main(["store", "verify", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "not a model store" in captured.err and "--repair" not in captured.out + captured.err


# ------------------------------------------------------------------------------ 3. one line, never a traceback
def test_closed_stdout_exits_quietly(three_class_run):
    _, out = three_class_run
    proc = subprocess.Popen([sys.executable, "-m", "taft.cli", "info", "--json", str(out / "checkpoint.safetensors")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # like `| head -1` having exited
    err = proc.stderr.read()
    assert proc.wait() in (0, 141) and err == "", err


@pytest.mark.slow
def test_skip_corrupt_warning_is_one_line(tmp_path):
    data = make_classes(tmp_path / "data")
    (data / "ant" / "broken.png").write_bytes(b"not a png")
    proc = run_cli("train", "--data", str(data), "--skip-corrupt", "--val-fraction", "0", "--out",
                   str(tmp_path / "run"), *FAST)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "broken.png" in line]
    assert len(lines) == 1 and lines[0].startswith("taft: warning: "), proc.stderr
    assert "UserWarning" not in proc.stderr and ".py:" not in proc.stderr


# ----------------------------------------------------------------------------------- 6. eval on a class subset
def test_eval_on_some_of_the_trained_classes(tmp_path, three_class_run, capsys):
    data, out = three_class_run
    subset = tmp_path / "subset"
    for name in ("ant", "cow"):
        (subset / name).mkdir(parents=True)
        for f in sorted((data / name).iterdir()):
            (subset / name / f.name).write_bytes(f.read_bytes())
    ckpt = str(out / "checkpoint.safetensors")
    assert main(["eval", ckpt, "--data", str(data), "--quiet", "--json", str(tmp_path / "all.json")]) == 0
    assert main(["eval", ckpt, "--data", str(subset), "--quiet", "--json", str(tmp_path / "sub.json")]) == 0
    everything = json.loads((tmp_path / "all.json").read_text())
    part = json.loads((tmp_path / "sub.json").read_text())
    assert part["n"] == 8 and part["per_class_count"] == {"ant": 4, "bee": 0, "cow": 4}
    for name in ("ant", "cow"):  # the same examples get the same predictions as in the full set
        assert part["per_class_accuracy"][name] == everything["per_class_accuracy"][name]
    assert part["per_class_accuracy"]["bee"] is None
    capsys.readouterr()
    unknown = make_classes(tmp_path / "unknown", classes=("ant", "dog"))
    bad(capsys, ["eval", ckpt, "--data", str(unknown), "--quiet"], "dog")


# ------------------------------------------------------------------------------ 7. predict keeps good results
def test_predict_prints_the_readable_images_and_reports_the_rest(tmp_path, three_class_run, capsys):
    data, out = three_class_run
    good = [str(data / "ant" / "0.png"), str(data / "cow" / "1.png")]
    missing = str(tmp_path / "missing.png")
    assert main(["predict", str(out / "checkpoint.safetensors"), good[0], missing, good[1]]) == 2
    captured = capsys.readouterr()
    printed = [line.split("\t")[0] for line in captured.out.splitlines()]
    assert printed == good
    assert captured.err.count("\n") == 1 and "missing.png" in captured.err and "1 of 3" in captured.err


# ------------------------------------------------------------------------------------- 8. comparable hashes
@pytest.mark.slow
def test_identical_runs_have_the_same_content_hash(tmp_path, three_class_run):
    data, first = three_class_run
    time.sleep(1.1)  # a later `created` time in the metadata
    second = tmp_path / "again"
    assert main(["train", "--data", str(data), "--out", str(second), "--val-fraction", "0", *FAST]) == 0
    info = [json.loads(run_cli("info", "--json", str(d / "checkpoint.safetensors")).stdout) for d in (first, second)]
    assert info[0]["created"] != info[1]["created"]
    assert len(info[0]["content_sha256"]) == 64 and info[0]["content_sha256"] == info[1]["content_sha256"]
    text = run_cli("info", str(second / "checkpoint.safetensors")).stdout
    assert info[1]["content_sha256"][:16] in text


@pytest.mark.slow
def test_identical_stores_have_the_same_composed_content_hash(tmp_path, capsys):
    data = make_classes(tmp_path / "data", per_class=4)
    argv = ["shards", "train", "--min-steps", "0", "--data", str(data), "--shards", "2", "--executor", "inline", *FAST]
    assert main([*argv, "--store", str(tmp_path / "a")]) == 0
    time.sleep(1.1)
    assert main([*argv, "--store", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    hashes = []
    for store in ("a", "b"):
        assert main(["store", "info", str(tmp_path / store), "--json"]) == 0
        hashes.append(json.loads(capsys.readouterr().out)["composed"]["content_sha256"])
    assert len(hashes[0]) == 64 and hashes[0] == hashes[1]


# -------------------------------------------------------------------------------------------- 9. file modes
def test_files_respect_the_umask(tmp_path, capsys):
    data = make_classes(tmp_path / "data", per_class=4)
    old = os.umask(0o022)
    try:
        assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *FAST]) == 0
        assert main(["shards", "train", "--min-steps", "0", "--data", str(data), "--shards", "2", "--executor", "inline",
                     "--store", str(tmp_path / "store"), *FAST]) == 0
        assert main(["report", str(tmp_path / "store"), "--out", str(tmp_path / "report")]) == 0
    finally:
        os.umask(old)
    modes = {}
    for where in ("run", "store", "report"):
        for p in (tmp_path / where).rglob("*"):
            modes[str(p.relative_to(tmp_path))] = stat.S_IMODE(p.stat().st_mode)
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o755 if (tmp_path / p).is_dir() else 0o644)}
    assert len(modes) > 10 and not wrong, wrong


# ---------------------------------------------------------------------------------- 10. silent failure modes
TINY = ViTConfig(dim=16, depth=2, heads=2, mlp_hidden=32, patch_size=4, pos_grid=2)


@pytest.mark.parametrize("private", [False, True])
def test_few_steps_and_chance_accuracy_are_warned_about(private):
    from taft.privacy import DPConfig

    backbone = random_backbone(TINY, 3, seed=0, dtype=torch.float32)
    labels = torch.arange(3).repeat(4)
    train = (torch.randn(12, 5, TINY.dim, generator=torch.Generator().manual_seed(0)), labels)
    val = (torch.zeros(6, 5, TINY.dim), torch.arange(3).repeat(2))  # one input: one prediction for all
    dp = DPConfig(noise_multiplier=1.0, delta=1e-3, seed=0, chunk_size=4) if private else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(Classifier(backbone, ["a", "b", "c"]), train, TrainConfig(epochs=2, batch_size=4), val=val,
            progress=False, dp=dp)
    messages = [str(w.message) for w in caught]
    assert any("6 optimizer steps" in m for m in messages), messages
    assert any("chance" in m and "validation top-1 33.3%" in m for m in messages), messages


def test_the_dp_defaults_few_large_steps_are_not_warned_about():
    """DP-SGD's defaults take few large steps (5 epochs of n/10: 50): no "too few steps" warning; 3 epochs (30)
    neither; 2 epochs (20 < 25) is warned about."""
    from taft.privacy import DPConfig

    backbone = random_backbone(TINY, 3, seed=0, dtype=torch.float32)
    train = (torch.randn(400, 5, TINY.dim, generator=torch.Generator().manual_seed(0)), torch.arange(3).repeat(134)[:400])
    for epochs, warned in ((None, False), (3, False), (2, True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fit(Classifier(backbone, ["a", "b", "c"], method="probe"), train, TrainConfig(epochs=epochs),
                         progress=False, dp=DPConfig(noise_multiplier=1.0, delta=1e-3, seed=0))
        assert result.privacy["steps"] == 10 * (epochs or 5)
        assert any("optimizer steps" in str(w.message) for w in caught) == warned, [str(w.message) for w in caught]


def test_the_dp_epochs_default_follows_the_target_budget():
    """Without --epochs a DP run trains 5 epochs below ε = 3 and 10 from ε = 3 on, and σ is calibrated for the
    steps actually taken (the ledger spends the whole target)."""
    from taft.privacy import DPConfig

    backbone = random_backbone(TINY, 3, seed=0, dtype=torch.float32)
    train = (torch.randn(400, 5, TINY.dim, generator=torch.Generator().manual_seed(0)), torch.arange(3).repeat(134)[:400])
    for epsilon, epochs in ((1.0, 5), (3.0, 10)):
        result = fit(Classifier(backbone, ["a", "b", "c"], method="probe"), train, TrainConfig(), progress=False,
                     dp=DPConfig(epsilon=epsilon, delta=1e-3, seed=0))
        assert (result.config.epochs, result.privacy["steps"]) == (epochs, 10 * epochs)
        assert epsilon * 0.98 < result.privacy["epsilon"] <= epsilon


# ------------------------------------------------------------------------- 11. progress bars when redirected
@pytest.mark.slow
def test_redirected_progress_is_one_plain_line_per_bar(tmp_path):
    data = make_classes(tmp_path / "data", per_class=4)
    proc = run_cli("train", "--data", str(data), "--out", str(tmp_path / "run"), "--image-size", "28", "--epochs",
                   "2", "--batch-size", "2")  # progress on; stderr is a pipe, not a terminal
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.split("\n")
    assert "\r" not in proc.stderr and "" not in lines[:-1], repr(proc.stderr)
    assert sum(line.startswith("trunk features: 6/6") for line in lines) == 1, proc.stderr
    assert sum(line.startswith("taft k=1: 6/6 step") and "val_top1" in line for line in lines) == 1, proc.stderr


def test_a_full_disk_or_an_unwritable_out_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    """Filesystem faults (tests run as root, so they are simulated): exit 2, one line, no checkpoint written."""
    import errno

    data = make_classes(tmp_path / "data")
    out = tmp_path / "run"
    real_replace, real_mkdir = os.replace, os.mkdir

    def full_disk(src, dst, *a, **kw):
        if str(dst).startswith(str(out)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", full_disk)
    bad(capsys, ["train", "--data", str(data), "--out", str(out), *FAST], f"{out}/run_args.json: No space left on device")
    assert not (out / "checkpoint.safetensors").exists()
    monkeypatch.setattr(os, "replace", real_replace)

    def read_only(path, *a, **kw):
        if str(path).startswith(str(out)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, *a, **kw)

    monkeypatch.setattr(os, "mkdir", read_only)
    bad(capsys, ["train", "--data", str(data), "--out", str(out / "sub"), *FAST], f"{out}/sub: Permission denied")


def test_predict_takes_folders_and_globs_and_writes_csv_or_json(tmp_path, three_class_run, capsys):
    data, out = three_class_run
    ckpt = str(out / "checkpoint.safetensors")
    every = sorted(str(p) for p in data.rglob("*.png"))
    assert main(["predict", ckpt, str(data), "--format", "json", "--top", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["input"] for r in rows] == every and all(len(r["predictions"]) == 2 for r in rows)
    assert all(r["predictions"][0]["score"] >= r["predictions"][1]["score"] for r in rows)
    assert main(["predict", ckpt, str(data / "*" / "0.png"), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == sorted(str(p) for p in data.glob("*/0.png"))
    assert all(len(line.split(",")) == 3 and line.split(",")[1] in ("ant", "bee", "cow") for line in lines)
    assert main(["predict", ckpt, str(data / "ant" / "0.png"), str(tmp_path / "none" / "*.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith(str(data / "ant" / "0.png")) and "1 of 2" in captured.err
    assert "none/*.png (no file matches)" in captured.err
