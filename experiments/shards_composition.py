"""Experiment: accuracy vs number of shards K for TAFT composition, NLFT ensembles and NLFT weight soups, the
cost of inference (composed model vs K-model ensemble) and the cost of forgetting one example.

CIFAR-10 mini, bundled DINOv2 ViT-S/14 at 112 px, k = 1, trunk features cached once and shared by every run.
For each K (in the order given) and seed, the same seeded class-balanced shard plan is used by both methods
(taft.store.make_plan); the seed also draws the base head and the data order. Runs are saved as they finish and a
rerun with the same --out skips them; the forgetting costs are measured once, on the first seed's --forget-k store.

    python experiments/shards_composition.py --data ../shared/data/cifar10-mini --train-per-class 100 \
        --test-per-class 50 --shards 1 2 5 10 20 --seeds 0 1 2 --epochs 10 --min-steps 100 \
        --out docs/experiments/shards
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import (RunLog, fit_model, image_parser, load_images, mean_std, median_time, pyplot, run_and_save, soup,
                    top1)
from taft.data.trunk_features import cache_features
from taft.model import Classifier
from taft.parallel import Execution
from taft.store import ModelStore, make_plan
from taft.train import TrainConfig, evaluate

INLINE = Execution("inline", progress=False)  # shards train in this process, one after the other


@torch.no_grad()
def tail_logits(classifier, features: torch.Tensor) -> torch.Tensor:
    return torch.cat([classifier.logits(features[i:i + 256]) for i in range(0, len(features), 256)])


def nlft_shards(train_f, plan, cfg: TrainConfig, backbone, head_seed: int):
    """One NLFT model per shard of `plan` (same per-shard data as the TAFT store)."""
    return [fit_model(backbone, train_f.class_names, train_f.select(ids), cfg, method="nlft",
                      head_seed=head_seed).classifier for ids in plan.shards if ids]


def shard_min_steps(option: str, epochs: int, n: int, batch_size: int = 32) -> int:
    """--min-steps: "full" (every shard trains at least the steps of one model on all n examples), or a number."""
    return epochs * math.ceil(n / batch_size) if option == "full" else int(option)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)  # the NLFT runs here; TAFT shards run with --threads in their worker
    backbone, train_ds, test_ds = load_images(args)
    train_f, test_f = cache_features(train_ds, backbone, 1), cache_features(test_ds, backbone, 1)
    work = Path(tempfile.mkdtemp(prefix="taft-shards-"))
    min_steps = shard_min_steps(args.min_steps, args.epochs, len(train_f))
    log = RunLog(Path(args.out), args)
    for k in args.shards:
        for seed in args.seeds:
            for_forgetting = "forgetting" not in log.extra and k == args.forget_k  # measured once, on the first seed
            if log.has(K=k, seed=seed) and not for_forgetting:
                continue
            cfg = TrainConfig(epochs=args.epochs, min_steps=min_steps, seed=seed)  # for taft and nlft alike
            store_dir = work / f"taft-K{k}-seed{seed}"
            t0 = time.perf_counter()
            ModelStore.create(store_dir, train_f, Classifier(backbone, train_f.class_names, 1, method="taft",
                                                             pooling="cls", head_seed=seed),
                              cfg, shards=k, threads=args.threads, min_steps=min_steps, execution=INLINE)
            taft_train_s = time.perf_counter() - t0
            if not log.has(K=k, seed=seed):
                log.add({"K": k, "seed": seed, "taft_train_s": taft_train_s,
                         **compare(ModelStore(store_dir), k, train_f, test_f, backbone, cfg, args.repeats)})
            if for_forgetting:
                log.put("forgetting", forget_costs(store_dir, train_f, test_f, backbone, cfg))
            shutil.rmtree(store_dir)
    shutil.rmtree(work, ignore_errors=True)
    return log.result()


def compare(store: ModelStore, k: int, train_f, test_f, backbone, nlft_cfg: TrainConfig, repeats: int) -> dict:
    # the NLFT shards share the TAFT store's plan seed, data order and base head (head_seed = seed)
    """Test top-1 of the store's composed TAFT model, and of the NLFT ensemble and soup trained on its k shards
    (with the NLFT training time), and the inference times of the composed model vs the TAFT shards' ensemble."""
    x_test, y_test = test_f.as_tensors()
    composed = store.load_composed().classifier
    plan = make_plan(list(train_f.ids), list(train_f.labels), k, seed=nlft_cfg.seed)
    t0 = time.perf_counter()
    models = nlft_shards(train_f, plan, nlft_cfg, backbone, head_seed=nlft_cfg.seed)
    nlft_train_s = time.perf_counter() - t0
    ens_logits = torch.stack([tail_logits(m, x_test) for m in models]).mean(0)
    shard_models = [store.load_shard(s.index).classifier for s in store.manifest.shards if s.status == "trained"]
    return {"taft_composed": evaluate(composed, test_f).top1, "nlft_ensemble": top1(ens_logits, y_test),
            "nlft_soup": evaluate(soup(models), test_f).top1, "nlft_train_s": nlft_train_s,
            **inference_times(composed, shard_models, x_test, repeats)}


