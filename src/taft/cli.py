"""The `taft` command: train, evaluate, predict, inspect checkpoints, run the demo.

Errors the user can cause print one line (`taft: error: ...`) and exit with status 2; nothing half-written is left
behind (checkpoints and metadata are written atomically).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import taft
from taft.errors import TaftError

DEFAULT_BACKBONE = "dinov2-vits14"


# ----------------------------------------------------------------------------------------------- data arguments
def add_data_args(p: argparse.ArgumentParser, split_default: str) -> None:
    g = p.add_argument_group("data (one of --data or --dataset)")
    g.add_argument("--data", type=Path, help="image folder: one sub-folder of images per class")
    g.add_argument("--dataset", choices=["fashion-mnist"], help="a known dataset instead of a folder")
    g.add_argument("--data-dir", type=Path, help="where the known dataset's files are (fashion-mnist default: "
                                                 "/usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist)")
    g.add_argument("--split", choices=["train", "test"], default=split_default,
                   help=f"split of a known dataset (default {split_default})")
    g.add_argument("--per-class", type=int, metavar="N", help="use at most N examples per class (first N)")
    g.add_argument("--skip-corrupt", action="store_true",
                   help="skip unreadable images with a warning listing them (default: fail, listing them)")


def open_dataset(args: argparse.Namespace, preprocess, split: str | None = None):
    """The dataset the data arguments name, preprocessed with `preprocess`."""
    from taft.data import fashion_mnist, image_folder

    if (args.data is None) == (args.dataset is None):
        raise TaftError("give exactly one of --data FOLDER or --dataset fashion-mnist")
    if args.data is not None:
        ds = image_folder(args.data, preprocess, skip_corrupt=args.skip_corrupt)
    else:
        ds = fashion_mnist(args.data_dir, split or args.split, transform=preprocess)
    if args.per_class is not None:
        ds = ds.per_class(args.per_class)
    return ds


# ------------------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> None:
    from taft.backbones import load_backbone
    from taft.data import split_dataset
    from taft.train import TrainConfig, cache_features, fit

    config = TrainConfig(method=args.method, tangent_blocks=args.k, loss=args.loss, kappa=args.kappa, reg=args.reg,
                         lr=args.lr, schedule=args.schedule, batch_size=args.batch_size, epochs=args.epochs,
                         seed=args.seed, head_seed=args.head_seed, head_init=args.head_init, pooling=args.pooling)
    out = args.out or Path("runs") / f"{args.method}-k{args.k}-seed{args.seed}"
    if (out / "checkpoint.safetensors").exists() and not args.overwrite:
        raise TaftError(f"{out} already holds a trained run; pass --overwrite or choose another --out")
    backbone = load_backbone(args.backbone, image_size=args.image_size)
    train_ds = open_dataset(args, backbone.preprocess)
    if args.val_data is not None:
        val_args = argparse.Namespace(**{**vars(args), "data": args.val_data, "dataset": None})
        val_ds = open_dataset(val_args, backbone.preprocess)
    elif args.val_fraction > 0:
        train_ds, val_ds = split_dataset(train_ds, args.val_fraction, seed=args.seed)
    else:
        val_ds = None
    dtype = _cache_dtype(args.cache_dtype)
    progress = not args.quiet
    train_f = cache_features(train_ds, backbone, args.k, dtype=dtype, progress=progress)
    val_f = cache_features(val_ds, backbone, args.k, dtype=dtype, progress=progress) if val_ds is not None else None
    result = fit(config, backbone, train_f, val=val_f, run_dir=out, progress=progress)
    m = result.metrics
    where = "validation" if val_f is not None else "training"
    print(f"{args.method} k={args.k}: {where} top-1 {100 * m['top1']:.2f}% on {m['n']} examples, "
          f"{m['train_time_s']:.1f} s training ({m['examples_per_s']:.0f} examples/s)")
    print(f"run directory: {out}  (config.json, metrics.jsonl, metrics.json, checkpoint.safetensors)")


def _cache_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16}[name]


# -------------------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> None:
    from taft.checkpoint import load_checkpoint
    from taft.train import cache_features, evaluate

    classifier, meta = load_checkpoint(args.checkpoint)
    backbone = _backbone_of(classifier, meta)
    dataset = open_dataset(args, classifier.preprocess)
    _check_classes(dataset.class_names, classifier.class_names)
    features = cache_features(dataset, backbone, classifier.tangent_blocks, progress=not args.quiet)
    ev = evaluate(classifier, features)
    result = ev.to_dict()
    print(f"top-1 {100 * ev.top1:.2f}% on {ev.n} examples (loss {ev.loss:.4g})")
    for name, acc in result["per_class_accuracy"].items():
        print(f"  {name:>20}: {100 * acc:6.2f}%")
    if args.json:
        from taft.fileio import atomic_write

        atomic_write(args.json, lambda p: p.write_text(json.dumps(result, indent=1)))


def _backbone_of(classifier, meta):
    """The backbone a loaded checkpoint was built on, at the checkpoint's preprocessing (loaded from cache)."""
    from taft.backbones import load_backbone

    return load_backbone(meta["backbone"], image_size=classifier.preprocess.image_size)


