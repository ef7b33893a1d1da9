"""Labelled image datasets: an image folder (one class per sub-folder) or Fashion-MNIST IDX files.

An `ImageDataset` is a list of records (example id, label, image source) plus class names and a transform.
`dataset[i]` is `(image tensor (C, H, W), label, id)`. Ids are stable strings (relative POSIX paths for a
folder, `"{split}/{index}"` for Fashion-MNIST) so the model store can name and forget examples.

`content_hash()` names the data: ids, labels and class names in dataset order, plus file contents (SHA-256 of
each image file, or size + mtime with `hash_mode="stat"`) or the IDX files' digests. It changes when any image
is rewritten, added or removed, and is computed once per dataset object (the object is a snapshot).

Unreadable images (policy): `image_folder` scans every file once when it is built. By default it decodes each
image (`check="decode"`; `check="open"` reads only the headers, faster for large folders) and raises one
`TaftError` listing the bad files (up to 10 named); with `skip_corrupt=True` it drops them and warns with the
same list. A file that still fails later (changed on disk, or not decoded by `check="open"`) raises
`TaftError` naming it when loaded.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from taft.backbones.base import ImagePreprocess
from taft.data.split import per_class_positions, select_positions
from taft.data.transforms import ImageTransform
from taft.errors import AssetMissingError, TaftError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_INSTALL = "sudo apt-get install dataset-fashion-mnist"

Transform = Callable[[Image.Image], torch.Tensor]
_MAX_LISTED = 10


class ImageSource(Protocol):
    """Where one image comes from: `load()` returns a PIL image, `digest()` a string naming its content."""

    def load(self) -> Image.Image: ...

    def digest(self) -> str: ...


@dataclass(frozen=True)
class FileImage:
    """An image file. `digest()` is the SHA-256 of its bytes, or `size:mtime_ns` when `hash_mode="stat"`."""

    path: Path
    hash_mode: Literal["bytes", "stat"] = "bytes"

    def load(self) -> Image.Image:
        try:
            with Image.open(self.path) as im:
                im.load()
                return im
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            raise TaftError(f"cannot read image {self.path}: {e}") from e

    def digest(self) -> str:
        try:
            if self.hash_mode == "stat":
                st = self.path.stat()
                return f"{st.st_size}:{st.st_mtime_ns}"
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError as e:
            raise TaftError(f"cannot read image {self.path}: {e}") from e


@dataclass(frozen=True, eq=False)
class ArrayImage:
    """Image `index` of a uint8 array (n, H, W) or (n, H, W, 3); its content is named by the dataset's
    source digest, so `digest()` is empty."""

    array: np.ndarray
    index: int

    def load(self) -> Image.Image:
        return Image.fromarray(self.array[self.index])

    def digest(self) -> str:
        return ""


@dataclass(frozen=True)
class ImageRecord:
    """One example: a stable id, an integer label in [0, n_classes) and where its image comes from."""

    id: str
    label: int
    source: ImageSource


class ImageDataset(Dataset):
    """Records + class names + transform. `dataset[i] -> (transform(image), label, id)`.

    `transform` is an `ImageTransform` (from an `ImagePreprocess`, which is converted) or any callable
    `PIL.Image -> Tensor`; None until a model's preprocessing is applied (`Classifier.cache_features`).
    `source_digest` names content shared by all records (e.g. IDX file digests); a callable is called lazily.
    Raises `TaftError` on duplicate ids or labels outside [0, len(class_names)).
    """

    def __init__(self, records: Sequence[ImageRecord], class_names: Sequence[str],
                 transform: ImagePreprocess | Transform | None = None,
                 source_digest: str | Callable[[], str] = "") -> None:
        self.records = list(records)
        self.class_names = [str(c) for c in class_names]
        self.transform = ImageTransform(transform) if isinstance(transform, ImagePreprocess) else transform
        self._source_digest = source_digest
        self._content_hash: str | None = None
        self._index: dict[str, int] | None = None
        n_cls = len(self.class_names)
        bad = [r.id for r in self.records if not 0 <= int(r.label) < n_cls]
        if bad:
            raise TaftError(f"labels outside [0, {n_cls}) for {len(bad)} examples, e.g. {bad[:_MAX_LISTED]}")
        if len(self.index) != len(self.records):
            seen: set[str] = set()
            dup = [r.id for r in self.records if r.id in seen or seen.add(r.id)]
            raise TaftError(f"duplicate example ids: {dup[:_MAX_LISTED]}")

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    @property
    def labels(self) -> list[int]:
        return [int(r.label) for r in self.records]

    @property
    def index(self) -> dict[str, int]:
        """Position of each id in the dataset."""
        if self._index is None:
            self._index = {r.id: i for i, r in enumerate(self.records)}
        return self._index

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        if self.transform is None:
            raise TaftError("this image dataset has no preprocessing: give it a transform, or cache its features "
                            "through a model (model.cache_features), which applies the model's")
        r = self.records[i]
        return self.transform(r.source.load()), int(r.label), r.id

    def transform_id(self) -> dict | None:
        """`cache_id()` of the transform when it has one (an `ImageTransform` does), else None."""
        cache_id = getattr(self.transform, "cache_id", None)
        return cache_id() if callable(cache_id) else None

    def content_hash(self) -> str:
        """SHA-256 of class names, (id, label, image content) in order and the source digest (see module doc)."""
        if self._content_hash is None:
            h = hashlib.sha256()
            src = self._source_digest() if callable(self._source_digest) else self._source_digest
            h.update(json.dumps({"classes": self.class_names, "source": src}).encode())
            for r in self.records:
                h.update(json.dumps([r.id, int(r.label), r.source.digest()]).encode())
            self._content_hash = h.hexdigest()
        return self._content_hash

    def _derived(self, records: Sequence[ImageRecord], transform: ImagePreprocess | Transform | None = None
                 ) -> ImageDataset:
        return ImageDataset(records, self.class_names, self.transform if transform is None else transform,
                            self._source_digest)

    def with_transform(self, transform: ImagePreprocess | Transform) -> ImageDataset:
        """The same records with another transform (e.g. another image size)."""
        out = self._derived(self.records, transform)
        out._content_hash = self._content_hash
        return out

    def select(self, ids: Sequence[str]) -> ImageDataset:
        """The examples whose id is in `ids`, in dataset order. Raises `TaftError` naming unknown ids."""
        return self._derived([self.records[k] for k in select_positions(self.ids, ids)])

    def per_class(self, n: int, seed: int | None = None) -> ImageDataset:
        """At most `n` examples per class, in dataset order: the first `n` (seed None) or a seeded sample that
        depends only on (seed, id), not on the dataset order."""
        return self._derived([self.records[k] for k in per_class_positions(self.ids, self.labels, n, seed)])

    def __repr__(self) -> str:
        return f"ImageDataset({len(self)} examples, {len(self.class_names)} classes, transform={self.transform})"


def list_image_files(folder: Path) -> list[Path]:
    """The image files under `folder` (recursively, symlinks followed, hidden entries skipped), in sorted order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames)
                if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return out


