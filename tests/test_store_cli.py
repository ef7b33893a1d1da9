"""`taft shards train`, `taft compose`, `taft forget`, `taft store verify|info|resume` end to end on tiny data
(bundled DINOv2 at 28 px), and their one-line errors."""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import bad, write_image
from taft.cli import main
from taft.fileio import write_json
from taft.store.layout import StoreLayout
from taft.store.manifest import load_manifest
from helpers import make_classes

# SGD: a rounding difference in a gradient stays rounding-sized. (AdamW's first steps move every weight by about
# lr · sign(g), so where a gradient is ~0, e.g. the attention key bias, rounding noise becomes a ±lr difference.)
FAST = ["--image-size", "28", "--epochs", "1", "--quiet", "--lr", "1e-3", "--optimizer", "sgd"]


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-store")
    data = make_classes(root / "data", classes=("ant", "bee", "cow"), per_class=4)
    store = root / "store"
    assert main(["shards", "train", "--min-steps", "0", "--data", str(data), "--shards", "2", "--executor", "inline", "--store",
                 str(store), *FAST]) == 0
    return data, store


@pytest.fixture(autouse=True)
def shared_entry_kept(cli_store, tmp_path_factory):
    """The module's stores share one feature-cache entry; a test that removes it (so that retraining rebuilds the
    features from the data) gets it back afterwards. A rebuilt entry may differ in the last bits (built with another
    thread count), and a later test that retrains as recorded expects the recorded features."""
    _, store = cli_store
    path = Path(load_manifest(StoreLayout(store)).data["features"]["path"])
    saved = Path(shutil.copytree(path, tmp_path_factory.mktemp("entry") / "entry"))
    yield
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(saved, path)
    shutil.rmtree(saved)


@pytest.fixture
def store(cli_store, tmp_path):
    data, store = cli_store
    return data, Path(shutil.copytree(store, tmp_path / "store"))