def _check_classes(data_classes, model_classes) -> None:
    if list(data_classes) != list(model_classes):
        raise TaftError(f"the data's classes {list(data_classes)[:10]} differ from the checkpoint's "
                        f"{list(model_classes)[:10]}")


# ----------------------------------------------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image, UnidentifiedImageError

    from taft.checkpoint import load_checkpoint
    from taft.data import ImageTransform

    classifier, _ = load_checkpoint(args.checkpoint)
    transform = ImageTransform(classifier.preprocess)
    images = []
    for path in args.images:
        try:
            with Image.open(path) as im:
                images.append(transform(im))
        except (OSError, UnidentifiedImageError) as e:
            raise TaftError(f"cannot read image {path}: {e}") from e
    with torch.no_grad():
        logits = torch.cat([classifier(torch.stack(images[i:i + 64])) for i in range(0, len(images), 64)])
    probs = logits.softmax(-1)
    for path, p in zip(args.images, probs):
        top = p.topk(min(args.top, len(p)))
        ranked = ", ".join(f"{classifier.class_names[i]} {s:.3f}" for s, i in zip(top.values.tolist(),
                                                                                    top.indices.tolist()))
        print(f"{path}\t{ranked}")


# -------------------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> None:
    from taft.checkpoint import read_checkpoint_metadata

    meta = read_checkpoint_metadata(args.checkpoint)
    if args.json:
        print(json.dumps({k: v for k, v in meta.items() if k != "data"} | {"data": _data_summary(meta)}, indent=1))
        return
    size = args.checkpoint.stat().st_size
    cfg = meta["train_config"]
    print(f"checkpoint   {args.checkpoint} ({size / 2**20:.2f} MiB)")
    print(f"method       {meta['method']}  k={meta.get('tangent_blocks')}  pooling={meta.get('pooling')}")
    print(f"backbone     {meta['backbone']} (fingerprint {meta['backbone_fingerprint'][:16]}…)")
    print(f"model        fingerprint {meta['fingerprint'][:16]}…")
    print(f"classes      {len(meta['class_names'])}: {', '.join(meta['class_names'][:12])}"
          f"{' …' if len(meta['class_names']) > 12 else ''}")
    print(f"preprocess   {meta['preprocess']}")
    print(f"training     {', '.join(f'{k}={v}' for k, v in sorted(cfg.items()))}")
    print(f"data         {_data_summary(meta)}")
    if meta.get("metrics"):
        m = meta["metrics"]
        print(f"metrics      top-1 {100 * m.get('top1', float('nan')):.2f}% ({m.get('eval_split')}), "
              f"train {m.get('train_time_s', float('nan')):.1f} s")
    for key in ("privacy", "versions", "created"):
        if key in meta:
            print(f"{key:<12} {meta[key]}")


def _data_summary(meta: dict) -> dict:
    data = meta.get("data", {})
    return {"count": data.get("count"), "ids_sha256": data.get("ids_sha256")}


