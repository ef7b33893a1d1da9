"""Smoke tests of the benchmark scripts at tiny sizes: they run end to end and print their ratios (the numbers
themselves are measured by running the scripts, see docs/results.md)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_cost_prints_pruned_and_unpruned_ratios(tmp_path, capsys):
    step_cost = load("step_cost")
    out_json = tmp_path / "step_cost.json"
    step_cost.main(["--width", "16", "--heads", "2", "--depth", "3", "--sizes", "28", "--ks", "1", "2",
                    "--batch", "2", "--repeats", "1", "--threads", "1", "--json", str(out_json)])
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.split()[:3] == ["px", "N", "k"])
    assert all(ratio in header for ratio in step_cost.RATIOS)
    rows = [line.split() for line in lines if line.split()[:1] == ["28"]]
    assert [row[2] for row in rows[:2]] == ["1", "2"]  # one timing row per k (then one memory row per k)
    ratios = [float(v) for v in rows[0][rows[0].index("|") + 1:]]
    assert len(ratios) == len(step_cost.RATIOS) and all(r > 0 for r in ratios)
    assert any(line.startswith("  taft-p/nlft-p <= 1.75:") for line in lines)
    saved = json.loads(out_json.read_text())
    assert [r["k"] for r in saved["rows"]] == [1, 2]
    assert set(saved["rows"][0]["ms"]) == set(step_cost.VARIANTS)


@pytest.mark.slow
def test_scale_prints_growth_exponents_and_stream_cache_ratio(tmp_path, capsys):
    """Two sizes, each configuration in its own process: the table ends the output, the JSON has every measurement,
    the cache grows with N (a 128-byte .npy header + N × 5 tokens × 32 wide × 2 bytes: float16, the default)."""
    scale = load("scale")
    out_json = tmp_path / "scale.json"
    scale.main(["--tiny", "--sizes", "10", "20", "--val-n", "10", "--workers", "0", "--threads", "1",
                "--out", str(out_json)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-4].startswith("N | build s | cache MiB | B/example | cached epoch s | stream_w0 epoch s | "
                                "stream_w0/cache | peak RSS MiB")
    assert [line.split(" | ")[0] for line in lines[-3:-1]] == ["10", "20"]
    assert lines[-1].startswith("growth exponents (slope of log quantity vs log N): build time ")
    saved = json.loads(out_json.read_text())
    rows = saved["rows"]
    assert [r["build"]["cache_bytes"] for r in rows] == [128 + n * 5 * 32 * 2 for n in (10, 20)]
    assert [r["stream_w0"]["feed"] for r in rows] == ["trunk", "trunk"] and rows[0]["cached"]["feed"] != "trunk"
    for r in rows:
        assert all(r[p]["peak_rss_mib"] > 50 for p in ("build", "cached", "stream_w0"))  # torch alone takes more
        assert r["build"]["build_s"] > 0 and r["cached"]["epoch_s"] > 0 and r["stream_w0"]["epoch_s"] > 0
    assert saved["exponents"]["cache bytes"] == pytest.approx(math.log2((128 + 6400) / (128 + 3200)))
    ratio = rows[1]["stream_w0"]["epoch_s"] / rows[1]["cached"]["epoch_s"]
    assert lines[-2].split(" | ")[6] == f"{ratio:.2f}"


def test_scale_slope_is_the_log_log_exponent():
    scale = load("scale")
    ns = [250, 1000, 4000, 16000]
    assert scale.slope(ns, [3 * n**1.5 for n in ns]) == pytest.approx(1.5, rel=1e-9)  # exact power law
    assert scale.slope(ns, [7.0] * 4) == pytest.approx(0.0, abs=1e-12) and scale.slope([1], [2]) is None
