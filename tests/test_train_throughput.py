"""Smoke test of benchmarks/train_throughput.py at tiny sizes: it runs, prints its table and ratios, writes JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("isolated_cache", "one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"


def load_script():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.pop("train_throughput", None)
    spec.loader.exec_module(module)
    return module


def test_train_throughput_smoke(tmp_path, capsys):
    out = load_script().main(["--tiny", "--device", "cpu", "--image-size", "28", "--n", "16", "--classes", "2",
                              "--batch-sizes", "4,8", "--epochs", "1", "--repeats", "1", "--build-batch", "8",
                              "--build-n", "8", "--json", str(tmp_path / "tp.json")])
    printed = capsys.readouterr().out
    assert "trunk-feature build: none" in printed and "bf16/none" in printed
    assert printed.count("TAFT/NLFT cost per example") == 2
    saved = json.loads((tmp_path / "tp.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(out["rows"]))
    for row in saved["rows"]:
        assert set(row["fit_examples_per_s"]) == {"probe", "nlft", "taft"}
        assert all(v > 0 for v in row["loop_examples_per_s"].values())
        assert row["taft_over_nlft_loop"] == row["loop_examples_per_s"]["nlft"] / row["loop_examples_per_s"]["taft"]
    assert set(saved["build_images_per_s"]) == {"none", "bf16"}
