"""What the experiment scripts share: the CIFAR-10 mini arguments and data, running and saving, plotting."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from taft import load_backbone
from taft.backbones.base import Backbone
from taft.data import ImageDataset, image_folder, split_dataset


def cifar_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """A parser with --data, --image-size, --train-per-class, --test-per-class and --out (default `out`)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cifar10-mini")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--train-per-class", type=int, default=100, help="the first N training images per class")
    parser.add_argument("--test-per-class", type=int, default=50, help="the first N test images per class")
    parser.add_argument("--validation", action="store_true",
                        help="score on a held-out 20 %% of the training folder (seeded, class-balanced) instead of the "
                             "test folder, to choose settings without reading test data")
    parser.add_argument("--out", default=out)
    return parser


def load_cifar(args: argparse.Namespace) -> tuple[Backbone, ImageDataset, ImageDataset]:
    """The bundled DINOv2 ViT-S/14 at --image-size and the CIFAR-10 mini (train, evaluation) subsets: the first
    --train-per-class / --test-per-class of each class of the train and test folders, or with --validation of the
    training and held-out parts of the train folder."""
    backbone = load_backbone("dinov2-vits14", image_size=args.image_size)
    root = Path(args.data)
    train = image_folder(root / "train", backbone.preprocess)
    if args.validation:
        train, held_out = split_dataset(train, 0.2, seed=0)
    else:
        held_out = image_folder(root / "test", backbone.preprocess)
    return backbone, train.per_class(args.train_per_class), held_out.per_class(args.test_per_class)


def run_and_save(args: argparse.Namespace, run: Callable[[argparse.Namespace], dict],
                 summarise: Callable[[dict, Path], str]) -> None:
    """Run the experiment, write `results.json` to --out, then print the summary (which writes its tables/plots)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(summarise(result, out))


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).float().mean().item()


def soup(models):
    """Uniform weight average of NLFT tails (all start from the same w0 and head), loaded into models[0]."""
    souped = models[0]
    avg = {n: torch.stack([m.trainable_state_dict()[n] for m in models]).mean(0) for n in models[0].trainable_state_dict()}
    souped.load_delta_state_dict(avg)
    return souped


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of `repeats` calls of `fn`."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
