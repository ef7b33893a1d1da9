"""The run commands of `taft`: train, eval, predict, info, demo, cache, backbones."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from taft.backbones.registry import BUNDLED
from taft.spec import METHODS
from taft.cli.parser import (add_backbone_args, add_compute_args, add_data_args, add_evaluation_args,
                             add_feature_args, add_log_arg, add_training_args, compute_device, data_source,
                             dp_config_from_args, feature_source, load_backbone_from, model_spec, open_dataset,
                             train_config)
from taft.cli.types import fraction, positive_int
from taft.errors import TaftError



def add_parsers(sub) -> None:
    """The run commands' sub-parsers."""
    p = sub.add_parser("train", help="fine-tune on labelled images or texts",
                       description="Train probe / nlft / taft on trunk features (cached or streamed); writes a run "
                                   "directory with config.json, metrics.jsonl, metrics.json and "
                                   "checkpoint.safetensors.")
    add_data_args(p, "train")
    p.add_argument("--val-data", type=Path, help="validation image folder or text table (default: split off "
                                                 "--val-fraction)")
    p.add_argument("--val-fraction", type=fraction, default=0.1,
                   help="fraction of each class held out for validation when no --val-data (0 = none; default 0.1)")
    add_backbone_args(p)
    add_training_args(p, methods=METHODS)
    p.add_argument("--out", type=Path, help="run directory (default runs/<method>-k<k>-seed<seed>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory's results")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue RUN_DIR (interrupted or finished) from its last epoch up to --epochs, with the "
                        "run's own data and settings; the schedule spans the final total (constant: the same result "
                        "as an uninterrupted run of that length; cosine/step: continues on the longer schedule)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_log_arg(p)
    add_compute_args(p, autocast=True, training=True)
    add_feature_args(p)
    p.set_defaults(func=cmd_train, options={a.dest: (a.option_strings[-1], a.default) for a in p._actions
                                           if a.option_strings})  # what --resume checks was given

    p = sub.add_parser("eval", help="accuracy of a checkpoint on labelled data")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    add_evaluation_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="class and score for each image (or text, for a text model)")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image paths, folders (every image under them) or quoted globs ('shots/*.jpg', "
                        "'shots/**/*.png'); texts for a text model")
    p.add_argument("--file", type=Path, help="also predict each non-empty line of this UTF-8 file (texts or paths)")
    p.add_argument("--top", type=positive_int, default=1, help="how many classes to show per image (default 1)")
    p.add_argument("--format", choices=PREDICT_FORMATS, default="tsv",
                   help="tsv: input, then class score pairs (default); csv: input,class_1,score_1,...; json: one "
                        "array of {input, predictions: [{class, score}, ...]}")
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
    p.add_argument("--out", type=Path, help="where the three runs go (default runs/demo; with --text runs/demo-text)")
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


# ------------------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> None:
    from taft.data import split_dataset
    from taft.model import Classifier
    from taft.train import Compute, fit
    from taft.train.distributed import is_rank_zero, refuse_private

    writer = is_rank_zero()  # under torchrun, rank 0 alone writes and reports (the ranks' warnings are the same)
    if not writer:
        warnings.simplefilter("ignore")
    resuming = args.resume is not None
    args = _resumed_args(args) if resuming else args
    device = compute_device(args)
    dp = dp_config_from_args(args)
    refuse_private(dp)
    if dp is not None and args.head_init == "probe":
        raise TaftError("--head-init probe fits a probe on the private data without noise: not allowed with --dp")
    if dp is not None and resuming:
        raise TaftError("--resume does not apply to a --dp run (the privacy accounting covers one run)")
    out = args.out or Path("runs") / f"{args.method}-k{args.k}-seed{args.seed}"
    if (out / "checkpoint.safetensors").exists() and not (args.overwrite or resuming):
        raise TaftError(f"{out} already holds a trained run; pass --overwrite, --resume {out} to train it for more "
                        "--epochs, or choose another --out")
    backbone = load_backbone_from(args)
    spec, config = model_spec(args, backbone), train_config(args)
    train_ds = open_dataset(args, backbone)
    if args.val_data is not None:
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
    source = feature_source(args)
    progress = not args.quiet and writer
    if dp is not None and (args.autocast_training or args.compile):
        raise TaftError("--autocast-training and --compile are not supported with --dp (DP-SGD trains in float32, "
                        "eagerly)")
    model = Classifier.from_spec(backbone, train_ds.class_names, spec).to(device)
    if not resuming and writer:
        from taft.fileio import atomic_write

        saved = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in NOT_RUN_ARGS}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / RUN_ARGS, lambda p: p.write_text(json.dumps(saved, indent=1)))
    compute = Compute(device, autocast=args.autocast if args.autocast_training else "none", compile=args.compile)
    result = fit(model, train_ds, config, val=val_ds, run_dir=out, dp=dp, resume=resuming, compute=compute,
                 progress=progress, features=source)
    if not writer:
        return
    m = result.metrics
    where = "validation" if val_ds is not None else "training"
    print(f"{args.method} k={args.k}: {where} top-1 {100 * m['top1']:.2f}% on {m['n']} examples, "
          f"{m['train_time_s']:.1f} s training ({m['examples_per_s']:.0f} examples/s on {device})")
    print(f"run directory: {out}  (config.json, metrics.jsonl, metrics.json, checkpoint.safetensors)")
    if result.privacy is not None:
        from taft.privacy import describe

        print(f"privacy: {describe(result.privacy)}")


