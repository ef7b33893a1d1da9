"""End-to-end training throughput of probe / nlft / taft from a cached data set, and the trunk-feature build speed.

A random-weight ViT-S/14 (DINOv2's shape; random weights: no download) and `--n` synthetic images. First the
trunk-feature build (`cache_features` into a fresh cache: decoding, preprocessing, trunk, writing) is timed in
images/s on the first `--build-n` images, without autocast and with each `--autocast` setting (each its own cache
entry), one after the other. Then the features of all `--n` images are built (untimed) and every method is trained
by `fit` on them for `--epochs` epochs at each `--batch-sizes`, in interleaved repeats (probe, nlft, taft, probe,
...) after one dropped warm-up round; reported are the medians of
  fit ex/s  : n · epochs / the whole `fit` call (building the model, placing the features, training, final eval),
  loop ex/s : n · epochs / the training loop alone (`metrics["train_time_s"]`),
and TAFT/NLFT, the cost of a TAFT example relative to an NLFT one (nlft ex/s / taft ex/s), side by side.

    python benchmarks/train_throughput.py                              # CPU, 112 px, k = 1, batch 32 and 256
    python benchmarks/train_throughput.py --device cuda --n 4096 --autocast bf16,fp16 --compile --json tp.json
    python benchmarks/train_throughput.py --tiny                       # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from torch import nn

from taft.backbones.base import Backbone, ImagePreprocess
from taft.backbones.vit import ViT, ViTConfig
from taft.data import ImageDataset, ImageRecord
from taft.data.images import ArrayImage
from taft.devices import resolve_device, synchronize
from taft.precision import check_autocast
from taft.data.trunk_features import cache_features
from taft.model import Classifier
from taft.train import Compute, TrainConfig, fit

VIT_S = ViTConfig(dim=384, depth=12, heads=6, mlp_hidden=1536, patch_size=14, pos_grid=37, layerscale=True)
TINY = ViTConfig(dim=32, depth=3, heads=2, mlp_hidden=64, patch_size=14, pos_grid=4, layerscale=True)
METHODS = ("probe", "nlft", "taft")


def random_backbone(cfg: ViTConfig, image_size: int, seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    vit = ViT(cfg)
    for p in vit.parameters():
        if p.dim() > 1:
            nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    return Backbone("random-vit", vit.eval().requires_grad_(False), ImagePreprocess((image_size, image_size),
                                                                                     cfg.patch_size))


def synthetic_images(n: int, classes: int, size: int, preprocess: ImagePreprocess, seed: int = 0) -> ImageDataset:
    """`n` RGB images of `size` px whose mean colour depends on the class."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    colours = rng.integers(0, 256, (classes, 3))
    noise = rng.integers(-40, 40, (n, size, size, 3), dtype=np.int16)
    arr = np.clip(colours[labels][:, None, None, :] + noise, 0, 255)
    arr = arr.astype(np.uint8)  # one array that every record indexes
    records = [ImageRecord(f"img/{i:06d}", int(y), ArrayImage(arr, i)) for i, y in enumerate(labels)]
    return ImageDataset(records, [f"c{c}" for c in range(classes)], preprocess, source_digest=f"synthetic-{seed}-{n}")


def build_speed(ds: ImageDataset, backbone: Backbone, k: int, device: torch.device, autocast: str,
                batch_size: int, root: str) -> float:
    """Images/s of a fresh trunk-feature build of `ds` into the cache at `root`."""
    synchronize(device)
    t0 = time.perf_counter()
    cache_features(ds, backbone, k, root=root, device=device, autocast=autocast, batch_size=batch_size,
                   progress=False)
    synchronize(device)
    return len(ds) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    ap.add_argument("--batch-sizes", default="32,256", help="training batch sizes, comma-separated (default 32,256)")
    ap.add_argument("--n", type=int, default=1024, help="training images (default 1024)")
    ap.add_argument("--build-n", type=int, default=128, help="images of the timed feature builds (default 128)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--k", type=int, default=1, help="tail blocks of nlft and taft (default 1)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--build-batch", type=int, default=64, help="images per trunk batch in the build (default 64)")
    ap.add_argument("--autocast", default="bf16", help="autocast settings to time the build with, besides none "
                                                       "(comma-separated; default bf16; fp16 on a GPU only)")
    ap.add_argument("--compile", action="store_true", help="also train nlft and taft with torch.compile")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--tiny", action="store_true", help="a tiny ViT and data set: a smoke run of seconds")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="taft-throughput-") as root:  # every cache entry is removed at the end
        return run(args, root)


