"""What the experiment scripts share: the image data sets' arguments and loading, training a fresh model, running
and saving (resumable), plotting."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from taft import load_backbone
from taft.backbones.base import Backbone
from taft.data import ImageDataset, fashion_mnist, image_folder, split_dataset
from taft.data.feature_cache import CachedFeatures
from taft.data.split import per_class_positions
from taft.data.trunk_features import cache_features
from taft.model import Classifier
from taft.train import FitResult, TrainConfig, fit


def image_parser(doc: str, out: str) -> argparse.ArgumentParser:
    """A parser with --dataset, --data, --image-size, --train-per-class, --test-per-class, --validation and --out
    (default `out`)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["cifar10-mini", "fashion-mnist"], default="cifar10-mini",
                        help="cifar10-mini: the train/ and test/ folders under --data; fashion-mnist: Debian's copy")
    parser.add_argument("--data", default="../shared/data/cifar10-mini")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--train-per-class", type=int, default=100, help="the first N training images per class")
    parser.add_argument("--test-per-class", type=int, default=50, help="the first N test images per class")
    parser.add_argument("--validation", action="store_true",
                        help="score on a held-out 20 %% of the training data (seeded, class-balanced) instead of the "
                             "test data, to choose settings without reading test data")
    parser.add_argument("--out", default=out)
    return parser


def load_images(args: argparse.Namespace,
                backbone: Backbone | None = None) -> tuple[Backbone, ImageDataset, ImageDataset]:
    """The bundled DINOv2 ViT-S/14 at --image-size (unless given) and the (train, evaluation) subsets of --dataset:
    the first --train-per-class / --test-per-class of each class (None: all) of the training and test data, or
    with --validation of the training and held-out parts of the training data."""
    backbone = backbone or load_backbone("dinov2-vits14", image_size=args.image_size)
    if args.dataset == "fashion-mnist":
        train, test = (fashion_mnist(None, split, transform=backbone.preprocess) for split in ("train", "test"))
    else:
        root = Path(args.data)
        train, test = (image_folder(root / split, backbone.preprocess) for split in ("train", "test"))
    if args.validation:
        train, test = split_dataset(train, 0.2, seed=0)
    return backbone, cut(train, args.train_per_class), cut(test, args.test_per_class)


def cut(dataset: ImageDataset, per_class: int | None) -> ImageDataset:
    return dataset.per_class(per_class) if per_class else dataset


def first_per_class(features: CachedFeatures, n: int | None) -> CachedFeatures:
    """The first n examples of each class of cached features (all of them for n None)."""
    if not n:
        return features
    return features.select([features.ids[i] for i in per_class_positions(features.ids, features.labels, n)])


def load_features(args: argparse.Namespace, k: int = 1) -> tuple[Backbone, CachedFeatures, CachedFeatures]:
    """`load_images`, as cached k-trunk features: the whole training and test sets are cached once (one cache entry
    each, shared by every subset and by --validation), then split and cut to the first N per class."""
    backbone = load_backbone("dinov2-vits14", image_size=args.image_size)
    whole = vars(args) | {"train_per_class": None, "test_per_class": None, "validation": False}
    _, train, test = load_images(argparse.Namespace(**whole), backbone)
    train_f, test_f = cache_features(train, backbone, k), cache_features(test, backbone, k)
    if args.validation:
        train_f, test_f = split_dataset(train_f, 0.2, seed=0)
    return backbone, first_per_class(train_f, args.train_per_class), first_per_class(test_f, args.test_per_class)


def fit_model(backbone: Backbone, class_names: list[str], train, config: TrainConfig, *, method: str = "taft",
              k: int = 1, head_seed: int = 0, pooling: str = "cls", head_init: str = "random",
              **fit_kw: object) -> FitResult:
    """`taft.fit` a fresh model of the given spec (method, k, pooling, head_seed, head_init; pooling "cls" unless
    given, as every experiment has used) on `train` (cached features) with the recipe `config`, without a
    progress bar unless asked; the result's classifier is that model."""
    model = Classifier(backbone, list(class_names), k, method=method, pooling=pooling, head_seed=head_seed,
                       head_init=head_init)
    return fit(model, train, config, **{"progress": False, **fit_kw})


class RunLog:
    """Finished runs (dicts) and other named results (`extra`), saved to `out/results.json` with the arguments after
    each one, so that a rerun with the same --out skips them and an interrupted experiment continues where it
    stopped."""

    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.path = out / "results.json"
        self.args = vars(args)
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.runs: list[dict] = saved.get("runs", [])
        self.extra: dict = {k: v for k, v in saved.items() if k not in ("runs", "args")}

    def has(self, **key: object) -> bool:
        return any(all(r.get(k) == v for k, v in key.items()) for r in self.runs)

    def add(self, row: dict) -> None:
        self.runs.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
        self.save()

    def put(self, key: str, value: object) -> None:
        """Record a named result beside the runs (e.g. a one-off measurement)."""
        self.extra[key] = value
        print(json.dumps({key: value}), flush=True)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result(), indent=1))
        tmp.replace(self.path)

    def result(self) -> dict:
        return {**self.extra, "runs": self.runs, "args": self.args}


def run_and_save(args: argparse.Namespace, run: Callable[[argparse.Namespace], dict],
                 summarise: Callable[[dict, Path], str]) -> None:
    """Run the experiment (with --threads torch CPU threads, when the script has that option and it is given),
    write `results.json` to --out, then print the summary (which writes its tables/plots)."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(summarise(result, out))


def mean_std(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of `values`; the deviation of a single value is 0."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


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
