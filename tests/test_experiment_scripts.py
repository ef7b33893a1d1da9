"""Smoke tests of the experiment scripts (experiments/) and benchmarks/dp_step.py at tiny sizes: each runs end to
end in-process and writes its results (JSON, Markdown table, plot). The numbers themselves come from running the
scripts at full size (docs/results.md); here they are only checked to be well formed.

The CIFAR-10 scripts get a synthetic image folder (3 classes, random 28 px images) so the tests do not depend on
the CIFAR-10 mini copy in ../shared; the text scripts read the first few Rotten Tomatoes snippets per class
(`--limit`)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
CLASSES = ("ant", "bee", "cat")
METHODS = {"taft", "nlft", "probe"}


def run_script(path: Path, argv: list[str], monkeypatch):
    """Run `path`'s main() with command-line arguments `argv` (the experiments import their sibling `common`);
    returns the loaded module."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    spec = importlib.util.spec_from_file_location(f"smoke_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    return module


def results(out: Path) -> tuple[dict, str]:
    """The results JSON and Markdown table an experiment wrote to `out`."""
    return json.loads((out / "results.json").read_text()), (out / "table.md").read_text()


def is_accuracy(x: float) -> bool:
    return 0.0 <= x <= 1.0


def is_seconds(x: float) -> bool:
    return math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory) -> Path:
    """An image folder with train/ (11 images per class: DP-SGD needs ≥ 32 training examples for its expected batch
    of 32) and test/ (2 per class) of random 28×28 RGB images."""
    root = tmp_path_factory.mktemp("tiny-images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 11), ("test", 2)):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def cifar_args(data: Path, out: Path, train_per_class: int = 4) -> list[str]:
    return ["--data", str(data), "--image-size", "28", "--train-per-class", str(train_per_class),
            "--test-per-class", "2", "--out", str(out)]


def test_validation_split_reads_no_test_data(tiny_images, tmp_path, monkeypatch):
    """--validation: training and held-out parts are disjoint, both from train/, the first N of each class."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    from common import image_parser, load_images

    args = image_parser("", str(tmp_path)).parse_args(cifar_args(tiny_images, tmp_path, 3) + ["--validation"])
    _, train, held_out = load_images(args)
    assert not set(train.ids) & set(held_out.ids)
    assert {r.source.path.parents[1].name for r in [*train.records, *held_out.records]} == {"train"}
    assert sorted(np.bincount(train.labels)) == [3, 3, 3] and sorted(np.bincount(held_out.labels)) == [2, 2, 2]
    test_args = image_parser("", str(tmp_path)).parse_args(cifar_args(tiny_images, tmp_path, 3))
    assert {r.source.path.parents[1].name for r in load_images(test_args)[2].records} == {"test"}


def test_cifar_methods_smoke(tiny_images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_script(EXPERIMENTS / "cifar_methods.py", cifar_args(tiny_images, out) + [
        "--ks", "1", "--seeds", "0", "--epochs", "1", "--cache-probe", "6"], monkeypatch)
    saved, table = results(out)
    assert {(r["method"], r["k"], r["seed"]) for r in saved["runs"]} == {(m, 1, 0) for m in METHODS}
    assert all(is_accuracy(r["top1"]) and is_seconds(r["epoch_s"]) for r in saved["runs"])
    cache = saved["cache"]
    assert cache["images"] == 6
    assert cache["speedup"] == pytest.approx(cache["epoch_recomputing_trunk_s"] / cache["epoch_from_cache_s"])
    assert all(is_seconds(cache[key]) for key in ("epoch_from_cache_s", "epoch_recomputing_trunk_s"))
    for row in ("| probe | - |", "| nlft | 1 |", "| taft | 1 |"):
        assert row in table
    assert "Feature cache: one TAFT epoch over 6 images" in table
    assert (out / "accuracy.png").stat().st_size > 0


def test_dp_accuracy_smoke(tiny_images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_script(EXPERIMENTS / "dp_accuracy.py", cifar_args(tiny_images, out, train_per_class=11) + [
        "--epsilons", "8", "inf", "--seeds", "0", "--epochs", "1"], monkeypatch)
    saved, table = results(out)
    assert {(r["method"], r["epsilon_target"]) for r in saved["runs"]} == {(m, e) for m in METHODS
                                                                          for e in (8.0, math.inf)}
    for r in saved["runs"]:
        assert is_accuracy(r["top1"]) and is_seconds(r["train_s"]) and r["epochs"] == 1
        if math.isinf(r["epsilon_target"]):
            assert math.isinf(r["epsilon_spent"]) and r["noise_multiplier"] == 0.0
        else:
            assert 0 < r["epsilon_spent"] <= 8.0 + 1e-6 and r["noise_multiplier"] > 0
    assert table.splitlines()[0] == "| method | ε = 8 | ε = inf |"
    assert all(f"| DP-{m} |" in table for m in METHODS)
    assert (out / "accuracy_vs_epsilon.png").stat().st_size > 0
    # a rerun with one more ε trains only the new runs (the finished ones are read back, not retrained)
    run_script(EXPERIMENTS / "dp_accuracy.py", cifar_args(tiny_images, out, train_per_class=11) + [
        "--epsilons", "8", "inf", "3", "--seeds", "0", "--epochs", "1", "--methods", "probe"], monkeypatch)
    again, table = results(out)
    assert again["runs"][:len(saved["runs"])] == saved["runs"]
    assert [(r["method"], r["epsilon_target"]) for r in again["runs"][len(saved["runs"]):]] == [("probe", 3.0)]
    assert table.splitlines()[0] == "| method | ε = 3 | ε = 8 | ε = inf |" and "| DP-taft |" not in table


@pytest.mark.slow
def test_shards_composition_smoke(tiny_images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_script(EXPERIMENTS / "shards_composition.py", cifar_args(tiny_images, out) + [
        "--shards", "1", "2", "--seeds", "0", "1", "--epochs", "1", "--threads", "1", "--repeats", "1",
        "--forget-k", "2", "--min-steps", "full"], monkeypatch)
    saved, table = results(out)
    assert [(r["K"], r["seed"]) for r in saved["runs"]] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert table.count("| 2 | 2 |") == 1 and "| 1 | 2 |" in table  # K, seeds
    for r in saved["runs"]:
        assert all(is_accuracy(r[key]) for key in ("taft_composed", "nlft_ensemble", "nlft_soup"))
        assert all(is_seconds(r[key]) for key in ("taft_train_s", "nlft_train_s", "infer_composed_s",
                                                   "infer_ensemble_s"))
    forgetting = saved["forgetting"]
    assert forgetting["store"] == "taft-K2-seed0"
    for how in ("drop", "retrain", "full_retrain"):
        assert is_seconds(forgetting[f"{how}_s"]) and is_accuracy(forgetting[f"{how}_top1"])
    assert table.startswith("test top-1 % (mean ± std over seeds):")
    assert table.count("\n| 1 |") + table.count("\n| 2 |") == 2
    assert "| retrain its shard |" in table
    assert (out / "accuracy_vs_shards.png").stat().st_size > 0
    # a rerun with one more seed trains only the new run; the finished runs and the forgetting costs are read back
    run_script(EXPERIMENTS / "shards_composition.py", cifar_args(tiny_images, out) + [
        "--shards", "1", "--seeds", "0", "1", "2", "--epochs", "1", "--threads", "1", "--repeats", "1",
        "--forget-k", "2", "--min-steps", "full"], monkeypatch)
    again, table = results(out)
    assert again["runs"][:4] == saved["runs"] and [(r["K"], r["seed"]) for r in again["runs"][4:]] == [(1, 2)]
    assert again["forgetting"] == forgetting and "| 1 | 3 |" in table


def test_recipe_study_smoke(tiny_images, tmp_path, monkeypatch, capsys):
    """Two variants (one DP-SGD) on a validation split of the training folder; a rerun skips the finished runs."""
    out = tmp_path / "out"
    argv = ["--data", str(tiny_images / "train"), "--image-size", "28", "--val-fraction", "0.3", "--epochs", "1",
            "--threads", "1", "--out", str(out), "--variant", "method=taft,lr=1e-3,warmup=0.5,head_lr=1e-2",
            "--variant", "method=probe,dp.noise_multiplier=1.0,dp.expected_batch_size=4,dp.delta=1e-3",
            "--variant", "method=probe,optimizer=sgd,lr=1e30,epochs=3"]
    run_script(EXPERIMENTS / "recipe_study.py", argv, monkeypatch)
    saved, table = results(out)
    assert [r["variant"] for r in saved["runs"]] == ["method=taft,lr=0.001,warmup=0.5,head_lr=0.01",
                                                    "method=probe,dp.noise_multiplier=1,dp.expected_batch_size=4,"
                                                    "dp.delta=0.001", "method=probe,optimizer=sgd,lr=1e+30,epochs=3"]
    taft, dp, blown = saved["runs"]
    assert is_accuracy(taft["val_top1"]) and taft["optimizer"] == "adamw" and "epsilon" not in taft
    assert dp["optimizer"] == "sgd" and dp["expected_batch_size"] == 4 and 0 < dp["epsilon"] < math.inf
    assert blown["val_top1"] is None and blown["diverged"].startswith("training diverged")  # the study went on
    assert len(table.splitlines()) == 5 and "| method=taft,lr=0.001" in table
    assert table.splitlines()[-1].startswith("| method=probe,optimizer=sgd,lr=1e+30,epochs=3 | diverged |")
    capsys.readouterr()
    run_script(EXPERIMENTS / "recipe_study.py", argv, monkeypatch)
    assert len(results(out)[0]["runs"]) == 3 and "{" not in capsys.readouterr().out  # nothing retrained


def test_solver_study_smoke(tiny_images, tmp_path, monkeypatch, capsys):
    """CG at two λ for 2 iterations on a validation split, with the Adam row read from the committed recipe study;
    a rerun skips the finished runs."""
    out = tmp_path / "out"
    argv = ["--data", str(tiny_images / "train"), "--image-size", "28", "--val-fraction", "0.3", "--iterations", "2",
            "--regs", "0", "1e-3", "--report-at", "1", "--threads", "1", "--out", str(out),
            "--adam-results", str(ROOT / "docs/experiments/recipe/cifar-k1/results.json")]
    run_script(EXPERIMENTS / "solver_study.py", argv, monkeypatch)
    saved, table = results(out)
    assert [r["reg"] for r in saved["runs"]] == [0.0, 1e-3]
    for r in saved["runs"]:
        assert [h["passes"] for h in r["history"]] == [1, 2, 3]
        assert all(is_accuracy(h["val_top1"]) for h in r["history"]) and r["history"][0]["grad_norm"] == 1.0
        assert r["history"][0]["objective"] > r["history"][1]["objective"] > r["history"][2]["objective"]
    assert saved["adam"]["passes"] == 10 and is_accuracy(saved["adam"]["val_top1"])
    assert len(table.splitlines()) == 2 + 2 * 2 + 1 and "| CG | 0.001 | 2 | 3 |" in table and "| Adam (" in table
    assert (out / "convergence.png").stat().st_size > 0
    capsys.readouterr()
    run_script(EXPERIMENTS / "solver_study.py", argv, monkeypatch)
    assert len(results(out)[0]["runs"]) == 2 and '{"reg"' not in capsys.readouterr().out  # nothing retrained


def test_text_methods_smoke(tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_script(EXPERIMENTS / "text_methods.py", ["--ks", "1", "--seeds", "0", "--epochs", "1", "--threads", "1",
                                                 "--limit", "6", "--out", str(out)], monkeypatch)
    saved, table = results(out)
    assert (saved["n_train"], saved["n_test"]) == (12, 12)
    assert {(r["method"], r["k"]) for r in saved["runs"]} == {(m, 1) for m in METHODS}
    for r in saved["runs"]:
        assert is_accuracy(r["top1"]) and is_accuracy(r["train_top1"]) and is_seconds(r["epoch_s"])
        assert math.isfinite(r["test_loss"]) and math.isfinite(r["final_train_loss"])
    assert table.startswith("Rotten Tomatoes (12 train / 12 test snippets)")
    assert all(row in table for row in ("| probe | - |", "| nlft | 1 |", "| taft | 1 |"))
    assert (out / "accuracy.png").stat().st_size > 0


@pytest.mark.slow
def test_text_lr_smoke(tmp_path, monkeypatch):
    out = tmp_path / "out"
    script = run_script(EXPERIMENTS / "text_lr.py", ["--ks", "1", "--seeds", "0", "--epochs", "1", "--threads", "1",
                                            "--limit", "10", "--out", str(out)], monkeypatch)
    saved, table = results(out)
    assert (saved["n_fit"], saved["n_val"], saved["n_train"], saved["n_test"]) == (18, 2, 20, 20)
    grid = script.GRID
    assert sorted((s["method"], s["lr"]) for s in saved["sweep"]) == sorted((m, lr) for m in grid for lr in grid[m])
    assert all(is_accuracy(s["val_top1"]) for s in saved["sweep"])
    assert sorted(r["method"] for r in saved["runs"]) == sorted(METHODS)
    for r in saved["runs"]:
        assert is_accuracy(r["top1"])
        val = {s["lr"]: s["val_top1"] for s in saved["sweep"] if s["method"] == r["method"]}
        assert r["lr"] == max(val, key=lambda lr: (val[lr], -lr))  # best on validation, ties: the smaller rate
    assert all(row in table for row in ("| probe | - |", "| nlft | 1 |", "| taft | 1 |"))


@pytest.mark.slow
def test_text_composition_smoke(tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_script(EXPERIMENTS / "text_composition.py", [
        "--shards", "1", "2", "--epochs", "1", "--threads", "1", "--repeats", "1", "--timing-examples", "4",
        "--limit", "6", "--out", str(out)], monkeypatch)
    saved, table = results(out)
    assert (saved["n_train"], saved["n_test"], saved["timing_examples"]) == (12, 12, 4)
    assert [r["K"] for r in saved["rows"]] == [1, 2]
    for r in saved["rows"]:
        assert sum(r["shard_sizes"]) == 12 and len(r["taft_shard_top1"]) == len(r["nlft_shard_top1"]) == r["K"]
        assert all(is_accuracy(r[key]) for key in ("taft_composed", "taft_shard_mean", "taft_ensemble",
                                                   "nlft_ensemble", "nlft_shard_mean", "nlft_soup"))
        assert all(is_seconds(r[key]) for key in ("taft_train_s", "nlft_train_s", "infer_composed_s",
                                                   "infer_ensemble_s"))
        assert r["composed_vs_mean_logits_max_abs"] < 1e-4  # the tangent tail is linear in Δw (float32)
    assert table.startswith("Rotten Tomatoes (12 train / 12 test snippets)")
    assert (out / "accuracy.png").stat().st_size > 0


@pytest.mark.parametrize("method", ["taft", "nlft"])
def test_dp_step_smoke(tmp_path, monkeypatch, capsys, method):
    out_json = tmp_path / "dp_step.json"
    run_script(ROOT / "benchmarks" / "dp_step.py", [
        "--method", method, "--batch", "2", "--tokens", "5", "--classes", "2", "--chunk", "2", "--repeats", "1",
        "--threads", "1", "--json", str(out_json)], monkeypatch)
    printed = capsys.readouterr().out
    assert f"{method} k=1, width 384, 5 tokens, batch 2, chunk 2, cpu, 1 repeats" in printed
    saved = json.loads(out_json.read_text())
    med = saved["median_s"]
    assert set(med) == {"plain", "ghost", "vmap"} and all(len(t) == 1 for t in saved["times_s"].values())
    assert saved["ratios"]["ghost/plain"] == pytest.approx(med["ghost"] / med["plain"])
    assert saved["ratios"]["vmap/ghost"] == pytest.approx(med["vmap"] / med["ghost"])
    assert f"ghost/plain {saved['ratios']['ghost/plain']:.2f}x" in printed


def test_task_arithmetic_smoke(tiny_images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_script(EXPERIMENTS / "task_arithmetic.py", cifar_args(tiny_images, out) + [
        "--task-a", "ant", "--epochs", "1", "--threads", "1"], monkeypatch)
    saved, table = results(out)
    assert [r["method"] for r in saved["runs"]] == ["taft", "nlft"]
    for r in saved["runs"]:
        assert set(r["scores"]) == {"A", "B", "union", "1·A + 1·B", "0.5·A + 0.5·B", "1·A + -1·B"}
        assert all(is_accuracy(s[t]) for s in r["scores"].values() for t in ("A", "B", "all"))
    assert "| TAFT (exact) | 1·A + -1·B |" in table and "| NLFT (approximate) | union |" in table


@pytest.mark.slow
def test_store_growth_smoke(tiny_images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_script(EXPERIMENTS / "store_growth.py", ["--data", str(tiny_images), "--image-size", "28", "--test-per-class",
               "2", "--base-per-class", "5", "--add-per-class", "3", "--additions", "2", "--shards", "2", "--epochs",
               "1", "--min-steps", "0", "--threads", "1", "--out", str(out)], monkeypatch)
    saved, table = results(out)
    assert [(r["step"], r["n"]) for r in saved["runs"]] == [(0, 15), (1, 24), (2, 33)]  # 3 classes
    assert [r["shards"] for r in saved["runs"]] == [2, 3, 4]  # 9 new images at the mean shard size 7.5: one shard
    for r in saved["runs"][1:]:
        assert is_accuracy(r["incremental_top1"]) and is_accuracy(r["rebuilt_top1"]) and is_seconds(r["add_s"])
    assert "| 2 | 33 | 4 |" in table


@pytest.mark.slow
def test_augment_study_smoke(tiny_images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_script(EXPERIMENTS / "augment_study.py", cifar_args(tiny_images, out) + [
        "--epochs", "1", "--augments", "crop-flip", "--threads", "1"], monkeypatch)
    saved, table = results(out)
    assert sorted((r["method"], r["augment"]) for r in saved["runs"]) == [
        ("nlft", "crop-flip"), ("nlft", "none"), ("probe", "none"), ("taft", "crop-flip"), ("taft", "none")]
    assert all(is_accuracy(r["top1"]) for r in saved["runs"])
    assert "| taft |" in table and "TAFT − NLFT (points): none:" in table


@pytest.mark.slow
def test_cache_dtype_smoke(tiny_images, tmp_path, monkeypatch, capsys):
    """Two methods × two seeds on float32 and float16 caches of a validation split: paired runs, the float16 entry
    half the bytes; a rerun skips the finished runs."""
    out = tmp_path / "out"
    argv = ["--data", str(tiny_images / "train"), "--image-size", "28", "--val-fraction", "0.3", "--epochs", "1",
            "--seeds", "0", "1", "--methods", "taft", "probe", "--threads", "1", "--out", str(out)]
    run_script(EXPERIMENTS / "cache_dtype.py", argv, monkeypatch)
    saved, table = results(out)
    assert [(r["method"], r["seed"], r["dtype"]) for r in saved["runs"]] == [
        (m, s, d) for m in ("taft", "probe") for s in (0, 1) for d in ("float32", "float16")]
    assert all(is_accuracy(r["val_top1"]) and is_seconds(r["train_s"]) for r in saved["runs"])
    f32, f16 = saved["entry_float32"], saved["entry_float16"]
    assert f32["feature_shape"] == f16["feature_shape"] == [5, 384]  # 28 px: 2×2 patches + CLS, ViT-S width
    # features.npy of n examples: a 128-byte header + n × 5 × 384 × itemsize
    assert f32["bytes_per_example"] * f32["n"] == 128 + f32["n"] * 5 * 384 * 4
    assert f16["bytes_per_example"] * f16["n"] == 128 + f16["n"] * 5 * 384 * 2
    rows = table.splitlines()
    assert rows[2].startswith("| taft | 2 |") and rows[3].startswith("| probe | 2 |")
    assert "float16: 3,844 bytes per example" in table  # (128 + 33 × 3840) / 33: the 33 images of train/
    capsys.readouterr()
    run_script(EXPERIMENTS / "cache_dtype.py", argv, monkeypatch)
    assert len(results(out)[0]["runs"]) == 8 and '{"method"' not in capsys.readouterr().out  # nothing retrained
