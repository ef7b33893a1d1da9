"""Experiment: does augmentation narrow TAFT's gap to NLFT? NLFT-k and TAFT-k (and the probe) trained on cached
trunk features (no augmentation) and streamed with `--augments` (each view seeded by the run seed, the epoch and the
example id), scored on a held-out part of the training folder (--validation) or on the test images.

    python experiments/augment_study.py --data ../shared/data/cifar10-mini --validation --train-per-class 100 \\
        --test-per-class 50 --epochs 10 --augments flip crop-flip --threads 2 --out docs/experiments/augment_study
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import RunLog, fit_model, image_parser, load_images, run_and_save
from taft.data.trunk_features import cache_features
from taft.train import TrainConfig, evaluate

METHODS = ("probe", "nlft", "taft")


def run(args: argparse.Namespace) -> dict:
    backbone, train_ds, eval_ds = load_images(args)
    train_f, eval_f = (cache_features(ds, backbone, args.k) for ds in (train_ds, eval_ds))
    log = RunLog(Path(args.out), args)
    for seed in args.seeds:
        for augment in ("none", *args.augments):
            for method in args.methods:
                if log.has(method=method, augment=augment, seed=seed) or (method == "probe" and augment != "none"):
                    continue
                config = TrainConfig(epochs=args.epochs, seed=seed, augment=augment)
                train = train_f if augment == "none" else train_ds  # augmented views need the raw images
                r = fit_model(backbone, train_f.class_names, train, config, method=method, k=args.k, head_seed=seed,
                              features="cache" if augment == "none" else "stream")
                log.add({"method": method, "augment": augment, "seed": seed,
                         "top1": evaluate(r.classifier, eval_f).top1, "lr": r.config.lr, "epochs": r.config.epochs,
                         "train_time_s": r.metrics["train_time_s"]})
    return log.result()


def summarise(result: dict, out: Path) -> str:
    runs = result["runs"]
    split = "validation" if result["args"]["validation"] else "test"
    augments = list(dict.fromkeys(r["augment"] for r in runs))
    lines = [f"| method | {' | '.join(f'{a} ({split} top-1 %)' for a in augments)} |",
             "|---|" + "---|" * len(augments)]
    mean = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        cells = []
        for a in augments:
            scores = [r["top1"] for r in runs if r["method"] == method and r["augment"] == a]
            mean[method, a] = sum(scores) / len(scores) if scores else None
            cells.append("-" if not scores else f"{100 * mean[method, a]:.1f} (n={len(scores)})")
        lines.append(f"| {method} | {' | '.join(cells)} |")
    gaps = [f"{a}: {100 * (mean['taft', a] - mean['nlft', a]):+.1f}" for a in augments
            if mean.get(("taft", a)) is not None and mean.get(("nlft", a)) is not None]
    table = "\n".join(lines) + ("\n\nTAFT − NLFT (points): " + ", ".join(gaps) if gaps else "")
    (out / "table.md").write_text(table + "\n")
    return table


def main() -> None:
    parser = image_parser(__doc__, "docs/experiments/augment_study")
    parser.add_argument("--augments", nargs="+", default=["flip", "crop-flip"], choices=["flip", "crop-flip"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--k", type=int, default=1, help="tangent / fine-tuned blocks")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    run_and_save(parser.parse_args(), run, summarise)


if __name__ == "__main__":
    main()
