"""Experiment: does a float16 feature cache change what is learned? Validation data only (a split of the training
folder; no test data is read).

The training folder's trunk features are cached once per storage dtype (`cache_features(..., dtype=...)`, what
`--cache-dtype` does; the float32 entry is the one the other studies share), split 80/20 per class (seeded), and
cut to the first --train-per-class / --val-per-class of each part. Each method is trained with the default recipe
for each seed on both dtypes' features (the same seed: the same head, batches and schedule), and scored on the
validation part cached at the same dtype. Reported per method: validation top-1 mean ± std over the seeds per dtype,
the paired difference float16 − float32 (per seed, then mean ± std), and whether it is within noise: |mean paired
difference| ≤ the float32 runs' seed-to-seed standard deviation. Also the bytes per example of each entry. Results
are written after every run; a rerun with the same --out skips the runs already there.

    python experiments/cache_dtype.py --data ../shared/data/cifar10-mini/train --image-size 112 \
        --train-per-class 300 --val-per-class 100 --epochs 10 --seeds 0 1 2 --methods taft probe nlft \
        --threads 1 --out docs/experiments/cache_dtype
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from common import RunLog, first_per_class, mean_std, run_and_save
from recipe_study import split_parser, training_set
from taft.data import split_dataset
from taft.data.feature_cache import CachedFeatures
from taft.data.trunk_features import cache_features
from taft.model import Classifier
from taft.train import TrainConfig, fit

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def bytes_per_example(features: CachedFeatures) -> float:
    """The entry's features.npy size on disk over its number of examples."""
    return (features.path / "features.npy").stat().st_size / len(features)


def load_dtypes(args: argparse.Namespace, log: RunLog) -> tuple:
    """The backbone and {dtype: (train part, validation part)} of the training data's k = 1 trunk features cached
    at each dtype; records each entry's bytes per example and (first time) its build or load seconds."""
    backbone, full = training_set(args)
    features = {}
    for name, dtype in DTYPES.items():
        t0 = time.perf_counter()
        whole = cache_features(full, backbone, 1, dtype=dtype, progress=False)
        seconds = time.perf_counter() - t0
        if f"entry_{name}" not in log.extra:
            log.put(f"entry_{name}", {"n": len(whole), "bytes_per_example": bytes_per_example(whole),
                                      "feature_shape": list(whole.feature_shape), "ready_s": seconds})
        train, val = split_dataset(whole, args.val_fraction, seed=0)
        features[name] = (first_per_class(train, args.train_per_class), first_per_class(val, args.val_per_class))
    return backbone, features


def run_one(method: str, seed: int, dtype: str, args: argparse.Namespace, backbone, features: dict) -> dict:
    train_f, val_f = features[dtype]
    model = Classifier(backbone, train_f.class_names, 1, method=method, head_seed=seed)
    result = fit(model, train_f, TrainConfig(epochs=args.epochs, seed=seed), val=val_f, progress=False)
    return {"method": method, "seed": seed, "dtype": dtype, "val_top1": result.metrics["top1"],
            "train_s": result.metrics["train_time_s"], "n_train": len(train_f), "n_val": len(val_f)}


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out, args)
    backbone, features = load_dtypes(args, log)
    train_f, val_f = features["float32"]
    print(f"train {len(train_f)} / val {len(val_f)} examples; {len(args.methods)} methods × {len(args.seeds)} seeds "
          f"× {len(DTYPES)} dtypes", flush=True)
    for method in args.methods:
        for seed in args.seeds:
            for dtype in DTYPES:  # both dtypes of a seed one after the other: an interrupted study stays paired
                if not log.has(method=method, seed=seed, dtype=dtype):
                    log.add(run_one(method, seed, dtype, args, backbone, features))
    return log.result()


def compare(runs: list[dict], method: str) -> dict | None:
    """Per-dtype mean ± std and the paired float16 − float32 difference of `method`'s runs (None without a pair)."""
    acc = {d: {r["seed"]: 100 * r["val_top1"] for r in runs if r["method"] == method and r["dtype"] == d}
           for d in DTYPES}
    seeds = sorted(set(acc["float32"]) & set(acc["float16"]))
    if not seeds:
        return None
    diffs = [acc["float16"][s] - acc["float32"][s] for s in seeds]
    f32, f16 = mean_std([acc["float32"][s] for s in seeds]), mean_std([acc["float16"][s] for s in seeds])
    diff = mean_std(diffs)
    return {"seeds": seeds, "float32": f32, "float16": f16, "diff": diff, "diffs": diffs,
            "within_noise": len(seeds) > 1 and abs(diff[0]) <= f32[1]}


def summarise(result: dict, out: Path) -> str:
    methods = list(dict.fromkeys(r["method"] for r in result["runs"]))
    lines = ["| method | seeds | float32 val top-1 | float16 val top-1 | float16 − float32 (paired) | per seed | "
             "within noise |", "|---|---|---|---|---|---|---|"]
    for method in methods:
        c = compare(result["runs"], method)
        if c is None:
            continue
        (m32, s32), (m16, s16), (md, sd) = c["float32"], c["float16"], c["diff"]
        per_seed = " ".join(f"{d:+.1f}" for d in c["diffs"])
        lines.append(f"| {method} | {len(c['seeds'])} | {m32:.2f} ± {s32:.2f} | {m16:.2f} ± {s16:.2f} | "
                     f"{md:+.2f} ± {sd:.2f} | {per_seed} | {'yes' if c['within_noise'] else 'no'} |")
    sizes = [f"{name}: {result[f'entry_{name}']['bytes_per_example']:,.0f} bytes per example "
             f"({result[f'entry_{name}']['feature_shape']})" for name in DTYPES if f"entry_{name}" in result]
    table = "\n".join(lines) + "\n\n" + "; ".join(sizes)
    (out / "table.md").write_text(table + "\n")
    secs = [r["train_s"] for r in result["runs"]]
    return table + (f"\n(mean training time {statistics.mean(secs):.0f} s per run)" if secs else "")


def main() -> None:
    parser = split_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=["taft", "probe", "nlft"], default=["taft"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--out", required=True)
    run_and_save(parser.parse_args(), run, summarise)


if __name__ == "__main__":
    main()
