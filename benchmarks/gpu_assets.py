"""Pack what benchmarks/gpu_suite.py needs on a GPU machine that reaches no package registry and no dataset.

Run on a machine that has taft's bundled weights and the CIFAR-10 mini images; the folder it writes (ignored by git)
travels to the GPU machine beside the working tree (`carry=[".gpu_assets"]`):

  dinov2-vits14-f16.safetensors  the bundled DINOv2 ViT-S/14 (`load_backbone("dinov2-vits14")`) in float16, in the
                                 timm naming taft's own ViT uses, with the head count in the safetensors metadata:
                                 `load_backbone(path, image_size=...)` reads it as a local backbone (~42 MiB)
  cifar10.npz                    the first --train-per-class / --test-per-class images of each class of
                                 cifar10-mini's train/ and test/ folders, decoded to uint8 (n, 32, 32, 3), with
                                 labels, ids and class names (compressed; ~16 MiB at 400 / 200 per class)
  manifest.json                  what was packed: sizes, SHA-256s, counts, the source

taft's runtime dependencies (torch, numpy, safetensors, onnx, tqdm, pillow, tokenizers) are all installed on the
lent GPU machines, so no wheel is packed; `gpu_suite.py` records their versions there.

    python benchmarks/gpu_assets.py --out .gpu_assets
    python benchmarks/gpu_assets.py --out .gpu_assets --train-per-class 300 --test-per-class 100   # smaller
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from taft.backbones import load_backbone
from taft.data import image_folder

BACKBONE_FILE = "dinov2-vits14-f16.safetensors"
DATA_FILE = "cifar10.npz"
MANIFEST_FILE = "manifest.json"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-mini"  # beside the repository
SPLITS = ("train", "test")
LIMIT_MIB = 60  # the working tree and the carried paths travel together, 64 MiB in all


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack_backbone(out: Path, name: str = "dinov2-vits14") -> Path:
    """The backbone `name`'s weights as a float16 safetensors file that `load_backbone(path)` reads (timm names;
    `num_heads` in the metadata, since the head count cannot be read from the shapes)."""
    backbone = load_backbone(name)
    cfg = backbone.model.cfg
    tensors = {k: v.to(torch.float16).contiguous() for k, v in backbone.model.state_dict().items()}
    path = out / BACKBONE_FILE
    save_file(tensors, str(path), metadata={"num_heads": str(cfg.heads), "source": f"taft load_backbone({name!r}), "
                                            "float32 weights rounded to float16"})
    check = load_backbone(path).model.cfg  # it reads back as the same architecture
    if (check.dim, check.depth, check.heads, check.mlp_hidden) != (cfg.dim, cfg.depth, cfg.heads, cfg.mlp_hidden):
        raise SystemExit(f"{path} reads back as {check}, not {cfg}")
    return path


def pack_images(out: Path, data: Path, per_class: dict[str, int]) -> Path:
    """The first `per_class[split]` images of each class of `data/<split>` as uint8 arrays in one .npz."""
    arrays: dict[str, np.ndarray] = {}
    classes = None
    for split in SPLITS:
        ds = image_folder(data / split).per_class(per_class[split])
        if classes is not None and ds.class_names != classes:
            raise SystemExit(f"{data}: train and test have different classes")
        classes = ds.class_names
        arrays[f"{split}_images"] = np.stack([np.asarray(r.source.load().convert("RGB"), dtype=np.uint8)
                                              for r in ds.records])
        arrays[f"{split}_labels"] = np.asarray(ds.labels, dtype=np.uint8)
        arrays[f"{split}_ids"] = np.asarray([f"{split}/{i}" for i in ds.ids])
    arrays["class_names"] = np.asarray(classes)
    path = out / DATA_FILE
    np.savez_compressed(path, **arrays)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".gpu_assets", help="folder to write (default .gpu_assets, ignored by git)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="cifar10-mini folder with train/ and test/")
    ap.add_argument("--train-per-class", type=int, default=400)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--no-backbone", action="store_true", help="pack the images only")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [pack_images(out, Path(args.data), {"train": args.train_per_class, "test": args.test_per_class})]
    if not args.no_backbone:
        files.append(pack_backbone(out))
    with np.load(files[0]) as npz:
        counts = {split: len(npz[f"{split}_labels"]) for split in SPLITS}
    manifest = {"files": {f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)} for f in files},
                "images": counts, "per_class": {"train": args.train_per_class, "test": args.test_per_class},
                "data": str(Path(args.data).resolve())}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(f["bytes"] for f in manifest["files"].values()) / 2**20
    for name, f in manifest["files"].items():
        print(f"{out / name}: {f['bytes'] / 2**20:.1f} MiB")
    print(f"total {total:.1f} MiB ({counts['train']} train + {counts['test']} test images)")
    if total > LIMIT_MIB:
        print(f"warning: over {LIMIT_MIB} MiB; the working tree and carried paths travel together (64 MiB): pack "
              "fewer images (--train-per-class, --test-per-class)", file=sys.stderr)
    return manifest


if __name__ == "__main__":
    main()
