"""Experiment: learning rates chosen on a validation split, then probe / NLFT-k / TAFT-k on Rotten Tomatoes.

`text_methods.py` uses `TrainConfig`'s default learning rates (picked on images). Here each (method, k) picks its
AdamW learning rate from a grid by top-1 on a seeded 10% validation split of the training snippets (seed 0 only;
the test split is never looked at), then trains on the whole training split with that rate for each seed and is
evaluated once on the test split. Same data, pooling, loss and epochs as `text_methods.py`.

    nice -n 5 python experiments/text_lr.py --ks 1 2 --seeds 0 1 2 --epochs 4 --out docs/experiments/text_lr
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from common import fit_model, run_and_save
from taft import load_backbone
from taft.data import rotten_tomatoes, split_dataset
from taft.data.trunk_features import cache_features
from taft.train import TrainConfig, evaluate

GRID = {"taft": [1e-4, 1e-3, 3e-3], "nlft": [1e-4, 3e-4], "probe": [1e-2, 3e-2]}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    backbone = load_backbone("minilm-l6")
    train_ds = rotten_tomatoes(backbone.tokenizer, "train")
    test_ds = rotten_tomatoes(backbone.tokenizer, "test")
    if args.limit is not None:  # a quick subset (the smoke tests)
        train_ds, test_ds = train_ds.per_class(args.limit), test_ds.per_class(args.limit)
    fit_ds, val_ds = split_dataset(train_ds, 0.1, seed=0)
    sweep, runs = [], []
    for k in args.ks:
        feats = {name: cache_features(ds, backbone, k, progress=False)
                 for name, ds in (("fit", fit_ds), ("val", val_ds), ("train", train_ds), ("test", test_ds))}
        for method in ["taft", "nlft"] + (["probe"] if k == args.ks[0] else []):
            scores = {}
            for lr in GRID[method]:
                result = fit_model(backbone, fit_ds.class_names, feats["fit"], TrainConfig(epochs=args.epochs, lr=lr),
                                   method=method, k=k, pooling="mean", val=feats["val"])
                scores[lr] = result.metrics["top1"]
                sweep.append({"method": method, "k": k, "lr": lr, "val_top1": scores[lr]})
                print(json.dumps(sweep[-1]), flush=True)
            best = max(GRID[method], key=lambda lr: (scores[lr], -lr))  # ties: the smaller rate
            for seed in args.seeds:
                cfg = TrainConfig(epochs=args.epochs, lr=best, seed=seed)
                result = fit_model(backbone, train_ds.class_names, feats["train"], cfg, method=method, k=k,
                                   head_seed=seed, pooling="mean")
                runs.append({"method": method, "k": k, "seed": seed, "lr": best,
                             "top1": evaluate(result.classifier, feats["test"]).top1})
                print(json.dumps(runs[-1]), flush=True)
    return {"sweep": sweep, "runs": runs, "n_fit": len(fit_ds), "n_val": len(val_ds), "n_train": len(train_ds),
            "n_test": len(test_ds), "args": vars(args)}


def summarise(result: dict, out: Path) -> str:
    lines = [f"Learning rate chosen on a validation split ({result['n_fit']} fit / {result['n_val']} val snippets), "
             f"then trained on all {result['n_train']} and tested on {result['n_test']}; "
             f"{result['args']['epochs']} epochs, seeds {result['args']['seeds']}.", "",
             "| method | k | val top-1 % per lr | chosen lr | test top-1 % (mean ± std) |", "|---|---|---|---|---|"]
    keys = sorted({(r["method"], r["k"]) for r in result["runs"]}, key=lambda mk: (mk[1], mk[0]))
    for method, k in keys:
        sweep = ", ".join(f"{s['lr']:g}: {100 * s['val_top1']:.1f}" for s in result["sweep"]
                          if (s["method"], s["k"]) == (method, k))
        tops = [100 * r["top1"] for r in result["runs"] if (r["method"], r["k"]) == (method, k)]
        lr = next(r["lr"] for r in result["runs"] if (r["method"], r["k"]) == (method, k))
        std = statistics.stdev(tops) if len(tops) > 1 else 0.0
        lines.append(f"| {method} | {k if method != 'probe' else '-'} | {sweep} | {lr:g} | "
                     f"{statistics.mean(tops):.1f} ± {std:.1f} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int,
                        help="only the first N snippets per class of each split (default: all)")
    parser.add_argument("--out", default="docs/experiments/text_lr")
    run_and_save(parser.parse_args(), run, summarise)


if __name__ == "__main__":
    main()
