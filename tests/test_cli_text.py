"""The `taft` command on text with the bundled MiniLM (`--backbone minilm-l6`): tables, predict on texts, stores,
forgetting, DP, and the one-line errors for bad text input."""

from __future__ import annotations

import json

import pytest

from helpers import bad, write_csv, write_jsonl
from taft.checkpoint import read_checkpoint_metadata
from taft.cli import main

pytestmark = pytest.mark.usefixtures("isolated_cache", "one_thread")

POS = ["a gripping, beautifully shot film", "warm, witty and wise", "one of the year's best", "a small gem",
       "superb acting", "an utter delight"]
NEG = ["dull", "tedious from start to finish", "I wanted my two hours back", "flat and lifeless",
       "mediocre at best", "far too long"]
TEXT = ["--backbone", "minilm-l6", "--epochs", "2", "--quiet"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    data = write_csv(root / "reviews.csv", [(t, "pos") for t in POS] + [(t, "neg") for t in NEG])
    out = root / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--val-fraction", "0", "--lr", "1e-3",
                 "--max-length", "16", *TEXT]) == 0
    return root, data, out


def test_train_on_a_csv_table_writes_a_text_checkpoint(text_run):
    _, _, out = text_run
    meta = read_checkpoint_metadata(out / "checkpoint.safetensors")
    assert meta["backbone"] == "minilm-l6" and meta["pooling"] == "mean"
    assert meta["class_names"] == ["neg", "pos"] and meta["preprocess"]["max_length"] == 16
    assert len(meta["preprocess"]["tokenizer"]) == 64
    assert json.loads((out / "metrics.json").read_text())["n_train"] == 12


def test_eval_on_jsonl_and_predict_texts(text_run, capsys, tmp_path):
    _, _, out = text_run
    test = write_jsonl(tmp_path / "t.jsonl", [{"text": t, "label": "pos"} for t in POS[:2]] + [{"text": NEG[0],
                                                                                              "label": "neg"}])
    assert main(["eval", str(out / "checkpoint.safetensors"), "--data", str(test), "--quiet",
                 "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["n"] == 3
    capsys.readouterr()
    lines_file = tmp_path / "lines.txt"
    lines_file.write_text("superb\n\nboring\n")
    assert main(["predict", str(out / "checkpoint.safetensors"), "a wonderful film", "--file", str(lines_file),
                 "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("\t")[0] for ln in lines] == ["a wonderful film", "superb", "boring"]
    assert all(("pos" in ln and "neg" in ln) for ln in lines)


def test_eval_names_an_unknown_label(text_run, capsys, tmp_path):
    _, _, out = text_run
    test = write_jsonl(tmp_path / "t.jsonl", [{"text": "fine", "label": "pos"}, {"text": "meh", "label": "meh"}])
    bad(capsys, ["eval", str(out / "checkpoint.safetensors"), "--data", str(test), "--quiet"], "'meh'")


@pytest.mark.parametrize("rows, message", [
    ([("fine", "pos"), ("   ", "neg"), ("bad", "neg")], "empty"),
    ([("fine", "pos"), ("bad", "pos")], "at least 2 classes"),
])
def test_bad_text_tables_fail_with_one_line(capsys, tmp_path, rows, message):
    data = write_csv(tmp_path / "d.csv", rows)
    bad(capsys, ["train", "--data", str(data), "--out", str(tmp_path / "r"), *TEXT], message)


def test_missing_column_and_mismatched_data_kinds(capsys, tmp_path):
    data = write_csv(tmp_path / "d.csv", [("fine", "pos"), ("bad", "neg")], header=("review", "label"))
    bad(capsys, ["train", "--data", str(data), "--out", str(tmp_path / "r"), *TEXT], "review")
    bad(capsys, ["train", "--dataset", "fashion-mnist", "--out", str(tmp_path / "r"), *TEXT], "image data")
    bad(capsys, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), *TEXT], ".csv or .jsonl")
    bad(capsys, ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--image-size", "28", *TEXT],
        "--image-size does not apply")
    bad(capsys, ["train", "--dataset", "rotten-tomatoes", "--out", str(tmp_path / "r"), "--max-length", "9999",
                 *TEXT], "max_length")


def test_long_texts_are_truncated_with_a_warning(capsys, tmp_path):
    long = " ".join(["wonderful"] * 40)
    data = write_csv(tmp_path / "d.csv", [(long, "pos"), ("fine", "pos"), ("bad", "neg"), ("awful", "neg")])
    with pytest.warns(UserWarning, match="1 of 4 texts .*max_length=8"):
        assert main(["train", "--data", str(data), "--out", str(tmp_path / "r"), "--max-length", "8",
                     "--val-fraction", "0", *TEXT]) == 0


def test_text_store_compose_forget_and_dp(capsys, tmp_path):
    data = write_csv(tmp_path / "d.csv", [(t, "pos") for t in POS] + [(t, "neg") for t in NEG])
    store = tmp_path / "store"
    assert main(["shards", "train", "--min-steps", "0", "--data", str(data), "--store", str(store), "--shards", "3",
                 "--executor", "inline", *TEXT]) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    victim = manifest["plan"]["shards"][1][0]
    (tmp_path / "ids.txt").write_text(victim + "\n")
    assert main(["forget", str(store), "--ids", str(tmp_path / "ids.txt"), "--mode", "retrain",
                 "--executor", "inline", "--quiet"]) == 0
    assert victim in json.dumps(json.loads((store / "forgotten.json").read_text()))
    assert main(["compose", str(store), "--shards", "0,2"]) == 0
    (tmp_path / "unknown.txt").write_text("d:999\n")
    bad(capsys, ["forget", str(store), "--ids", str(tmp_path / "unknown.txt"), "--mode", "drop", "--quiet"],
        "d:999")
    dp_out = tmp_path / "dp"
    assert main(["train", "--data", str(data), "--out", str(dp_out), "--val-fraction", "0", "--dp",
                 "--noise-multiplier", "1.0", "--delta", "1e-2", "--batch-size", "4", *TEXT]) == 0
    assert read_checkpoint_metadata(dp_out / "checkpoint.safetensors")["privacy"]["noise_multiplier"] == 1.0


def test_text_demo_runs_on_a_few_snippets(tmp_path, capsys):
    assert main(["demo", "--text", "--train-per-class", "4", "--test-per-class", "3", "--epochs", "1",
                 "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "Rotten Tomatoes: 8 training and 6 test snippets" in out and "test top-1" in out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["data"] == "rotten-tomatoes" and [r["method"] for r in summary["rows"]] == ["probe", "nlft", "taft"]