def test_shards_train_writes_a_store_that_info_eval_and_verify_accept(cli_store, capsys, tmp_path):
    data, store = cli_store
    for name in ("manifest.json", "composed.safetensors", "forgotten.json", "audit.jsonl"):
        assert (store / name).is_file()
    assert len(list((store / "shards").glob("shard-*.safetensors"))) == 2
    m = load_manifest(StoreLayout(store)).to_dict()
    assert m["data"]["source"]["data"] == str(data.resolve()) and m["plan"]["k"] == 2
    assert all({"ant", "bee", "cow"} == {i.split("/")[0] for i in s["ids"]} for s in m["shards"])  # stratified
    composed = str(store / "composed.safetensors")
    assert main(["info", composed]) == 0 and "method       taft" in capsys.readouterr().out
    assert main(["eval", composed, "--data", str(data), "--quiet"]) == 0 and "top-1" in capsys.readouterr().out
    assert main(["store", "verify", str(store)]) == 0 and "OK" in capsys.readouterr().out
    assert main(["store", "info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "plan         random, 2 shards" in out and "shard   1  trained" in out
    assert main(["store", "info", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["n"] == 12
    out_file = tmp_path / "size.safetensors"
    assert main(["compose", str(store), "--weighting", "size", "--shards", "1", "--out", str(out_file)]) == 0
    assert f"wrote {out_file}" in capsys.readouterr().out
    assert main(["info", str(out_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["data"]["count"] == 6


def test_forget_retrain_then_drop_then_noop(store, capsys, tmp_path):
    data, root = store
    m = load_manifest(StoreLayout(root)).to_dict()
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps([m["shards"][0]["ids"][0]]))
    assert main(["forget", str(root), "--ids", str(ids_file), "--mode", "retrain", "--quiet"]) == 0
    assert "forgot 1 id (0 already forgotten); retrained shard [0]" in capsys.readouterr().out
    lines = tmp_path / "ids.txt"
    lines.write_text(m["shards"][1]["ids"][2] + "\n")
    assert main(["forget", str(root), "--ids", str(lines), "--mode", "drop", "--quiet"]) == 0
    assert "dropped shard [1]" in capsys.readouterr().out
    assert main(["forget", str(root), "--ids", str(lines), "--mode", "drop", "--quiet"]) == 0
    assert "nothing to do: the id was already forgotten" in capsys.readouterr().out
    assert main(["compose", str(root), "--weighting", "size"]) == 0
    assert "composed shard [0] (size)" in capsys.readouterr().out
    assert main(["store", "verify", str(root)]) == 0
    assert main(["eval", str(root / "composed.safetensors"), "--data", str(data), "--quiet"]) == 0


def test_forget_retrain_recomputes_features_from_the_recorded_source(store, capsys, tmp_path):
    _, root = store
    m = load_manifest(StoreLayout(root)).to_dict()
    shutil.rmtree(m["data"]["features"]["path"])  # the cache entry is gone: the CLI reads the data again
    (tmp_path / "ids.txt").write_text(m["shards"][1]["ids"][0])
    assert main(["forget", str(root), "--ids", str(tmp_path / "ids.txt"), "--mode", "retrain", "--quiet"]) == 0
    assert "retrained shard [1]" in capsys.readouterr().out


def test_a_store_with_the_first_source_layout_still_rebuilds_its_features(store, capsys, tmp_path):
    """Stores made before the text columns and autocast were recorded: their data source still opens."""
    data, root = store
    layout = StoreLayout(root)
    m = load_manifest(layout).to_dict()
    m["data"]["source"] = {"data": str(data.resolve()), "dataset": None, "data_dir": None, "split": "train",
                           "per_class": None, "skip_corrupt": False, "cache_dtype": "float32"}
    write_json(layout.manifest, m)
    shutil.rmtree(m["data"]["features"]["path"])
    (tmp_path / "ids.txt").write_text(m["shards"][0]["ids"][0])
    assert main(["forget", str(root), "--ids", str(tmp_path / "ids.txt"), "--mode", "retrain", "--quiet"]) == 0
    assert "retrained shard [0]" in capsys.readouterr().out


def test_a_compose_that_changes_nothing_says_so(store, capsys):
    _, root = store
    before = (root / "manifest.json").read_bytes()
    assert main(["compose", str(root), "--weighting", "uniform"]) == 0
    assert "nothing to do: already composed with shards [0, 1] (uniform)" in capsys.readouterr().out
    assert (root / "manifest.json").read_bytes() == before
    next((root / "shards").glob("shard-001-*")).unlink()
    bad(capsys, ["compose", str(root)], "shard 1's file")


def test_store_resume_with_a_corrupt_journal_is_one_line(store, capsys):
    _, root = store
    (root / "pending.json").write_text('{"op": "forget",')
    bad(capsys, ["store", "resume", str(root), "--executor", "inline", "--quiet"], "operation journal")


def test_store_errors_are_one_line(store, capsys, tmp_path):
    data, root = store
    (tmp_path / "ids.txt").write_text("ant/0.png\nno/such.png\n")
    before = (root / "manifest.json").read_text()
    bad(capsys, ["forget", str(root), "--ids", str(tmp_path / "ids.txt"), "--mode", "drop"],
        "1 id is not in the store, e.g. ['no/such.png']; nothing was changed")
    assert (root / "manifest.json").read_text() == before
    bad(capsys, ["forget", str(root), "--ids", str(tmp_path / "missing.txt"), "--mode", "drop"], "cannot read ids")
    bad(capsys, ["compose", str(root), "--shards", "0,x"], "--shards takes shard indices")
    bad(capsys, ["compose", str(tmp_path)], "not a model store")
    bad(capsys, ["shards", "train", "--min-steps", "0", "--data", str(data), "--store", str(root), "--executor", "inline", *FAST],
        "already holds a model store")
    bad(capsys, ["shards", "train", "--min-steps", "0", "--data", str(data), "--store", str(tmp_path / "n"), "--shards", "20",
                 "--executor", "inline", *FAST], "cannot split 12 examples into 20 shards")
    shard = next((root / "shards").glob("shard-000-*"))
    shard.write_bytes(b"garbage")
    assert main(["store", "verify", str(root)]) == 2
    captured = capsys.readouterr()
    assert "shard 0's file" in captured.out and "repair retrains it" in captured.out
    assert captured.err.count("\n") == 1 and "problem(s)" in captured.err
    assert main(["store", "verify", str(root), "--repair"]) == 0  # retrained as recorded, from the cached features
    assert "retrained 1 shard [0] as recorded: the composed model is bit-identical" in capsys.readouterr().out
    assert main(["store", "verify", str(root)]) == 0


def test_store_resume_completes_an_interrupted_forget(store, tmp_path):
    _, root = store
    m = load_manifest(StoreLayout(root)).to_dict()
    (tmp_path / "ids.txt").write_text(m["shards"][1]["ids"][1])
    env = {"TAFT_TEST_CRASH_AT": "after-shard-file"}
    proc = subprocess.run([sys.executable, "-m", "taft.cli", "forget", str(root), "--ids", str(tmp_path / "ids.txt"),
                           "--mode", "retrain", "--executor", "inline", "--quiet"], capture_output=True, text=True,
                          env={**os.environ, **env})
    assert proc.returncode == 86, proc.stderr
    assert (root / "pending.json").exists()
    assert main(["store", "info", str(root)]) == 0
    assert main(["store", "resume", str(root), "--quiet"]) == 0
    assert not (root / "pending.json").exists()
    assert load_manifest(StoreLayout(root)).to_dict()["forgotten"] == [m["shards"][1]["ids"][1]]
    assert main(["store", "verify", str(root)]) == 0


def test_plan_from_rebuilds_a_store_without_forgotten_ids(store, capsys, tmp_path):
    """Forget with retrain, then build from scratch on the data without that image, reusing the store's plan:
    same shards, same model (features of the smaller folder are recomputed in other batches, so equal up to
    float rounding; bit-identity on shared features is tested in test_store.py)."""
    import torch

    from taft.store import ModelStore
    from taft.checkpoint import read_checkpoint

    data, root = store
    gone = load_manifest(StoreLayout(root)).to_dict()["shards"][0]["ids"][1]
    (tmp_path / "ids.txt").write_text(gone)
    assert main(["forget", str(root), "--ids", str(tmp_path / "ids.txt"), "--mode", "retrain", "--quiet"]) == 0
    smaller = Path(shutil.copytree(data, tmp_path / "data"))
    (smaller / gone).unlink()
    scratch = tmp_path / "scratch"
    assert main(["shards", "train", "--min-steps", "0", "--data", str(smaller), "--plan-from", str(root), "--executor", "inline",
                 "--store", str(scratch), *FAST]) == 0
    a, b = load_manifest(StoreLayout(root)).to_dict(), load_manifest(StoreLayout(scratch)).to_dict()
    assert [s["ids"] for s in a["shards"]] == [s["ids"] for s in b["shards"]] and b["threads"] == a["threads"]
    x = read_checkpoint(ModelStore(root).composed_path).tensors
    y = read_checkpoint(ModelStore(scratch).composed_path).tensors
    assert all(torch.allclose(x[k], y[k], atol=1e-5, rtol=1e-4) for k in x)


def moved_data(data: Path, root: Path, tmp_path: Path) -> Path:
    """A copy of the store's data, now the store's recorded source; the store's feature-cache entry removed (so
    retraining rebuilds the features from the copy)."""
    layout = StoreLayout(root)
    m = load_manifest(layout).to_dict()
    copy = Path(shutil.copytree(data, tmp_path / "data"))
    m["data"]["source"]["data"] = str(copy.resolve())
    write_json(layout.manifest, m)
    shutil.rmtree(m["data"]["features"]["path"], ignore_errors=True)
    return copy


@pytest.mark.slow
def test_forget_retrain_refuses_data_changed_since_training(store, capsys, tmp_path):
    from taft.store import ModelStore

    data, root = store
    copy = moved_data(data, root, tmp_path)
    m = load_manifest(StoreLayout(root)).to_dict()
    kept, gone = m["shards"][1]["ids"][:2]
    shutil.copy(copy / m["shards"][0]["ids"][0], copy / kept)  # another image under an id the shard keeps
    (tmp_path / "ids.txt").write_text(gone)
    before = (root / "manifest.json").read_bytes()
    forget = ["forget", str(root), "--ids", str(tmp_path / "ids.txt"), "--mode", "retrain", "--quiet"]
    bad(capsys, forget, "changed since the store was trained: an example of shard 1's 6 was replaced or relabelled")
    bad(capsys, forget, "retrain on it anyway with --accept-changed-data")
    assert (root / "manifest.json").read_bytes() == before and not (root / "pending.json").exists()
    assert main([*forget, "--accept-changed-data"]) == 0
    assert "retrained shard [1]" in capsys.readouterr().out
    assert "replaced or relabelled" in ModelStore(root).audit()[-1]["accepted_changed_data"]
    assert main(["store", "verify", str(root)]) == 0


@pytest.mark.slow
def test_forget_retrain_accepts_data_without_examples_forgotten_before(store, capsys, tmp_path):
    from taft.store import ModelStore

    data, root = store
    m = load_manifest(StoreLayout(root)).to_dict()
    first, second = m["shards"][0]["ids"][:2]
    (tmp_path / "first.txt").write_text(first)
    assert main(["forget", str(root), "--ids", str(tmp_path / "first.txt"), "--mode", "retrain", "--quiet"]) == 0
    copy = moved_data(data, root, tmp_path)
    (copy / first).unlink()  # the forgotten image is deleted from the data, as it may be
    (copy / "ant" / "new.png").write_bytes((copy / second).read_bytes())  # an image the store never held
    (tmp_path / "second.txt").write_text(second)
    assert main(["forget", str(root), "--ids", str(tmp_path / "second.txt"), "--mode", "retrain", "--quiet"]) == 0
    assert "retrained shard [0]" in capsys.readouterr().out
    assert not any("accepted_changed_data" in e for e in ModelStore(root).audit())


@pytest.mark.slow
def test_store_resume_of_a_retrain_refuses_data_changed_since_training(store, capsys, tmp_path):
    data, root = store
    m = load_manifest(StoreLayout(root)).to_dict()
    (tmp_path / "ids.txt").write_text(m["shards"][0]["ids"][0])
    proc = subprocess.run([sys.executable, "-m", "taft.cli", "forget", str(root), "--ids", str(tmp_path / "ids.txt"),
                           "--mode", "retrain", "--executor", "inline", "--quiet"], capture_output=True, text=True,
                          env={**os.environ, "TAFT_TEST_CRASH_AT": "after-pending"})
    assert proc.returncode == 86, proc.stderr
    copy = moved_data(data, root, tmp_path)
    (copy / m["shards"][0]["ids"][1]).unlink()
    pending = (root / "pending.json").read_bytes()
    bad(capsys, ["store", "resume", str(root), "--quiet"], "1 example of shard 0 is no longer in the data")
    assert (root / "pending.json").read_bytes() == pending
    assert main(["store", "resume", str(root), "--quiet", "--accept-changed-data"]) == 2  # the features lack it
    assert "not in the training features" in capsys.readouterr().err


@pytest.mark.slow
def test_an_interrupted_first_shards_train_is_recognised_by_verify_and_info(cli_store, capsys, tmp_path):
    data, _ = cli_store
    root = tmp_path / "new"
    proc = subprocess.run([sys.executable, "-m", "taft.cli", "shards", "train", "--min-steps", "0", "--data", str(data),
                           "--shards", "2", "--executor", "inline", "--store", str(root), *FAST],
                          capture_output=True, text=True, env={**os.environ, "TAFT_TEST_CRASH_AT": "after-shard-file"})
    assert proc.returncode == 86 and not (root / "manifest.json").exists(), proc.stderr
    how = f"rerun the same `taft shards train` command, or `taft store resume {root}`, to finish it"
    assert main(["store", "info", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "is being created" in out and "1 of 2 shards finished" in out and how in out
    for repair in ([], ["--repair"]):
        assert main(["store", "verify", str(root), *repair]) == 2
        captured = capsys.readouterr()
        assert "PROBLEMS FOUND" in captured.out and "1 of 2 shards finished" in captured.out and how in captured.out
        assert captured.err.count("\n") == 1
    assert main(["store", "resume", str(root), "--quiet"]) == 0
    assert main(["store", "verify", str(root)]) == 0 and "OK" in capsys.readouterr().out


def test_shards_train_reports_the_composed_models_top1(capsys, tmp_path):
    data = make_classes(tmp_path / "data", classes=("ant", "bee", "cow"), per_class=4)
    val = make_classes(tmp_path / "val", classes=("ant", "bee", "cow"), per_class=2)
    common = ["shards", "train", "--min-steps", "0", "--data", str(data), "--shards", "2", "--executor", "inline", *FAST]
    assert main([*common, "--store", str(tmp_path / "a")]) == 0
    assert re.search(r"composed model: training top-1 \d+\.\d\d% on 12 examples", capsys.readouterr().out)
    assert main([*common, "--store", str(tmp_path / "b"), "--val-data", str(val)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"composed model: validation top-1 \d+\.\d\d% on 6 examples", out), out


def test_store_add_and_import_grow_a_store_and_refuse_in_one_line(store, capsys, tmp_path):
    _, root = store
    week2 = tmp_path / "week2"
    for c, name in enumerate(("ant", "bee", "cow")):
        for i in range(2):
            write_image(week2 / name / f"w2-{i}.png", seed=500 + 10 * c + i, size=(20 + c, 20))
    assert main(["store", "add", str(root), "--data", str(week2), "--executor", "inline", "--quiet"]) == 0
    assert "added 6 examples to store" in capsys.readouterr().out  # 6 examples at the mean shard size 6: one shard
    m = load_manifest(StoreLayout(root))
    assert m.plan.num_shards == 3 and m.additions[0].data["source"]["data"] == str(week2.resolve())
    before = (root / "manifest.json").read_text()
    bad(capsys, ["store", "add", str(root), "--data", str(week2), "--quiet"], "6 ids are already in the store")
    write_image(tmp_path / "odd" / "dog" / "d.png", seed=1)
    write_image(tmp_path / "odd" / "ant" / "a.png", seed=2)
    bad(capsys, ["store", "add", str(root), "--data", str(tmp_path / "odd"), "--quiet"],
        "class folders ['dog'] are not among the model's classes")
    partner = make_classes(tmp_path / "partner", classes=("ant", "bee", "cow"), per_class=4)
    for f in list(partner.rglob("*.png")):
        f.rename(f.with_name("p-" + f.name))
    assert main(["shards", "train", "--min-steps", "0", "--data", str(partner), "--shards", "1", "--executor", "inline",
                 "--store", str(tmp_path / "p"), *FAST]) == 0
    other = next((tmp_path / "p" / "shards").glob("shard-000-*"))
    assert (root / "manifest.json").read_text() == before
    capsys.readouterr()
    assert main(["store", "import", str(root), str(other), "--quiet"]) == 0
    assert "as shards [3] (12 examples; drop-only" in capsys.readouterr().out
    before = (root / "manifest.json").read_text()
    bad(capsys, ["store", "import", str(root), str(next((root / "shards").glob("shard-000-*")))], "already in the store")
    assert (root / "manifest.json").read_text() == before
    (tmp_path / "ids.txt").write_text("ant/p-0.png\n")
    assert main(["forget", str(root), "--ids", str(tmp_path / "ids.txt"), "--mode", "retrain", "--quiet"]) == 0
    assert "shard [3] was imported without training data: dropped" in capsys.readouterr().out
    assert main(["store", "info", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"shard [2] ({week2.resolve()})" in out and "shard [3] (no data: drop-only)" in out


def test_shards_train_streams_with_augmentation_and_store_add_streams_too(tmp_path, capsys):
    data = make_classes(tmp_path / "data", classes=("ant", "bee", "cow"), per_class=4)
    store = tmp_path / "store"
    assert main(["shards", "train", "--min-steps", "0", "--data", str(data), "--shards", "2", "--executor", "inline",
                 "--store", str(store), "--augment", "flip", *FAST]) == 0
    m = load_manifest(StoreLayout(store))
    assert m.data["features"]["streamed"] and m.train_config["augment"] == "flip"
    week2 = make_classes(tmp_path / "week2", classes=("ant", "bee", "cow"), per_class=2, prefix="w2-")
    assert main(["store", "add", str(store), "--data", str(week2), "--executor", "inline", "--quiet"]) == 0
    assert load_manifest(StoreLayout(store)).additions[0].data["features"]["streamed"]
    (tmp_path / "ids.txt").write_text("ant/w2-0.png\nbee/1.png\n")
    assert main(["forget", str(store), "--ids", str(tmp_path / "ids.txt"), "--mode", "retrain", "--executor",
                 "inline", "--quiet"]) == 0  # retrains both sources' shards, streamed again from the folders
    assert "retrained shards [" in capsys.readouterr().out
    bad(capsys, ["shards", "train", "--data", str(data), "--store", str(tmp_path / "s2"), "--features", "cache",
                 "--augment", "flip", *FAST], "needs streamed trunk features")


def test_an_interrupted_streamed_addition_is_resumed_from_its_source(tmp_path, capsys, monkeypatch):
    from taft.store.layout import CRASH_ENV, CRASH_EXIT

    data = make_classes(tmp_path / "data", classes=("ant", "bee", "cow"), per_class=4)
    store = tmp_path / "store"
    assert main(["shards", "train", "--min-steps", "0", "--data", str(data), "--shards", "2", "--executor", "inline",
                 "--store", str(store), "--features", "stream", *FAST]) == 0
    week2 = make_classes(tmp_path / "week2", classes=("ant", "bee", "cow"), per_class=2, prefix="w2-")
    code = (f"import sys; from taft.cli import main; sys.exit(main(['store', 'add', {str(store)!r}, '--data', "
            f"{str(week2)!r}, '--executor', 'inline', '--quiet']))")
    crashed = subprocess.run([sys.executable, "-c", code], env={**os.environ, CRASH_ENV: "after-pending"},
                             capture_output=True, text=True, timeout=120)
    assert crashed.returncode == CRASH_EXIT, crashed.stderr
    capsys.readouterr()
    assert main(["store", "resume", str(store), "--executor", "inline", "--quiet"]) == 0
    assert "completed the addition of 6 examples" in capsys.readouterr().out
    m = load_manifest(StoreLayout(store))
    assert m.additions[0].data["features"]["streamed"] and m.plan.num_shards == 3
