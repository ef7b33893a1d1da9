"""Experiment: accuracy vs number of shards K for TAFT composition on text, against NLFT output ensembles and NLFT
weight soups, and the cost of inference (composed model vs K-model ensemble).

Rotten Tomatoes (the seeded 80/20 split of `taft.data.rotten_tomatoes`: 3,893 training / 973 test snippets), the
bundled MiniLM-L6 (all-MiniLM-L6-v2), k = 1 tangent block, mean pooling, store seed 0,
trunk features cached once and shared by every run. For each K a TAFT model store is created with
`taft.ModelStore.create` (seeded class-stratified "random" plan, uniform composition); the NLFT models are
trained one per shard of the same plan (`taft.store.make_plan`). Every model is scored on the test split's cached
features with each example's token mask. Since the TAFT tail is linear in Δw, the composed model's logits equal the
mean of its shards' logits: the script records the largest difference as a check.

    nice -n 5 python experiments/text_composition.py --shards 1 5 10 --epochs 4 --taft-lr 1e-4 \
        --out docs/experiments/text_composition            # image-default rates
    nice -n 5 python experiments/text_composition.py --shards 1 5 10 --epochs 4 --taft-lr 1e-3 \
        --out docs/experiments/text_composition_lr1e-3     # TAFT at the text default (chosen by text_lr.py)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import fit_model, median_time, pyplot, run_and_save, soup, top1
from taft import load_backbone
from taft.data import rotten_tomatoes
from taft.data.trunk_features import cache_features
from taft.model import Classifier
from taft.parallel import Execution
from taft.store import ModelStore, make_plan
from taft.train import TrainConfig
from taft.train.examples import Examples

Batches = list[tuple[torch.Tensor, torch.Tensor | None]]


def test_batches(examples: Examples, rows: torch.Tensor, batch_size: int = 256) -> Batches:
    """(features, token mask) of `rows` in batches, each cut to its longest text (as `evaluate` does), in memory."""
    return [examples.rows(idx) for idx in rows.split(batch_size)]


@torch.no_grad()
def tail_logits(classifier, batches: Batches) -> torch.Tensor:
    return torch.cat([classifier.logits(x, mask) for x, mask in batches])


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    backbone = load_backbone(args.backbone)
    train_ds = rotten_tomatoes(backbone.tokenizer, "train")
    test_ds = rotten_tomatoes(backbone.tokenizer, "test")
    if args.limit is not None:  # a quick subset (the smoke tests)
        train_ds, test_ds = train_ds.per_class(args.limit), test_ds.per_class(args.limit)
    t0 = time.perf_counter()
    train_f = cache_features(train_ds, backbone, 1, progress=False)
    test_f = cache_features(test_ds, backbone, 1, progress=False)
    print(f"features ready in {time.perf_counter() - t0:.1f} s", flush=True)
    test_ex = Examples(test_f, "test data")
    y_test = test_ex.labels
    batches = test_batches(test_ex, torch.arange(len(test_ex)))
    timing_batches = test_batches(test_ex, torch.arange(min(args.timing_examples, len(test_ex))))
    work = Path(tempfile.mkdtemp(prefix="taft-text-shards-"))
    taft_cfg = TrainConfig(epochs=args.epochs, seed=args.seed, lr=args.taft_lr).resolved("taft", text=True)
    nlft_cfg = TrainConfig(epochs=args.epochs, seed=args.seed, lr=args.nlft_lr).resolved("nlft", text=True)
    taft_model = Classifier(backbone, train_f.class_names, 1, method="taft", pooling=args.pooling,
                            head_seed=args.seed)
    rows = []
    try:
        for k in args.shards:
            t0 = time.perf_counter()
            store_dir = work / f"taft-K{k}"
            store = ModelStore.create(store_dir, train_f, taft_model, taft_cfg, shards=k, threads=args.threads,
                                      min_steps=0, execution=Execution("inline", progress=False))
            taft_train_s = time.perf_counter() - t0
            composed = store.load_composed(backbone).classifier
            taft_shards = [store.load_shard(s.index, backbone).classifier for s in store.manifest.shards
                           if s.status == "trained"]
            composed_logits = tail_logits(composed, batches)
            taft_shard_logits = torch.stack([tail_logits(m, batches) for m in taft_shards])
            plan = make_plan(list(train_f.ids), list(train_f.labels), k, seed=taft_cfg.seed)
            t0 = time.perf_counter()
            nlft_models = [fit_model(backbone, train_f.class_names, train_f.select(ids), nlft_cfg, method="nlft",
                                     pooling=args.pooling, head_seed=args.seed).classifier
                           for ids in plan.shards if ids]
            nlft_train_s = time.perf_counter() - t0
            nlft_logits = torch.stack([tail_logits(m, batches) for m in nlft_models])
            infer_composed = median_time(lambda: tail_logits(composed, timing_batches), args.repeats)
            infer_ensemble = median_time(lambda: [tail_logits(m, timing_batches) for m in taft_shards], args.repeats)
            taft_shard_acc = [top1(lg, y_test) for lg in taft_shard_logits]
            nlft_shard_acc = [top1(lg, y_test) for lg in nlft_logits]
            row = {"K": k, "shard_sizes": [len(s) for s in plan.shards],
                   "taft_composed": top1(composed_logits, y_test),
                   "taft_shard_mean": statistics.mean(taft_shard_acc), "taft_shard_top1": taft_shard_acc,
                   "taft_ensemble": top1(taft_shard_logits.mean(0), y_test),
                   "composed_vs_mean_logits_max_abs": float((composed_logits - taft_shard_logits.mean(0)).abs().max()),
                   "nlft_ensemble": top1(nlft_logits.mean(0), y_test),
                   "nlft_shard_mean": statistics.mean(nlft_shard_acc), "nlft_shard_top1": nlft_shard_acc,
                   "nlft_soup": top1(tail_logits(soup(nlft_models), batches), y_test),
                   "taft_train_s": taft_train_s, "nlft_train_s": nlft_train_s,
                   "infer_composed_s": infer_composed, "infer_ensemble_s": infer_ensemble,
                   "ensemble_over_composed": infer_ensemble / infer_composed}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "n_train": len(train_ds), "n_test": len(test_ds), "backbone": backbone.name,
            "timing_examples": min(args.timing_examples, len(test_ex)), "lr": {"taft": taft_cfg.learning_rate,
                                                                              "nlft": nlft_cfg.learning_rate},
            "torch_threads": torch.get_num_threads(), "args": vars(args)}


def summarise(result: dict, out: Path) -> str:
    args = result["args"]
    lines = [f"Rotten Tomatoes ({result['n_train']} train / {result['n_test']} test snippets), {result['backbone']}, "
             f"k = 1, {args['pooling']} pooling, {args['epochs']} epochs per shard, lr taft "
             f"{result['lr']['taft']:g} / nlft {result['lr']['nlft']:g}, seed {args['seed']}, "
             f"{result['torch_threads']} CPU threads. Test top-1 (%).", "",
             "| K | TAFT composed | TAFT shard mean | NLFT ensemble | NLFT shard mean | NLFT soup | TAFT train s | "
             "NLFT train s | inference: ensemble / composed |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['K']} | {100 * r['taft_composed']:.1f} | {100 * r['taft_shard_mean']:.1f} | "
                     f"{100 * r['nlft_ensemble']:.1f} | {100 * r['nlft_shard_mean']:.1f} | {100 * r['nlft_soup']:.1f} | "
                     f"{r['taft_train_s']:.0f} | {r['nlft_train_s']:.0f} | {r['ensemble_over_composed']:.1f}× "
                     f"({r['infer_ensemble_s']:.2f} s vs {r['infer_composed_s']:.2f} s) |")
    worst = max(r["composed_vs_mean_logits_max_abs"] for r in result["rows"])
    lines += ["", f"Inference times: median of {args['repeats']} passes of the tail over the first "
              f"{result['timing_examples']} test snippets (cached trunk features). Composed TAFT logits vs the mean of "
              f"its shards' logits: largest difference {worst:.2e} (the tangent tail is linear in Δw)."]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    plot(result["rows"], out / "accuracy.png", result)
    return table


def plot(rows: list[dict], path: Path, result: dict) -> None:
    plt = pyplot()
    ks = [r["K"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for key, label, style in (("taft_composed", "TAFT composed (1 model)", "-o"),
                              ("taft_shard_mean", "TAFT single shard (mean)", ":o"),
                              ("nlft_ensemble", "NLFT ensemble (K models)", "-s"),
                              ("nlft_shard_mean", "NLFT single shard (mean)", ":s"),
                              ("nlft_soup", "NLFT soup (weight average)", "--^")):
        ax.plot(ks, [100 * r[key] for r in rows], style, label=label)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("shards K (K = 1: paragon, one model on all data)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"Rotten Tomatoes, {result['backbone']}, k = 1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="minilm-l6")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--epochs", type=int, default=4, help="epochs per shard (as experiments/text_methods.py)")
    parser.add_argument("--seed", type=int, default=0, help="store seed (plan, data order) and head seed")
    parser.add_argument("--taft-lr", type=float, help="TAFT learning rate (default: the text default, 1e-3)")
    parser.add_argument("--nlft-lr", type=float, help="NLFT learning rate (default: the text default, 1e-4)")
    parser.add_argument("--pooling", default="mean", choices=["mean", "cls"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (also per shard task)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each inference timing (median)")
    parser.add_argument("--timing-examples", type=int, default=256, help="test snippets the inference is timed on")
    parser.add_argument("--limit", type=int,
                        help="only the first N snippets per class of each split (default: all)")
    parser.add_argument("--out", default="docs/experiments/text_composition")
    run_and_save(parser.parse_args(), run, summarise)


if __name__ == "__main__":
    main()