def run(args: argparse.Namespace, root: str) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    autocasts = [a for a in args.autocast.split(",") if a and a != "none"]
    for a in autocasts:
        check_autocast(a, device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    cfg = TINY if args.tiny else VIT_S
    backbone = random_backbone(cfg, args.image_size)
    ds = synthetic_images(args.n, args.classes, args.image_size, backbone.preprocess)
    load = os.getloadavg()
    print(f"{'tiny ViT' if args.tiny else 'ViT-S/14'} (random weights) at {args.image_size} px "
          f"({(args.image_size // cfg.patch_size) ** 2 + 1} tokens), k={args.k}, n={args.n}, {args.epochs} epochs, "
          f"{args.repeats} repeats, device {device}, {torch.get_num_threads()} threads, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")

    subset = synthetic_images(min(args.build_n, args.n), args.classes, args.image_size, backbone.preprocess)
    build = {a: build_speed(subset, backbone, args.k, device, a, args.build_batch, root) for a in ["none", *autocasts]}
    print("trunk-feature build: " + ", ".join(f"{a} {v:.1f} images/s" for a, v in build.items())
          + "".join(f"; {a}/none {build[a] / build['none']:.2f}x" for a in autocasts))

    cf = cache_features(ds, backbone, args.k, root=root, device=device, batch_size=args.build_batch, progress=False)
    variants = [(m, False) for m in METHODS] + ([("nlft", True), ("taft", True)] if args.compile else [])
    rows = []
    for bs in batch_sizes:
        fit_rates: dict[str, list[float]] = {}
        loop_rates: dict[str, list[float]] = {}
        for r in range(args.repeats + 1):  # the first round warms up (allocator, kernels, compile) and is dropped
            for method, compiled in variants:
                name = method + ("+compile" if compiled else "")
                config = TrainConfig(batch_size=bs, epochs=args.epochs)
                synchronize(device)
                t0 = time.perf_counter()  # fit's time includes building the model (as `taft train` does)
                model = Classifier(backbone, cf.class_names, args.k, method=method)
                result = fit(model, cf, config, progress=False, compute=Compute(device=device, compile=compiled))
                synchronize(device)
                if r:
                    fit_rates.setdefault(name, []).append(args.n * args.epochs / (time.perf_counter() - t0))
                    loop_rates.setdefault(name, []).append(args.n * args.epochs / result.metrics["train_time_s"])
        fit_med = {m: statistics.median(v) for m, v in fit_rates.items()}
        loop_med = {m: statistics.median(v) for m, v in loop_rates.items()}
        row = {"batch_size": bs, "fit_examples_per_s": fit_med, "loop_examples_per_s": loop_med,
               "taft_over_nlft_fit": fit_med["nlft"] / fit_med["taft"],
               "taft_over_nlft_loop": loop_med["nlft"] / loop_med["taft"]}
        rows.append(row)
        print(f"batch {bs}:")
        for m in fit_med:
            print(f"  {m:>14}: fit {fit_med[m]:9.1f} ex/s   loop {loop_med[m]:9.1f} ex/s")
        print(f"  TAFT/NLFT cost per example: fit {row['taft_over_nlft_fit']:.2f}x   "
              f"loop {row['taft_over_nlft_loop']:.2f}x")
    out = {"args": vars(args), "device": str(device), "threads": torch.get_num_threads(), "load_average": load,
           "build_images_per_s": build, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
