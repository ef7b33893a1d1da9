"""Smoke tests of the GPU suite and its asset packer at tiny sizes, on the CPU (the numbers themselves come from a
GPU machine: docs/gpu.md)."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import write_image

pytestmark = pytest.mark.usefixtures("isolated_cache", "one_thread")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SECTION_KEYS = {  # what each section's result holds, at least
    "tests": {"passed", "failed", "errors", "skipped", "failures", "command", "returncode"},
    "correctness": {"tail_vs_jvp", "pruned_vs_unpruned", "ghost_vs_per_example", "resident_vs_streamed",
                    "checkpoint_device_to_cpu"},
    "steps": {"rows", "skipped", "memory"},
    "features": {"backbone", "images", "rows"},
    "dp": {"rows"},
    "accuracy": {"train", "test", "rows"},
}


def load(name: str):
    sys.modules.pop(name, None)
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def suite():
    return load("gpu_suite")


@pytest.mark.slow
def test_tiny_suite_runs_every_section_and_writes_their_keys(suite, tmp_path, capsys):
    t0 = time.perf_counter()
    report = suite.main(["--tiny", "--device", "cpu", "--out", str(tmp_path)])
    assert time.perf_counter() - t0 < 60
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert list(saved["sections"]) == list(suite.SECTIONS) == list(SECTION_KEYS)
    for name, keys in SECTION_KEYS.items():
        section = saved["sections"][name]
        assert section["status"] == "ok", (name, section)
        assert keys <= set(section["result"]), name
    tests = saved["sections"]["tests"]["result"]
    assert tests["failed"] == tests["errors"] == 0 and tests["skipped"] + tests["passed"] >= 5
    assert suite.all_ok(saved["sections"]["correctness"]["result"])
    rows = saved["sections"]["steps"]["result"]["rows"]
    assert {r["compiled"] for r in rows} == {False, True} and {r["autocast"] for r in rows} == {"none", "bf16"}
    eager = next(r for r in rows if not r["compiled"])
    assert set(eager["ms"]) == {"probe", "nlft", "taft", "jvp", "taft-full"} and eager["ratios"]["taft/nlft"] > 0
    rows = saved["sections"]["accuracy"]["result"]["rows"]
    assert {r["method"] for r in rows} == {"probe", "nlft", "taft"}
    assert sorted((r["method"], r["px"]) for r in rows if r["augment"] == "crop-flip") == [("nlft", 56), ("taft", 56)]
    assert saved["environment"]["packages"]["torch"] and report["sections"].keys() == saved["sections"].keys()
    printed = capsys.readouterr().out
    table = (tmp_path / "table.txt").read_text()
    assert printed.rstrip().endswith(table.rstrip()) and "taft/nlft" in table and "accuracy" in table


def test_sections_are_selectable_and_a_failing_one_keeps_the_others(suite, tmp_path, monkeypatch):
    def broken(ctx, deadline, record):
        record["partial"] = 1
        raise RuntimeError("boom")

    monkeypatch.setitem(suite.SECTION_FUNCTIONS, "features", broken)
    suite.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--sections", "features,accuracy"])
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert list(saved["sections"]) == ["features", "accuracy"]
    assert saved["sections"]["features"]["status"] == "error"
    assert saved["sections"]["features"]["result"]["partial"] == 1  # what it had recorded is kept
    assert "boom" in saved["sections"]["features"]["result"]["error"]
    assert saved["sections"]["accuracy"]["status"] == "ok"
    with pytest.raises(SystemExit):
        suite.main(["--tiny", "--out", str(tmp_path), "--sections", "steps,nonsense"])


def test_a_section_past_its_time_box_is_stopped(suite, tmp_path, monkeypatch):
    def slow(ctx, deadline, record):
        record["started"] = True
        time.sleep(10)
        return "ok"

    monkeypatch.setitem(suite.SECTION_FUNCTIONS, "dp", slow)
    monkeypatch.setattr(suite, "GRACE_S", 0.2)
    t0 = time.perf_counter()
    suite.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--sections", "dp", "--budget", "0.001"])
    assert time.perf_counter() - t0 < 5
    section = json.loads((tmp_path / "gpu_suite.json").read_text())["sections"]["dp"]
    assert section["status"] == "timeout" and section["result"]["started"]


@pytest.mark.parametrize("noise,ok", [(1e-7, True), (1e-2, False)])
def test_feeds_check_falls_back_to_rounding_where_training_does_not_repeat(suite, tmp_path, monkeypatch, noise, ok):
    real_fit, draws = suite.fit, torch.Generator().manual_seed(0)

    def jittery_fit(*args, **kwargs):  # every run differs a little, as with CUDA's split-key attention backward
        result = real_fit(*args, **kwargs)
        with torch.no_grad():
            for t in result.classifier.tail.parameters():
                t.mul_(1 + noise * torch.randn(t.shape, generator=draws))
        return result

    monkeypatch.setattr(suite, "fit", jittery_fit)
    ctx = suite.Context(torch.device("cpu"), suite.TINY, True, None, tmp_path, tmp_path)
    for method, r in suite.check_feeds(ctx).items():
        assert not r["repeatable"] and not r["identical"] and r["ok"] == ok, method
        assert 0 < r["worst_rel"] < 10 * noise


def test_median_ms_interleaves_and_warms_up():
    timing = load("timing")
    calls = []
    ms = timing.median_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, "cpu", repeats=3,
                          warmup=2)
    assert calls == ["a", "b"] * 5 and set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())


def tiny_cifar(root: Path) -> Path:
    """train/ and test/ folders of 8×8 images, 3 classes, 4 and 2 images each."""
    for split, n in (("train", 4), ("test", 2)):
        for c, name in enumerate(("cat", "dog", "emu")):
            for i in range(n):
                write_image(root / split / name / f"{i}.png", seed=100 * c + i + (50 if split == "test" else 0),
                            size=(8, 8))
    return root


def test_gpu_assets_packs_the_images_the_suite_reads(suite, tmp_path):
    assets = load("gpu_assets")
    out = tmp_path / "assets"
    manifest = assets.main(["--out", str(out), "--data", str(tiny_cifar(tmp_path / "cifar")), "--train-per-class",
                            "2", "--test-per-class", "1", "--no-backbone"])
    assert manifest["images"] == {"train": 6, "test": 3} and set(manifest["files"]) == {"cifar10.npz"}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    ctx = suite.Context(torch.device("cpu"), suite.FULL, False, out, tmp_path, tmp_path)
    data = suite.packed_images(ctx)
    assert [len(data["train"]), len(data["test"])] == [6, 3]
    assert data["train"].class_names == ["cat", "dog", "emu"] and data["train"].labels == [0, 0, 1, 1, 2, 2]
    assert data["test"].ids[0] == "test/cat/0.png"
    image = data["train"].records[1].source.load()
    assert image.size == (8, 8) and image.mode == "RGB"
    assert suite.real_backbone(ctx, 112) is None  # no backbone packed: the suite falls back to random weights


@pytest.mark.slow
def test_gpu_assets_backbone_loads_as_a_local_backbone(dinov2_56, tmp_path):
    from taft import load_backbone

    path = load("gpu_assets").pack_backbone(tmp_path)
    assert path.stat().st_size < 45 * 2**20  # float16
    local = load_backbone(path, image_size=56)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, ref = local.model(x), dinov2_56.model(x)
    assert float((ours - ref).norm() / ref.norm()) < 1e-2  # float16 weights
    assert local.preprocess.mean == dinov2_56.preprocess.mean and local.model.cfg == dinov2_56.model.cfg
