"""Experiment: probe vs NLFT-k vs TAFT-k on CIFAR-10 mini with the bundled DINOv2 ViT-S/14.

For each k and seed: train on cached trunk features, evaluate top-1 on the test split, record training time per
epoch. Also measures what the feature cache buys: one TAFT epoch from cached features versus one epoch that
recomputes the trunk for every batch. Writes a JSON with every run, a Markdown table and a PNG plot.

    python experiments/cifar_methods.py --data ../shared/data/cifar10-mini --train-per-class 100 \
        --test-per-class 50 --ks 1 4 --seeds 0 1 2 --epochs 10 --threads 1 --out docs/experiments/cifar_methods
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from common import RunLog, fit_model, image_parser, load_images, pyplot, run_and_save
from taft.backbones.trunk import Trunk
from taft.data.trunk_features import cache_features
from taft.train import TrainConfig, evaluate


def run(args: argparse.Namespace) -> dict:
    backbone, train_ds, test_ds = load_images(args)
    log = RunLog(Path(args.out), args)
    for k in args.ks:
        t0 = time.perf_counter()
        train_f = cache_features(train_ds, backbone, k)
        test_f = cache_features(test_ds, backbone, k)
        print(f"k={k}: features ready in {time.perf_counter() - t0:.1f} s", flush=True)
        methods = ["taft", "nlft"] + (["probe"] if k == args.ks[0] else [])
        for seed in args.seeds:
            for method in methods:
                if log.has(method=method, k=k, seed=seed):
                    continue
                result = fit_model(backbone, train_f.class_names, train_f, TrainConfig(epochs=args.epochs, seed=seed),
                                   method=method, k=k, head_seed=seed)
                log.add({"method": method, "k": k, "seed": seed, "top1": evaluate(result.classifier, test_f).top1,
                         "epoch_s": result.metrics["train_time_s"] / args.epochs, "lr": result.config.lr})
    cache = cache_speedup(backbone, train_ds, args) if args.cache_probe else None
    return {**log.result(), "cache": cache}


def cache_speedup(backbone, dataset, args: argparse.Namespace) -> dict:
    """Seconds for one TAFT epoch over `args.cache_probe` images: from cached features vs recomputing the trunk."""
    k = args.ks[0]
    subset = dataset.per_class(max(1, args.cache_probe // len(dataset.class_names)))
    cached = cache_features(subset, backbone, k, progress=False)
    cfg = TrainConfig(epochs=1)
    t0 = time.perf_counter()
    fit_model(backbone, subset.class_names, cached, cfg, k=k)
    from_cache = time.perf_counter() - t0
    trunk = Trunk(backbone.model, backbone.model.cfg.depth - k).eval()
    t0 = time.perf_counter()
    images = torch.stack([subset[i][0] for i in range(len(subset))])
    recomputed = torch.cat([trunk(images[i:i + 64]) for i in range(0, len(images), 64)])
    labels = torch.tensor(subset.labels)
    fit_model(backbone, subset.class_names, (recomputed, labels), cfg, k=k)
    with_trunk = time.perf_counter() - t0
    return {"images": len(subset), "epoch_from_cache_s": from_cache, "epoch_recomputing_trunk_s": with_trunk,
            "speedup": with_trunk / from_cache}


def summarise(result: dict, out: Path) -> str:
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in result["runs"]:
        key = (r["method"], r["k"]) if r["method"] != "probe" else ("probe", 0)
        groups.setdefault(key, []).append(r)
    lines = ["| method | k | top-1 (mean ± std) | seeds | train s/epoch |", "|---|---|---|---|---|"]
    for (method, k), rows in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        accs = [100 * r["top1"] for r in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        epoch = statistics.mean(r["epoch_s"] for r in rows)
        lines.append(f"| {method} | {k or '-'} | {statistics.mean(accs):.1f} ± {std:.1f} | {len(rows)} | {epoch:.1f} |")
    c = result.get("cache")
    if c:
        lines.append("")
        lines.append(f"Feature cache: one TAFT epoch over {c['images']} images takes {c['epoch_from_cache_s']:.1f} s "
                     f"from cached features and {c['epoch_recomputing_trunk_s']:.1f} s when the trunk is recomputed "
                     f"({c['speedup']:.1f}× speedup).")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    plot(groups, DATASET_TITLES[result["args"].get("dataset", "cifar10-mini")], out / "accuracy.png")
    return table


DATASET_TITLES = {"cifar10-mini": "CIFAR-10 mini", "fashion-mnist": "Fashion-MNIST"}


def plot(groups: dict, dataset: str, path: Path) -> None:
    plt = pyplot()
    labels, means, stds = [], [], []
    for (method, k), rows in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        accs = [100 * r["top1"] for r in rows]
        labels.append(method if method == "probe" else f"{method}-{k}")
        means.append(statistics.mean(accs))
        stds.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(labels, means, yerr=stds, capsize=4, color=["#888" if l == "probe" else "#4a7" if "taft" in l else "#47a"
                                                       for l in labels])
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{dataset}, DINOv2 ViT-S/14")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = image_parser(__doc__, "docs/experiments/cifar_methods")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--cache-probe", type=int, default=200,
                        help="images for the cache speedup measurement (0: not measured)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    run_and_save(parser.parse_args(), run, summarise)


if __name__ == "__main__":
    main()