# -------------------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> None:
    from taft.demo import run_demo

    run_demo(train_per_class=args.train_per_class, test_per_class=args.test_per_class, epochs=args.epochs,
             image_size=args.image_size, tangent_blocks=args.k, out=args.out, data_dir=args.data_dir)


def cmd_backbones(args: argparse.Namespace) -> None:
    """List the bundled backbones and whether their asset package is installed."""
    from taft.backbones import BUNDLED, dinov2_onnx

    for name, what in BUNDLED.items():
        try:
            dinov2_onnx.onnx_file()
            state = "installed"
        except TaftError as e:
            state = f"missing ({e})"
        print(f"{name}: {what} [{state}]")


# ------------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from taft.train.config import DEFAULT_LR

    parser = argparse.ArgumentParser(
        prog="taft", description="Tangent Attention Fine-Tuning: linearized fine-tuning of a pretrained "
                                 "transformer's last k blocks, composable, removable and private.")
    parser.add_argument("--version", action="version", version=f"taft {taft.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune on a labelled image folder or dataset",
                       description="Train probe / nlft / taft on cached trunk features; writes a run directory "
                                   "with config.json, metrics.jsonl, metrics.json and checkpoint.safetensors.")
    add_data_args(p, "train")
    p.add_argument("--val-data", type=Path, help="validation image folder (default: split off --val-fraction)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of each class held out for validation when no --val-data (0 = none; default 0.1)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help=f"registry name or local weights path (default {DEFAULT_BACKBONE})")
    p.add_argument("--image-size", type=int, default=112, help="input side in pixels, a multiple of the patch "
                                                                "size (default 112)")
    p.add_argument("--method", choices=["taft", "nlft", "probe"], default="taft",
                   help="taft: linearized tail; nlft: same tail trained non-linearly; probe: head only (default taft)")
    p.add_argument("-k", "--k", type=int, default=1, help="number of last blocks fine-tuned (default 1)")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training data (default 10)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: "
                   + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step (default 32)")
    p.add_argument("--loss", choices=["mse", "ce"], default="mse",
                   help="mse: squared error to kappa * one-hot (default); ce: cross-entropy")
    p.add_argument("--kappa", type=float, default=15.0, help="target scale of the mse loss (default 15)")
    p.add_argument("--reg", type=float, default=0.0, help="weight of the proximity penalty reg * |w - w0|^2")
    p.add_argument("--schedule", choices=["cosine", "step", "constant"], default="cosine",
                   help="learning-rate schedule (default cosine)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order and validation split (default 0)")
    p.add_argument("--head-seed", type=int, default=0, help="seed of the random base head w0_head (default 0)")
    p.add_argument("--head-init", choices=["random", "probe"], default="random",
                   help="base head: seeded random (default) or a linear probe fitted first")
    p.add_argument("--pooling", choices=["cls", "mean"], default="cls", help="token pooling (default cls)")
    p.add_argument("--cache-dtype", choices=["float32", "float16"], default="float32",
                   help="precision of the on-disk trunk-feature cache (default float32)")
    p.add_argument("--out", type=Path, help="run directory (default runs/<method>-k<k>-seed<seed>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory's results")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy of a checkpoint on labelled data")
    p.add_argument("checkpoint", type=Path)
    add_data_args(p, "test")
    p.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="class and score for each image")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--top", type=int, default=1, help="how many classes to show per image (default 1)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("info", help="what a checkpoint holds")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="probe / NLFT / TAFT side by side on a Fashion-MNIST subset (~5 min on 2 cores)")
    p.add_argument("--train-per-class", type=int, default=500, help="training images per class (default 500)")
    p.add_argument("--test-per-class", type=int, default=200, help="test images per class (default 200)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per method (default 10)")
    p.add_argument("--image-size", type=int, default=56, help="input side in pixels (default 56)")
    p.add_argument("-k", "--k", type=int, default=1, help="blocks fine-tuned by NLFT and TAFT (default 1)")
    p.add_argument("--data-dir", type=Path, help="Fashion-MNIST IDX folder (default: the Debian package's)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the three runs go (default runs/demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("backbones", help="list the bundled pretrained backbones")
    p.set_defaults(func=cmd_backbones)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TaftError as e:
        print(f"taft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("taft: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
