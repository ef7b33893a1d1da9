"""Smoke tests of the benchmark scripts at tiny sizes: they run end to end and print their ratios (the numbers
themselves are measured by running the scripts, see docs/results.md)."""

from __future__ import annotations

import importlib.util
import json
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