RUN_ARGS = "run_args.json"
NOT_RUN_ARGS = {"func", "options", "command", "out", "overwrite", "quiet", "log_file", "resume", "epochs", "device",
                "compile", "features", "cache_max", "loader_workers"}
PATH_ARGS = ("data", "data_dir", "val_data")


def _resumed_args(args: argparse.Namespace) -> argparse.Namespace:
    """`taft train --resume RUN_DIR`: the run's own arguments (run_args.json), with --epochs (default: the run's,
    to finish an interrupted run) and this command's --quiet, --log-file, --device, --compile, --features,
    --cache-max and --loader-workers (how it computes)."""
    run = args.resume
    try:
        saved = json.loads((run / RUN_ARGS).read_text())
        epochs = args.epochs or json.loads((run / "config.json").read_text())["epochs"]
    except (OSError, ValueError, KeyError) as e:
        raise TaftError(f"--resume {run}: not a run directory written by taft train (no readable {RUN_ARGS} and "
                        "config.json)") from e
    saved.update({k: Path(saved[k]) for k in PATH_ARGS if saved.get(k) is not None})
    given = [option for dest, (option, default) in args.options.items()
             if dest in saved and vars(args)[dest] != default and vars(args)[dest] != saved[dest]]
    if given:
        raise TaftError(f"--resume {run} continues that run with its own data and settings; leave out "
                        f"{', '.join(given)} (or start a new run with --out)")
    return argparse.Namespace(**{**vars(args), **saved, "epochs": epochs, "out": run})


# -------------------------------------------------------------------------------------------------------- eval
def cmd_eval(args: argparse.Namespace) -> None:
    from taft.model import load_checkpoint
    from taft.train import evaluate

    device = compute_device(args)
    classifier, _ = load_checkpoint(args.checkpoint, device=device)
    dataset = open_dataset(args, classifier)
    check_classes(dataset.class_names, classifier.class_names)
    features = classifier.cache_features(dataset, autocast=args.autocast, progress=not args.quiet)
    ev = evaluate(classifier, features)
    result = ev.to_dict()
    print(f"top-1 {100 * ev.top1:.2f}% on {ev.n} examples (loss {ev.loss:.4g})")
    for name, acc in result["per_class_accuracy"].items():
        print(f"  {name:>20}: " + ("   -   (no examples)" if acc is None else f"{100 * acc:6.2f}%"))
    if args.json:
        from taft.fileio import atomic_write

        atomic_write(args.json, lambda p: p.write_text(json.dumps(result, indent=1)))


def check_classes(data_classes, model_classes) -> None:
    if list(data_classes) != list(model_classes):
        raise TaftError(f"the data's classes {list(data_classes)[:10]} differ from the checkpoint's "
                        f"{list(model_classes)[:10]}")


