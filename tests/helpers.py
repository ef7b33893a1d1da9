"""Helpers shared by several test modules (tests/ is on sys.path): `from helpers import ...`.

Fixtures live in `conftest.py`; it also registers this module for pytest's assertion rewriting."""

from __future__ import annotations

import csv
import gzip
import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from taft.backbones.bert import BertConfig
from taft.backbones.vit import ViTConfig
from taft.cli import main

TINY_VIT = ViTConfig(dim=32, depth=3, heads=4, mlp_hidden=64, patch_size=4, pos_grid=3)  # at 12 px: 3×3 patches
TINY_BERT = BertConfig(dim=24, depth=3, heads=4, mlp_hidden=48, vocab_size=30522, max_positions=64)  # MiniLM's vocab
CLASSES = ["a", "b", "c", "d"]
CIFAR_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-mini"  # beside the repository


def bad(capsys, argv: list[str], message: str) -> None:
    """`taft argv` fails with exit status 2 and one line on stderr, `taft: error: ...` containing `message`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("taft: error:") and message in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------------- tiny data
def write_image(path: Path, seed: int, size: tuple[int, int] = (10, 8), grey: bool = False) -> None:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if grey else (size[1], size[0], 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def make_classes(root: Path, classes=("ant", "bee"), per_class: int = 6, prefix: str = "") -> Path:
    """Random images `root/<class>/<prefix><i>.png` (other prefixes: other images, other ids)."""
    salt = sum(map(ord, prefix))
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{prefix}{i}.png", seed=100 * c + i + 1000 * salt, size=(20 + c, 20))
    return root


def write_idx(path: Path, magic: int, array: np.ndarray, compress: bool = True, dims=None) -> None:
    dims = array.shape if dims is None else dims
    data = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)


def make_idx(root: Path, split: str = "train", n_per_class: int = 3, compress: bool = True) -> Path:
    prefix = "train" if split == "train" else "t10k"
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(10), n_per_class)
    images = rng.integers(0, 256, (len(labels), 28, 28))
    sfx = ".gz" if compress else ""
    write_idx(root / f"{prefix}-images-idx3-ubyte{sfx}", 0x803, images, compress)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{sfx}", 0x801, labels, compress)
    return root


def write_csv(path: Path, rows: list[tuple[str, str]], header=("text", "label")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