def _check_image(path: Path, decode: bool) -> str | None:
    """None if the image opens (and decodes), else the reason."""
    try:
        with Image.open(path) as im:
            if decode:
                im.load()
            if im.width <= 0 or im.height <= 0:
                return "zero-size image"
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__
    return None


def image_folder(root: str | os.PathLike, transform: ImagePreprocess | Transform | None = None, *,
                 skip_corrupt: bool = False, check: Literal["decode", "open"] = "decode",
                 hash_mode: Literal["bytes", "stat"] = "bytes",
                 class_names: Sequence[str] | None = None) -> ImageDataset:
    """A dataset from `root/<class>/**/<image>`: classes are the sorted sub-folder names (hidden ones
    skipped), images are files with an extension in `IMAGE_EXTENSIONS` (any case), ids are paths relative to
    `root` in POSIX form. Raises `TaftError` if `root` is missing, has no class folders, fewer than 2 classes,
    a class without images, or unreadable images (unless `skip_corrupt`; see the module doc).

    `class_names` (e.g. a trained model's, to evaluate it): the dataset's classes and label order; the folder
    may hold any of them (one is enough), and a sub-folder that is not among them is an error naming it."""
    root = Path(root)
    if not root.is_dir():
        raise TaftError(f"image folder {root} does not exist or is not a directory")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise TaftError(f"image folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
    if class_names is not None:
        classes = [str(c) for c in class_names]
        unknown = [c for c in folders if c not in classes]
        if unknown:
            raise TaftError(f"image folder {root}: class folders {unknown[:_MAX_LISTED]} are not among the "
                            f"model's classes {classes[:_MAX_LISTED]}")
    else:
        classes = folders
    if len(classes) < 2:
        raise TaftError(f"image folder {root} has a single class ({classes[0]!r}); classification needs at "
                        "least 2 class sub-folders")
    files = {c: list_image_files(root / c) for c in folders}
    empty = [c for c in folders if not files[c]]
    if empty:
        raise TaftError(f"image folder {root}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in class "
                        f"folders {empty[:_MAX_LISTED]}")
    if check not in ("decode", "open"):
        raise TaftError(f"check must be 'decode' or 'open', got {check!r}")
    if hash_mode not in ("bytes", "stat"):
        raise TaftError(f"hash_mode must be 'bytes' or 'stat', got {hash_mode!r}")
    records, corrupt = [], []
    for c in folders:
        label = classes.index(c)
        for path in files[c]:
            reason = _check_image(path, decode=check == "decode")
            rel = path.relative_to(root).as_posix()
            if reason is None:
                records.append(ImageRecord(rel, label, FileImage(path, hash_mode)))
            else:
                corrupt.append(f"{rel} ({reason})")
    if corrupt:
        listed = "; ".join(corrupt[:_MAX_LISTED]) + (f"; and {len(corrupt) - _MAX_LISTED} more"
                                                      if len(corrupt) > _MAX_LISTED else "")
        count = f"{len(corrupt)} unreadable image{'s' if len(corrupt) > 1 else ''}"
        if not skip_corrupt:
            raise TaftError(f"image folder {root}: {count}: {listed}. Remove or fix them, or skip them with "
                            "skip_corrupt=True", arguments=("skip_corrupt",))
        warnings.warn(f"image folder {root}: skipping {count}: {listed}", stacklevel=2)
        left = {classes[r.label] for r in records}
        lost = [c for c in folders if c not in left]
        if lost:
            raise TaftError(f"image folder {root}: class folders {lost} have no readable images")
    return ImageDataset(records, classes, transform, source_digest="folder")


# --- Fashion-MNIST (IDX files) --------------------------------------------------------------------------------

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dim


def _read_idx(path: Path, magic: int) -> tuple[np.ndarray, str]:
    """(array, SHA-256 of the file's bytes): the digest names exactly the bytes that were parsed."""
    try:
        raw = path.read_bytes()
        data = gzip.decompress(raw) if path.suffix == ".gz" else raw
    except (OSError, EOFError, zlib.error) as e:
        raise TaftError(f"cannot read IDX file {path} (corrupt or truncated?): {e}") from e
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise TaftError(f"IDX file {path} is truncated ({len(data)} bytes, header needs {header})")
    (got,) = struct.unpack(">I", data[:4])
    if got != magic:
        raise TaftError(f"IDX file {path} has magic number {got:#010x}, expected {magic:#010x} "
                        "(wrong or corrupt file)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    size = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != size:
        raise TaftError(f"IDX file {path}: header says {dims} = {size} bytes of data, file has "
                        f"{len(data) - header} (corrupt or truncated)")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    return array, hashlib.sha256(raw).hexdigest()


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """A uint8 IDX file (gzip'd if its name ends in .gz) as a read-only array; checks the magic number
    (0x0803 images, 0x0801 labels) and the data length. Raises `TaftError` if it is unreadable or corrupt."""
    return _read_idx(Path(path), magic)[0]


def _find_idx(data_dir: Path, name: str) -> Path | None:
    for candidate in (data_dir / name, data_dir / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist(data_dir: str | os.PathLike | None = None, split: Literal["train", "test"] = "train", *,
                  transform: ImagePreprocess | Transform | None = None, subset: int | None = None,
                  subset_seed: int | None = None) -> ImageDataset:
    """Fashion-MNIST `split` from the IDX files in `data_dir` (default: Debian's `FASHION_MNIST_DIR`; plain
    or .gz). Ids are `"{split}/{index}"` (index in the file), images 28x28 grey. `subset=n` keeps at most n
    per class (`per_class(n, subset_seed)`). Raises `AssetMissingError` naming the install command if the files
    are missing and `TaftError` if they are corrupt."""
    if split not in FASHION_MNIST_FILES:
        raise TaftError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    where = Path(data_dir) if data_dir is not None else FASHION_MNIST_DIR
    paths = []
    for name in FASHION_MNIST_FILES[split]:
        p = _find_idx(where, name)
        if p is None:
            raise AssetMissingError(f"Fashion-MNIST file {where / name} not found: install it with "
                                    f"`{FASHION_MNIST_INSTALL}` (or pass its folder as data_dir=FOLDER)",
                                    arguments=("data_dir",))
        paths.append(p)
    images, images_sha = _read_idx(paths[0], IDX_IMAGES_MAGIC)
    labels, labels_sha = _read_idx(paths[1], IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise TaftError(f"Fashion-MNIST {split}: {len(images)} images in {paths[0]} but {len(labels)} labels "
                        f"in {paths[1]}")
    if len(labels) and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise TaftError(f"Fashion-MNIST labels in {paths[1]} go up to {int(labels.max())}, expected 0..9")

    records = [ImageRecord(f"{split}/{i}", int(y), ArrayImage(images, i)) for i, y in enumerate(labels)]
    digest = f"idx:{paths[0].name}={images_sha},{paths[1].name}={labels_sha}"
    ds = ImageDataset(records, FASHION_MNIST_CLASSES, transform, source_digest=digest)
    return ds.per_class(subset, subset_seed) if subset is not None else ds