# ----------------------------------------------------------------------------------------------------- predict
def cmd_predict(args: argparse.Namespace) -> None:
    import torch

    from taft.model import load_checkpoint

    device = compute_device(args)
    classifier, _ = load_checkpoint(args.checkpoint, device=device)
    inputs = list(args.inputs)
    if args.file is not None:
        try:
            inputs += [line.rstrip("\n") for line in args.file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise TaftError(f"cannot read {args.file}: {e}") from e
    failed: list[str] = []
    if classifier.tokenizer is None:
        inputs = expand_image_inputs(inputs, failed)
    total = len(inputs) + len(failed)  # the unmatched patterns count as inputs that could not be read
    if not total:
        raise TaftError("nothing to predict: give images (or texts, for a text model) or --file")
    write = PredictionWriter(args.format)
    with torch.no_grad():
        for names, batch in _prediction_batches(classifier, inputs, failed):
            for name, p in zip(names, classifier(batch).cpu().softmax(-1)):
                top = p.topk(min(args.top, len(p)))
                names_scores = zip(top.indices.tolist(), top.values.tolist())
                write(name, [(classifier.class_names[i], score) for i, score in names_scores])
    write.close()
    if failed:  # the readable inputs' predictions are printed; the rest are named here
        raise TaftError(f"cannot read image {failed[0]}" if total == 1 else
                        f"cannot read {len(failed)} of {total} images: {'; '.join(failed[:10])}"
                        + (f"; and {len(failed) - 10} more" if len(failed) > 10 else ""))


PREDICT_FORMATS = ("tsv", "csv", "json")


def expand_image_inputs(inputs: list[str], failed: list[str]) -> list[str]:
    """Image paths for `predict`: a folder gives every image under it, a pattern with *, ? or [ its sorted
    matches (** spans folders); a pattern that matches nothing goes to `failed`."""
    import glob

    from taft.data.images import list_image_files

    paths: list[str] = []
    for item in inputs:
        if Path(item).is_dir():
            paths += [str(p) for p in list_image_files(Path(item))]
        elif glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if not Path(p).is_dir())
            paths += matches
            if not matches:
                failed.append(f"{item} (no file matches)")
        else:
            paths.append(item)
    return paths


class PredictionWriter:
    """Prints each input's ranked (class, score) pairs as it comes (tsv, csv) or all at the end (json)."""

    def __init__(self, fmt: str):
        self.fmt, self.rows = fmt, []
        self.csv = csv.writer(sys.stdout) if fmt == "csv" else None

    def __call__(self, name: str, ranked: list[tuple[str, float]]) -> None:
        if self.fmt == "json":
            self.rows.append({"input": name, "predictions": [{"class": c, "score": s} for c, s in ranked]})
        elif self.csv is not None:
            self.csv.writerow([name] + [v for c, s in ranked for v in (c, f"{s:.6f}")])
            sys.stdout.flush()
        else:
            print(f"{name}\t{', '.join(f'{c} {s:.3f}' for c, s in ranked)}", flush=True)

    def close(self) -> None:
        if self.fmt == "json":
            print(json.dumps(self.rows, indent=1), flush=True)


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
        test = f", test top-1 {100 * m['test_top1']:.2f}% on {m['test_n']}" if "test_top1" in m else ""
        print(f"metrics      top-1 {100 * m.get('top1', float('nan')):.2f}% ({m.get('eval_split')}){test}, "
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


# --------------------------------------------------------------------------------------------- demo, cache, backbones
def cmd_demo(args: argparse.Namespace) -> None:
    from taft.demo import run_demo

    device = compute_device(args)
    run_demo(train_per_class=args.train_per_class, test_per_class=args.test_per_class, epochs=args.epochs,
             image_size=args.image_size, tangent_blocks=args.k, out=args.out, data_dir=args.data_dir, text=args.text,
             device=device)


def cmd_cache_list(args: argparse.Namespace) -> None:
    from taft.paths import cache_dir
    from taft.data.feature_cache import cache_entries, human_size

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
    from taft.data.feature_cache import clear_cache, human_size, parse_age

    try:
        older_than = parse_age(args.older_than) if args.older_than is not None else None
    except TaftError as e:
        raise TaftError(f"--older-than: {e}") from e
    removed = clear_cache(older_than)
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