def inference_times(composed, shard_models, x_test, repeats: int) -> dict:
    """Seconds to score the test features: the composed model once vs every shard model (the ensemble)."""
    one = median_time(lambda: tail_logits(composed, x_test), repeats)
    ens = median_time(lambda: [tail_logits(m, x_test) for m in shard_models], repeats)
    return {"infer_composed_s": one, "infer_ensemble_s": ens, "ensemble_over_composed": ens / one}


def forget_costs(store_dir: Path, train_f, test_f, backbone, cfg: TrainConfig) -> dict:
    """Forget one training example: drop its shard, retrain its shard, or retrain everything without it."""
    victim = sorted(train_f.ids)[0]
    out = {"store": store_dir.name, "id": victim}
    for mode in ("drop", "retrain"):
        copy = store_dir.with_name(f"{store_dir.name}-{mode}")
        shutil.copytree(store_dir, copy)
        t0 = time.perf_counter()
        ModelStore(copy).forget([victim], mode, features=train_f, backbone=backbone, execution=INLINE)
        out[f"{mode}_s"] = time.perf_counter() - t0
        out[f"{mode}_top1"] = evaluate(ModelStore(copy).load_composed().classifier, test_f).top1
    keep = [i for i in train_f.ids if i != victim]
    t0 = time.perf_counter()
    full = fit_model(backbone, train_f.class_names, train_f.select(keep), cfg, head_seed=cfg.seed).classifier
    out["full_retrain_s"] = time.perf_counter() - t0
    out["full_retrain_top1"] = evaluate(full, test_f).top1
    return out


ACCURACIES = (("taft_composed", "TAFT composed (1 model)"), ("nlft_ensemble", "NLFT ensemble (K models)"),
              ("nlft_soup", "NLFT soup (weight average)"))


def by_shards(runs: list[dict]) -> dict[int, list[dict]]:
    groups: dict[int, list[dict]] = {}
    for r in runs:
        groups.setdefault(r["K"], []).append(r)
    return dict(sorted(groups.items()))


def summarise(result: dict, out: Path) -> str:
    split = "validation" if result["args"].get("validation") else "test"
    lines = [f"{split} top-1 % (mean ± std over seeds):", "",
             "| K | seeds | TAFT composed | NLFT ensemble | NLFT soup | TAFT train s | NLFT train s | "
             "inference: ensemble / composed |", "|---|---|---|---|---|---|---|---|"]
    for k, rows in by_shards(result["runs"]).items():
        accs = " | ".join("{:.1f} ± {:.1f}".format(*mean_std([100 * r[key] for r in rows]))
                          for key, _ in ACCURACIES)
        times = {key: statistics.mean(r[key] for r in rows) for key in
                 ("taft_train_s", "nlft_train_s", "infer_ensemble_s", "infer_composed_s", "ensemble_over_composed")}
        lines.append(f"| {k} | {len(rows)} | {accs} | {times['taft_train_s']:.0f} | {times['nlft_train_s']:.0f} | "
                     f"{times['ensemble_over_composed']:.1f}× ({times['infer_ensemble_s']:.2f} s vs "
                     f"{times['infer_composed_s']:.2f} s) |")
    f = result.get("forgetting")
    if f:
        lines += ["", f"Forgetting one example (`{f['id']}`) from the {f['store']} store:", "",
                  f"| how | seconds | {split} top-1 after |", "|---|---|---|",
                  f"| drop its shard | {f['drop_s']:.1f} | {100 * f['drop_top1']:.1f} |",
                  f"| retrain its shard | {f['retrain_s']:.1f} | {100 * f['retrain_top1']:.1f} |",
                  f"| full retrain (one model) | {f['full_retrain_s']:.1f} | {100 * f['full_retrain_top1']:.1f} |"]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    plot(by_shards(result["runs"]), split, out / "accuracy_vs_shards.png")
    return table


def plot(groups: dict[int, list[dict]], split: str, path: Path) -> None:
    plt = pyplot()
    ks = list(groups)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for key, label in ACCURACIES:
        stats = [mean_std([100 * r[key] for r in rows]) for rows in groups.values()]
        ax.errorbar(ks, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("shards K (K = 1: paragon, one model on all data)")
    ax.set_ylabel(f"{split} top-1 (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = image_parser(__doc__, "docs/experiments/shards")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="store seeds (shard plan, base head, "
                                                                           "data order)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--min-steps", default="0", help="each shard trains at least this many steps (more epochs on "
                                                       "small shards); 'full': the steps of one model on all the data")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each inference timing (median)")
    parser.add_argument("--forget-k", type=int, default=10, help="which store the forgetting costs are measured on")
    run_and_save(parser.parse_args(), run, summarise)


if __name__ == "__main__":
    main()
