"""The `taft` command end to end on tiny data (bundled DINOv2 at 28 px: 2×2 patches), and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import bad, make_classes, make_idx
from taft.cli import main
from taft.cli.parser import SHARD_MIN_STEPS

FAST = ["--image-size", "28", "--epochs", "2", "--quiet"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One taft run on a two-class folder, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("cli")
    data = make_classes(root / "data")
    out = root / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--val-fraction", "0.34", "--lr", "1e-3",
                 *FAST]) == 0
    return data, out


def test_train_writes_a_complete_run_directory(trained):
    _, out = trained
    for name in ("config.json", "metrics.jsonl", "metrics.json", "checkpoint.safetensors"):
        assert (out / name).is_file(), name
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # one line per epoch
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"top1", "per_class_accuracy", "loss", "train_time_s", "examples_per_s"} <= set(metrics)
    assert json.loads((out / "config.json").read_text())["method"] == "taft"


def test_info_eval_predict(trained, capsys):
    data, out = trained
    ckpt = str(out / "checkpoint.safetensors")
    assert main(["info", ckpt]) == 0
    info = capsys.readouterr().out
    assert "method       taft" in info and "dinov2-vits14" in info and "ant, bee" in info
    assert main(["eval", ckpt, "--data", str(data), "--quiet"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert main(["predict", ckpt, str(data / "ant" / "0.png"), str(data / "bee" / "1.png"), "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(("ant" in l and "bee" in l) for l in lines)


def test_existing_run_is_not_overwritten_by_accident(trained, capsys):
    data, out = trained
    assert main(["train", "--data", str(data), "--out", str(out), *FAST]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["nlft", "probe"])
def test_other_methods_train(tmp_path, method, capsys):
    data = make_classes(tmp_path / "data")
    assert main(["train", "--data", str(data), "--method", method, "--out", str(tmp_path / method),
                 "--val-fraction", "0", *FAST]) == 0
    assert f"{method} k=1" in capsys.readouterr().out


def test_demo_runs_on_a_tiny_fashion_mnist(tmp_path, capsys):
    idx = make_idx(tmp_path / "fm", "train", n_per_class=3)
    make_idx(idx, "test", n_per_class=2)
    assert main(["demo", "--data-dir", str(idx), "--train-per-class", "3", "--test-per-class", "2", "--epochs", "1",
                 "--image-size", "28", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in ("probe", "nlft", "taft")) and "test top-1" in out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert [r["method"] for r in summary["rows"]] == ["probe", "nlft", "taft"]
    assert (tmp_path / "demo" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in summary["rows"]:  # the test accuracy is recorded beside the training metrics, and `info` shows it
        run = tmp_path / "demo" / row["method"]
        assert json.loads((run / "metrics.json").read_text())["test_top1"] == row["test_top1"]
        assert main(["info", str(run / "checkpoint.safetensors")]) == 0
        assert f"test top-1 {100 * row['test_top1']:.2f}% on 20" in capsys.readouterr().out


def test_the_two_demos_default_to_their_own_folders():
    from taft.demo import DEMO_OUT

    assert DEMO_OUT[True] != DEMO_OUT[False]


def test_bad_inputs_give_one_clear_line(tmp_path, trained, capsys):
    data, out = trained
    ckpt = str(out / "checkpoint.safetensors")
    (tmp_path / "empty").mkdir()
    bad(capsys, ["train", "--data", str(tmp_path / "empty"), *FAST], "no class")
    bad(capsys, ["train", "--data", str(tmp_path / "missing"), *FAST], "missing")
    single = make_classes(tmp_path / "single", classes=("only",))
    bad(capsys, ["train", "--data", str(single), *FAST], "class")
    corrupt = make_classes(tmp_path / "corrupt")
    (corrupt / "ant" / "broken.png").write_bytes(b"not a png")
    bad(capsys, ["train", "--data", str(corrupt), *FAST], "broken.png")
    bad(capsys, ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--image-size", "30", "--quiet"],
        "multiple")
    other = make_classes(tmp_path / "other", classes=("ant", "cow"))
    bad(capsys, ["eval", ckpt, "--data", str(other), "--quiet"], "not among the model's classes")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    bad(capsys, ["info", str(garbage)], "cannot read checkpoint")
    bad(capsys, ["predict", ckpt, str(tmp_path / "nope.png")], "cannot read image")
    bad(capsys, ["train", "--data", str(data), "--dataset", "fashion-mnist", *FAST], "exactly one")


@pytest.mark.parametrize("module", ["taft", "taft.cli"])
def test_console_script_prints_no_traceback(tmp_path, module):
    proc = subprocess.run([sys.executable, "-m", module, "info", str(tmp_path / "absent.safetensors")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "no checkpoint file" in proc.stderr


@pytest.mark.parametrize("argv, min_steps", [(["train", "--data", "x"], 0),
                                             (["shards", "train", "--data", "x", "--store", "s"], SHARD_MIN_STEPS)])
def test_training_option_defaults_are_the_dataclass_defaults(argv, min_steps):
    """`train` and `shards train` share one definition of the training options; left out, each gives the
    ModelSpec / TrainConfig / DPConfig default, except that a shard trains at least SHARD_MIN_STEPS steps."""
    from dataclasses import fields

    from taft.cli import build_parser
    from taft.cli.parser import model_spec, train_config
    from taft.privacy import DPConfig
    from taft.spec import ModelSpec
    from taft.train import TrainConfig

    class ImageBackbone:
        is_text = False

    args = build_parser().parse_args(argv)
    assert model_spec(args, ImageBackbone()) == ModelSpec()
    assert train_config(args) == TrainConfig(min_steps=min_steps)
    dp = {f.name: f.default for f in fields(DPConfig)}
    assert (args.clip, args.accountant, args.dp_chunk_size) == (dp["clip"], dp["accountant"], dp["chunk_size"])
