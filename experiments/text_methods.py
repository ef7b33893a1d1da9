"""Experiment: probe vs NLFT-k vs TAFT-k on Rotten Tomatoes with the bundled MiniLM-L6 (all-MiniLM-L6-v2).

Binary sentiment (rotten / fresh) of review snippets: the seeded 80/20 split of `taft.data.rotten_tomatoes`
(3,893 training and 973 test snippets), mean pooling over the real tokens, the image-backbone default learning
rates `DEFAULT_LR` (taft 1e-4, nlft 1e-4, probe 1e-2; AdamW, cosine schedule, batch 32, κ = 15 squared loss; the
text defaults were later set from `text_lr.py`). For
each k and seed: train on cached trunk features, evaluate top-1 on the test split, record training time per
epoch. The probe trains only the head on the frozen network's pooled output, so it is run once (with the first
k). Writes a JSON with every run, a Markdown table and a PNG plot.

    nice -n 5 python experiments/text_methods.py --ks 1 2 --seeds 0 1 2 --epochs 4 \
        --out docs/experiments/text_methods
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import fit_model, mean_std, pyplot, run_and_save
from taft import load_backbone
from taft.data import rotten_tomatoes
from taft.data.trunk_features import cache_features
from taft.train import TrainConfig, evaluate
from taft.train.config import DEFAULT_LR


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    backbone = load_backbone(args.backbone)
    train_ds = rotten_tomatoes(backbone.tokenizer, "train")
    test_ds = rotten_tomatoes(backbone.tokenizer, "test")
    if args.limit is not None:  # a quick subset (the smoke tests)
        train_ds, test_ds = train_ds.per_class(args.limit), test_ds.per_class(args.limit)
    print(f"{backbone.name}: {len(train_ds)} train / {len(test_ds)} test snippets (widths {train_ds.width} / "
          f"{test_ds.width} tokens) in {time.perf_counter() - t0:.1f} s", flush=True)
    runs, cache_s = [], {}
    for k in args.ks:
        t0 = time.perf_counter()
        train_f = cache_features(train_ds, backbone, k, progress=False)
        test_f = cache_features(test_ds, backbone, k, progress=False)
        cache_s[k] = time.perf_counter() - t0
        print(f"k={k}: features ready in {cache_s[k]:.1f} s", flush=True)
        methods = ["taft", "nlft"] + (["probe"] if k == args.ks[0] else [])
        for seed in args.seeds:
            for method in methods:
                cfg = TrainConfig(epochs=args.epochs, seed=seed, lr=DEFAULT_LR[method])
                t0 = time.perf_counter()
                result = fit_model(backbone, train_f.class_names, train_f, cfg, method=method, k=k, head_seed=seed,
                                   pooling=args.pooling)
                fit_s = time.perf_counter() - t0
                test = evaluate(result.classifier, test_f)
                row = {"method": method, "k": k, "seed": seed, "top1": test.top1, "test_loss": test.loss,
                       "final_train_loss": result.metrics["final_train_loss"],
                       "train_top1": result.metrics["top1"],
                       "epoch_s": result.metrics["train_time_s"] / args.epochs, "fit_wall_s": fit_s,
                       "lr": cfg.learning_rate}
                runs.append(row)
                print(json.dumps(row), flush=True)
    return {"runs": runs, "cache_s": cache_s, "n_train": len(train_ds), "n_test": len(test_ds),
            "backbone": backbone.name, "torch_threads": torch.get_num_threads(), "args": vars(args)}


def _groups(result: dict) -> list[tuple[tuple[str, int], list[dict]]]:
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in result["runs"]:
        key = (r["method"], r["k"]) if r["method"] != "probe" else ("probe", 0)
        groups.setdefault(key, []).append(r)
    return sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0]))


def summarise(result: dict, out: Path) -> str:
    groups = _groups(result)
    args = result["args"]
    lines = [f"Rotten Tomatoes ({result['n_train']} train / {result['n_test']} test snippets), {result['backbone']}, "
             f"{args['pooling']} pooling, {args['epochs']} epochs, default learning rates, "
             f"{result['torch_threads']} CPU threads.", "",
             "| method | k | test top-1 (mean ± std) | seeds | train top-1 | train s/epoch | lr |",
             "|---|---|---|---|---|---|---|"]
    for (method, k), rows in groups:
        mean, std = mean_std([100 * r["top1"] for r in rows])
        train_acc = statistics.mean(100 * r["train_top1"] for r in rows)
        epoch = statistics.mean(r["epoch_s"] for r in rows)
        lines.append(f"| {method} | {k or '-'} | {mean:.1f} ± {std:.1f} | {len(rows)} | {train_acc:.1f} | "
                     f"{epoch:.1f} | {rows[0]['lr']:g} |")
    lines += ["", "Per seed (test top-1, %):", "", "| method | k | " + " | ".join(f"seed {s}" for s in args["seeds"])
              + " |", "|---|---|" + "---|" * len(args["seeds"])]
    for (method, k), rows in groups:
        by_seed = {r["seed"]: f"{100 * r['top1']:.1f}" for r in rows}
        lines.append(f"| {method} | {k or '-'} | " + " | ".join(by_seed.get(s, "-") for s in args["seeds"]) + " |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    plot(groups, out / "accuracy.png", result)
    return table


def plot(groups: list, path: Path, result: dict) -> None:
    plt = pyplot()
    labels, means, stds = [], [], []
    for (method, k), rows in groups:
        mean, std = mean_std([100 * r["top1"] for r in rows])
        labels.append(method if method == "probe" else f"{method}-{k}")
        means.append(mean)
        stds.append(std)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(labels, means, yerr=stds, capsize=4, color=["#888" if l == "probe" else "#4a7" if "taft" in l else "#47a"
                                                       for l in labels])
    low = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(max(0.0, low - 5), min(100.0, max(m + s for m, s in zip(means, stds)) + 3))
    for x, (m, s) in enumerate(zip(means, stds)):
        ax.text(x, m + s + 0.3, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"Rotten Tomatoes, {result['backbone']} ({result['args']['epochs']} epochs, "
                 f"{len(result['args']['seeds'])} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm-l6")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4,
                        help="4 fits the whole run into about 25 min on the loaded 2-core CPU machine")
    parser.add_argument("--pooling", default="mean", choices=["mean", "cls"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--limit", type=int,
                        help="only the first N snippets per class of each split (default: all)")
    parser.add_argument("--out", default="docs/experiments/text_methods")
    run_and_save(parser.parse_args(), run, summarise)


if __name__ == "__main__":
    main()
