"""`DataSource`: where a labelled dataset comes from, as a record that can be saved (a model store keeps it in its
manifest) and opened again for a backbone or a trained model.

Three kinds: an image folder (one sub-folder of images per class), a text table (.csv / .jsonl with text and label
columns), or a known dataset (fashion-mnist: images; rotten-tomatoes: texts). The kind of data must match the
model's: a text model reads a table or rotten-tomatoes, an image model a folder or fashion-mnist.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from taft.data.feature_cache.key import CACHE_DTYPE, DTYPES, dtype_name
from taft.data.images import fashion_mnist, image_folder
from taft.data.text import TABLE_EXTENSIONS, rotten_tomatoes, text_table
from taft.errors import TaftError

DATASETS = {"fashion-mnist": "image", "rotten-tomatoes": "text"}  # known dataset -> the kind of model it fits
SPLITS = ("train", "test")
FEATURE_DTYPES = tuple(DTYPES.values())  # "float32", "float16"


@dataclass(frozen=True)
class DataSource:
    """One of `path` (an image folder or a text table) or `dataset` (a name in `DATASETS`, read from `data_dir`
    or its default location, split `split`); `per_class`: keep the first N examples of each class;
    `skip_corrupt`: skip unreadable images with a warning (default: fail); the columns name a table's text,
    label and example id (default id: <file stem>:<row number>). `cache_dtype` and `autocast` say how the trunk
    features of the data were built (the feature-cache precision and the trunk's autocast), so that they can be
    rebuilt the same way. Raises `TaftError` for an inconsistent record."""

    path: Path | None = None
    dataset: str | None = None
    data_dir: Path | None = None
    split: str = "train"
    per_class: int | None = None
    skip_corrupt: bool = False
    text_column: str = "text"
    label_column: str = "label"
    id_column: str | None = None
    cache_dtype: str = dtype_name(CACHE_DTYPE)
    autocast: str = "none"

    def __post_init__(self) -> None:
        if (self.path is None) == (self.dataset is None):
            raise TaftError("give exactly one of a data path or a dataset name", arguments=("path", "dataset"))
        if self.dataset is not None and self.dataset not in DATASETS:
            raise TaftError(f"unknown dataset {self.dataset!r}; known: {', '.join(DATASETS)}")
        if self.split not in SPLITS:
            raise TaftError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.cache_dtype not in FEATURE_DTYPES:
            raise TaftError(f"cache dtype must be one of {', '.join(FEATURE_DTYPES)}, got {self.cache_dtype!r}")

    @property
    def kind(self) -> str:
        """"dataset", "table" (a .csv / .jsonl file) or "folder"."""
        if self.dataset is not None:
            return "dataset"
        return "table" if self.path.suffix.lower() in TABLE_EXTENSIONS else "folder"

    def resolved(self) -> DataSource:
        """The same record with absolute paths (what a store saves: it is reopened from anywhere)."""
        return replace(self, path=self.path.resolve() if self.path is not None else None,
                       data_dir=self.data_dir.resolve() if self.data_dir is not None else None)

    def open(self, model: Any):
        """The dataset, prepared for `model` (a Backbone or a trained Classifier: its preprocessing, and for text
        its tokenizer; a trained model's class names also fix the label order of a folder or table)."""
        tokenizer = model.tokenizer
        kind = "text" if tokenizer is not None else "image"
        class_names = getattr(model, "class_names", None)
        if self.dataset is not None and DATASETS[self.dataset] != kind:
            raise TaftError(f"dataset {self.dataset} is {DATASETS[self.dataset]} data, but the backbone is "
                            f"{'a text' if kind == 'text' else 'an image'} model", arguments=("dataset",))
        if tokenizer is not None and self.path is not None:
            if self.kind != "table":
                raise TaftError(f"{self.path}: a text backbone reads a .csv or .jsonl table", arguments=("path",))
            ds = text_table(self.path, tokenizer, text_column=self.text_column, label_column=self.label_column,
                            id_column=self.id_column, class_names=class_names)
        elif tokenizer is not None:
            ds = rotten_tomatoes(tokenizer, self.split)
        elif self.path is not None:
            if self.path.is_file():
                raise TaftError(f"{self.path} is a file; an image backbone reads a folder of class sub-folders",
                                arguments=("path",))
            ds = image_folder(self.path, model.preprocess, skip_corrupt=self.skip_corrupt, class_names=class_names)
        else:
            ds = fashion_mnist(self.data_dir, self.split, transform=model.preprocess)
        return ds.per_class(self.per_class) if self.per_class is not None else ds

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (a store manifest's `data.source`; its key for `path` is "data")."""
        return {"data": str(self.path) if self.path is not None else None, "dataset": self.dataset,
                "data_dir": str(self.data_dir) if self.data_dir is not None else None, "split": self.split,
                "per_class": self.per_class, "skip_corrupt": self.skip_corrupt, "cache_dtype": self.cache_dtype,
                "autocast": self.autocast, "text_column": self.text_column, "label_column": self.label_column,
                "id_column": self.id_column}

    @classmethod
    def from_dict(cls, d: Any) -> DataSource:
        """The record of `to_dict`; the keys added since the first store format (the columns, autocast) take their
        defaults when absent. `TaftError` for a malformed record."""
        try:
            return cls(path=Path(d["data"]) if d["data"] else None, dataset=d["dataset"],
                       data_dir=Path(d["data_dir"]) if d["data_dir"] else None, split=d["split"],
                       per_class=d["per_class"], skip_corrupt=bool(d["skip_corrupt"]), cache_dtype=d["cache_dtype"],
                       autocast=d.get("autocast", "none"), text_column=d.get("text_column", "text"),
                       label_column=d.get("label_column", "label"), id_column=d.get("id_column"))
        except (KeyError, TypeError, AttributeError) as e:
            raise TaftError(f"malformed data source record ({type(e).__name__}: {e})") from e
