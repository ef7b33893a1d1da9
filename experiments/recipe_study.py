"""Experiment: choose training recipes on validation data only (a split of the training data; no test data is read).

Each `--variant` is a list of TrainConfig overrides (`method=taft,lr=1e-3,warmup=0.1,head_lr=1e-2`), optionally
with DP-SGD settings prefixed `dp.` (`dp.epsilon=8,dp.expected_batch_size=1000`; δ defaults to 1e-5). Every
variant is trained for each seed on the training part and scored on the held-out validation part; the table ranks
variants by mean validation top-1 (a variant whose training diverged is listed as such). Results are written after
every run, and a rerun with the same --out skips the runs already there (so an interrupted study continues).

    python experiments/recipe_study.py --data ../shared/data/cifar10-mini/train --image-size 112 \
        --train-per-class 200 --val-per-class 100 --epochs 10 --out docs/experiments/recipe/cifar-k1 \
        --variant method=taft,lr=1e-4 --variant method=taft,lr=1e-3,warmup=0.1
    python experiments/recipe_study.py --dataset fashion-mnist --image-size 56 ...
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from common import RunLog, first_per_class, run_and_save
from taft import load_backbone
from taft.errors import DivergedError
from taft.data import fashion_mnist, image_folder, split_dataset
from taft.privacy import DPConfig
from taft.data.trunk_features import cache_features
from taft.model import Classifier
from taft.spec import SPEC_KEYS, ModelSpec
from taft.train import TrainConfig, fit

INT_KEYS = {"tangent_blocks", "batch_size", "epochs", "seed", "head_seed", "min_steps", "expected_batch_size"}
STR_KEYS = {"method", "loss", "schedule", "head_init", "pooling", "optimizer", "accountant"}


def parse_variant(text: str) -> dict[str, Any]:
    """"method=taft,lr=1e-3,dp.epsilon=8" → {"method": "taft", "lr": 0.001, "dp.epsilon": 8.0}."""
    out: dict[str, Any] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        name = key.removeprefix("dp.")
        out[key] = value if name in STR_KEYS else int(value) if name in INT_KEYS else float(value)
    return out


def variant_name(variant: dict[str, Any]) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in variant.items())


def training_set(args: argparse.Namespace):
    """The bundled DINOv2 at --image-size and the whole training set of --dataset (or the folder --data)."""
    backbone = load_backbone("dinov2-vits14", image_size=args.image_size)
    if args.dataset == "fashion-mnist":
        return backbone, fashion_mnist(None, "train", transform=backbone.preprocess)
    return backbone, image_folder(Path(args.data), backbone.preprocess)


def load_split(args: argparse.Namespace, ks: list[int]):
    """The backbone and {k: (train part, validation part)} of the training data's cached trunk features: a seeded
    class-balanced split (`--val-fraction`, seed 0), then the first --train-per-class / --val-per-class of each
    class. The features of the whole training set are cached once per k (shared with the other experiments)."""
    backbone, full = training_set(args)
    features = {}
    for k in ks:
        train, val = split_dataset(cache_features(full, backbone, k, progress=False), args.val_fraction, seed=0)
        features[k] = (first_per_class(train, args.train_per_class), first_per_class(val, args.val_per_class))
    return backbone, features


def run_one(variant: dict[str, Any], seed: int, args: argparse.Namespace, backbone, features: dict) -> dict:
    spec_keys = {k: v for k, v in variant.items() if k in SPEC_KEYS}  # the model's: method, tangent_blocks, ...
    cfg_keys = {k: v for k, v in variant.items() if not k.startswith("dp.") and k not in SPEC_KEYS}
    dp_keys = {k[3:]: v for k, v in variant.items() if k.startswith("dp.")}
    spec = ModelSpec(**{"head_seed": seed, **spec_keys})
    cfg = TrainConfig(**{"epochs": args.epochs, "seed": seed, **cfg_keys})
    dp = DPConfig(**{"delta": 1e-5, "seed": 1000 + seed, **dp_keys}) if dp_keys else None
    train_f, val_f = features[spec.tangent_blocks]
    model = Classifier.from_spec(backbone, train_f.class_names, spec)
    result = fit(model, train_f, cfg, val=val_f, dp=dp, progress=False)
    m = result.metrics
    row = {"variant": variant_name(variant), "seed": seed, "val_top1": m["top1"], "train_s": m["train_time_s"],
           "epochs": result.config.epochs, "steps": m["steps"], "lr": result.config.lr,
           "optimizer": result.config.optimizer, "curve": [r["val_top1"] for r in result.history],
           "final_train_loss": m.get("final_train_loss")}
    if result.privacy is not None:
        row.update(epsilon=result.privacy["epsilon"], noise_multiplier=result.privacy["noise_multiplier"],
                   expected_batch_size=result.privacy["expected_batch_size"])
    return row


def split_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the arguments of `load_split`: --data or --dataset, --image-size, --val-fraction,
    --train-per-class, --val-per-class."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/cifar10-mini/train", help="training image folder")
    parser.add_argument("--dataset", choices=["fashion-mnist"], help="a known dataset instead of --data")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--val-fraction", type=float, default=0.2, help="of each class, held out for validation")
    parser.add_argument("--train-per-class", type=int, help="the first N of each class of the training part")
    parser.add_argument("--val-per-class", type=int, help="the first N of each class of the validation part")
    return parser


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out, args)
    variants = [parse_variant(v) for v in args.variant]
    backbone, features = load_split(args, sorted({int(v.get("tangent_blocks", 1)) for v in variants}))
    train_f, val_f = next(iter(features.values()))
    print(f"train {len(train_f)} / val {len(val_f)} examples; {len(variants)} variants × {len(args.seeds)} seeds",
          flush=True)
    for variant in variants:
        for seed in args.seeds:
            if not log.has(variant=variant_name(variant), seed=seed):
                try:
                    row = run_one(variant, seed, args, backbone, features)
                except DivergedError as e:  # a diverged variant is a result; the study goes on
                    row = {"variant": variant_name(variant), "seed": seed, "val_top1": None, "diverged": str(e)}
                log.add(row)
    return log.result()


def summarise(result: dict, out: Path) -> str:
    groups: dict[str, list[dict]] = {}
    for r in result["runs"]:
        groups.setdefault(r["variant"], []).append(r)
    rows, diverged = [], []
    for name, rs in groups.items():
        if any(r["val_top1"] is None for r in rs):
            diverged.append(f"| {name} | diverged | {len(rs)} | | | | |")
            continue
        accs = [100 * r["val_top1"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        rows.append((statistics.mean(accs), std, len(rs), name, rs[0]["epochs"], rs[0]["steps"],
                     statistics.mean(r["train_s"] for r in rs), rs[0].get("epsilon")))
    lines = ["| variant | val top-1 (mean ± std) | seeds | epochs | steps | train s | ε |",
             "|---|---|---|---|---|---|---|"]
    for mean, std, n, name, epochs, steps, secs, eps in sorted(rows, reverse=True):
        eps_text = "-" if eps is None else f"{eps:.2f}"
        lines.append(f"| {name} | {mean:.1f} ± {std:.1f} | {n} | {epochs} | {steps} | {secs:.0f} | {eps_text} |")
    table = "\n".join(lines + diverged)
    (out / "table.md").write_text(table + "\n")
    return table


def main() -> None:
    parser = split_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=10, help="unless a variant sets epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variant", action="append", required=True, help="TrainConfig (and dp.) overrides")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--out", required=True)
    run_and_save(parser.parse_args(), run, summarise)


if __name__ == "__main__":
    main()
