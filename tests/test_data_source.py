"""`DataSource`: the record of where training data came from, saved by a store and opened again."""

from __future__ import annotations

from pathlib import Path

import pytest

from taft.backbones.base import ImagePreprocess
from taft.data.source import DataSource
from taft.errors import TaftError
from helpers import make_classes


class ImageModel:
    """What `DataSource.open` reads of a model: its preprocessing and tokenizer (none: an image model)."""

    preprocess = ImagePreprocess((14, 14), 7)
    tokenizer = None


def test_the_record_round_trips_in_the_manifest_layout(tmp_path):
    source = DataSource(path=tmp_path / "t.csv", per_class=3, text_column="review", id_column="key",
                        cache_dtype="float16", autocast="bf16")
    d = source.to_dict()
    assert d == {"data": str(tmp_path / "t.csv"), "dataset": None, "data_dir": None, "split": "train",
                 "per_class": 3, "skip_corrupt": False, "cache_dtype": "float16", "autocast": "bf16",
                 "text_column": "review", "label_column": "label", "id_column": "key"}
    assert DataSource.from_dict(d) == source and source.kind == "table"
    assert DataSource(dataset="fashion-mnist").kind == "dataset" and DataSource(path=tmp_path).kind == "folder"


def test_a_first_layout_record_opens_with_the_defaults(tmp_path):
    data = make_classes(tmp_path / "data", classes=("ant", "bee"), per_class=3)
    old = {"data": str(data), "dataset": None, "data_dir": None, "split": "train", "per_class": 2,
           "skip_corrupt": False, "cache_dtype": "float32"}
    source = DataSource.from_dict(old)
    assert (source.text_column, source.label_column, source.id_column, source.autocast) == ("text", "label", None,
                                                                                            "none")
    ds = source.open(ImageModel())
    assert ds.class_names == ["ant", "bee"] and len(ds) == 4


def test_resolved_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = DataSource(path=Path("data"), data_dir=None).resolved()
    assert source.path == tmp_path / "data" and source.path.is_absolute()


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of a data path or a dataset name"),
    ({"path": Path("x"), "dataset": "fashion-mnist"}, "exactly one of a data path or a dataset name"),
    ({"dataset": "mnist"}, "unknown dataset 'mnist'"),
    ({"dataset": "fashion-mnist", "split": "val"}, "split must be one of train, test"),
    ({"dataset": "fashion-mnist", "cache_dtype": "bfloat16"}, "cache dtype must be one of"),
])
def test_inconsistent_records_are_refused(kwargs, message):
    with pytest.raises(TaftError, match=message):
        DataSource(**kwargs)


def test_malformed_and_mismatched_records(tmp_path):
    with pytest.raises(TaftError, match="malformed data source record"):
        DataSource.from_dict({"dataset": "fashion-mnist"})
    with pytest.raises(TaftError, match="rotten-tomatoes is text data, but the backbone is an image model"):
        DataSource(dataset="rotten-tomatoes").open(ImageModel())
    (tmp_path / "t.csv").write_text("text,label\na,b\n")
    with pytest.raises(TaftError, match="is a file; an image backbone reads a folder"):
        DataSource(path=tmp_path / "t.csv").open(ImageModel())
