"""Runs, caches and ids a user can manage from the command line (issue 14): `taft store ids`, `taft cache`,
`--log-file`, the per-run training curve, and `taft train --resume`."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import pytest

from helpers import bad
from taft.cli import main
from helpers import make_classes
from test_cli import FAST

pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ids")
    data = make_classes(root / "data", per_class=4)
    store = root / "store"
    assert main(["shards", "train", "--min-steps", "0", "--data", str(data), "--shards", "2", "--executor", "inline", "--store",
                 str(store), *FAST]) == 0
    return data, store


def test_store_ids_lists_each_shards_ids(small_store, capsys, tmp_path):
    data, store = small_store
    capsys.readouterr()
    manifest = json.loads((store / "manifest.json").read_text())
    assert main(["store", "ids", str(store)]) == 0
    every = capsys.readouterr().out.splitlines()
    assert sorted(every) == sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    assert main(["store", "ids", str(store), "--shard", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == manifest["shards"][1]["ids"]
    bad(capsys, ["store", "ids", str(store), "--shard", "2"], "no shard 2")
    copy = tmp_path / "copy"
    assert main(["shards", "train", "--min-steps", "0", "--data", str(data), "--shards", "2", "--executor", "inline", "--store",
                 str(copy), *FAST]) == 0
    (tmp_path / "ids.txt").write_text(every[0] + "\n")  # the listing is what forget --ids reads
    assert main(["forget", str(copy), "--ids", str(tmp_path / "ids.txt"), "--mode", "drop", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["store", "ids", str(copy), "--forgotten"]) == 0
    assert capsys.readouterr().out.splitlines() == [every[0]]


def test_log_file_and_training_curve(tmp_path, capsys):
    data = make_classes(tmp_path / "data", per_class=4)
    log = tmp_path / "logs" / "train.log"
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--image-size", "28", "--epochs", "2",
            "--log-file", str(log)]
    with warnings.catch_warnings():  # print warnings, as on the command line, rather than pytest recording them
        warnings.simplefilter("always")
        warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(m, c, f, n, line))  # what Python's default does
        assert main(argv) == 0
    printed = capsys.readouterr()
    lines = log.read_text().splitlines()
    assert lines[0].startswith("# ") and "taft train --data" in lines[0]
    assert any(line.startswith("taft k=1: validation top-1") for line in lines)  # stdout
    assert any(line.startswith("taft: warning: only") for line in lines)  # warnings (stderr)
    assert any(line.startswith("taft k=1: 2/2 step") for line in lines)  # a progress bar's final state
    assert "\r" not in log.read_text() and "" not in lines and "run directory:" in printed.out
    assert main(argv) == 2  # the run exists: the error is logged too, after a new header
    lines = log.read_text().splitlines()
    assert lines[-2].startswith("# ") and lines[-1].startswith("taft: error:") and "--overwrite" in lines[-1]
    curve = tmp_path / "run" / "training_curve.png"
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cache_list_and_clear_older_than(tmp_path, capsys):
    data = make_classes(tmp_path / "data", per_class=4)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), *FAST]) == 0
    capsys.readouterr()
    assert main(["cache", "list", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    kinds = sorted(e["kind"] for e in entries)
    assert kinds == ["backbone", "features", "features"], entries  # converted weights, train and validation
    features = [e for e in entries if e["kind"] == "features"]
    assert all(e["size_bytes"] > 0 and "images" in e["description"] and "ant, bee" in e["description"]
               for e in features)
    assert main(["cache", "list"]) == 0
    assert "3 entries" in capsys.readouterr().out
    old = Path(features[0]["path"])
    for f in old.iterdir():  # written 10 days ago
        os.utime(f, (time.time() - 10 * 86400,) * 2)
    assert main(["cache", "clear", "--older-than", "7d"]) == 0
    assert "removed 1 entries" in capsys.readouterr().out and not old.exists()
    assert main(["cache", "list", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    bad(capsys, ["cache", "clear", "--older-than", "soon"], "--older-than")
    assert main(["cache", "clear"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out


def _content(run: Path) -> str:
    from taft.checkpoint import checkpoint_content_sha256

    return checkpoint_content_sha256(run / "checkpoint.safetensors")


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory):
    return make_classes(tmp_path_factory.mktemp("resume") / "data", per_class=5)


def test_resume_a_finished_constant_schedule_run_equals_the_longer_run(resume_data, tmp_path):
    common = ["train", "--data", str(resume_data), "--image-size", "28", "--quiet", "--batch-size", "4",
              "--schedule", "constant", "--lr", "1e-3"]
    assert main([*common, "--epochs", "4", "--out", str(tmp_path / "whole")]) == 0
    assert main([*common, "--epochs", "2", "--out", str(tmp_path / "part")]) == 0
    assert _content(tmp_path / "part") != _content(tmp_path / "whole")
    assert main(["train", "--resume", str(tmp_path / "part"), "--epochs", "4", "--quiet"]) == 0
    assert _content(tmp_path / "part") == _content(tmp_path / "whole")
    for name in ("metrics.jsonl",):
        losses = [[json.loads(line)["train_loss"] for line in (tmp_path / run / name).read_text().splitlines()]
                  for run in ("part", "whole")]
        assert losses[0] == losses[1] and len(losses[0]) == 4
    assert json.loads((tmp_path / "part" / "config.json").read_text())["epochs"] == 4


def test_resume_an_interrupted_cosine_run_equals_the_uninterrupted_one(resume_data, tmp_path, monkeypatch, capsys):
    import taft.train.loop as loop

    common = ["train", "--data", str(resume_data), "--image-size", "28", "--quiet", "--batch-size", "4",
              "--epochs", "3"]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    finish = loop.finish_epoch

    def interrupted(classifier, config, val, record, *args, **kw):
        finish(classifier, config, val, record, *args, **kw)
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "finish_epoch", interrupted)
    assert main([*common, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.setattr(loop, "finish_epoch", finish)
    assert not (tmp_path / "cut" / "checkpoint.safetensors").exists()
    assert main(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0  # to the run's own 3 epochs
    assert _content(tmp_path / "cut") == _content(tmp_path / "whole")
    capsys.readouterr()
    bad(capsys, ["train", "--resume", str(tmp_path / "cut"), "--epochs", "2", "--quiet"], "already trained 3")
    bad(capsys, ["train", "--resume", str(resume_data), "--quiet"], "not a run directory")
    other = make_classes(tmp_path / "other", per_class=5)
    bad(capsys, ["train", "--resume", str(tmp_path / "cut"), "--data", str(other), "--lr", "0.5", "--quiet"],
        "continues that run with its own data and settings; leave out --data, --lr")
    assert main(["train", "--resume", str(tmp_path / "cut"), "--data", str(resume_data), "--epochs", "4",
                 "--quiet"]) == 0  # the run's own values may be repeated


def test_library_errors_name_the_options_they_are_about(capsys, tmp_path):
    """The library's message names its parameters; the command line adds its options."""
    bad(capsys, ["train", "--data", str(tmp_path), "--dataset", "fashion-mnist", "--quiet"],
        "give exactly one of a data path or a dataset name (--data, --dataset)")


def test_library_keywords_become_options():
    from taft.cli import in_cli_terms
    from taft.errors import TaftError

    e = TaftError('use device="cpu" or device=auto; skip_corrupt=True, data_dir=FOLDER',
                  arguments=("device", "skip_corrupt", "data_dir", "path", "unknown"))
    assert in_cli_terms(e) == "use --device cpu or --device auto; --skip-corrupt, --data-dir FOLDER (--data)"
    assert in_cli_terms(TaftError("plain")) == "plain"
