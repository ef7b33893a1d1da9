"""Experiment: accuracy vs privacy budget ε for DP-TAFT, DP-NLFT and DP-probe on CIFAR-10 mini.

Bundled DINOv2 ViT-S/14 at 112 px, k = 1, δ = 1e-5, clip C = 1, Poisson sampling with expected batch 32, PRV
accountant; ε = inf is ordinary (non-private) training with the same epochs and learning rate. Trunk features are
cached once (the trunk is public pretrained weights; DP covers the trained tail).

    python experiments/dp_accuracy.py --data ../shared/data/cifar10-mini --train-per-class 100 \
        --test-per-class 50 --epsilons 1 3 8 inf --seeds 0 1 2 --epochs 3 --out docs/experiments/dp
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from common import cifar_parser, load_cifar, pyplot, run_and_save
from taft.privacy import DPConfig
from taft.train import TrainConfig, cache_features, evaluate, fit

METHODS = ("taft", "nlft", "probe")


def run(args: argparse.Namespace) -> dict:
    backbone, train_ds, test_ds = load_cifar(args)
    train_f, test_f = cache_features(train_ds, backbone, 1), cache_features(test_ds, backbone, 1)
    runs = []
    for eps in args.epsilons:
        for seed in args.seeds:
            for method in METHODS:
                cfg = TrainConfig(method=method, tangent_blocks=1, epochs=args.epochs, seed=seed, head_seed=seed)
                dp = None if math.isinf(eps) else DPConfig(clip=args.clip, epsilon=eps, delta=args.delta,
                                                           seed=1000 + seed)
                result = fit(cfg, backbone, train_f, dp=dp, progress=False)
                ledger = result.privacy
                row = {"method": method, "epsilon_target": eps, "seed": seed,
                       "top1": evaluate(result.classifier, test_f).top1,
                       "epsilon_spent": ledger["epsilon"] if ledger else math.inf,
                       "noise_multiplier": ledger["noise_multiplier"] if ledger else 0.0,
                       "train_s": result.metrics["train_time_s"]}
                runs.append(row)
                print(json.dumps(row), flush=True)
    return {"runs": runs, "args": vars(args)}


def summarise(result: dict, out: Path) -> str:
    eps_list = result["args"]["epsilons"]
    cell: dict[tuple[str, float], list[float]] = {}
    sigma: dict[tuple[str, float], float] = {}
    for r in result["runs"]:
        cell.setdefault((r["method"], r["epsilon_target"]), []).append(100 * r["top1"])
        sigma[(r["method"], r["epsilon_target"])] = r["noise_multiplier"]
    head = "| method | " + " | ".join(f"ε = {e:g}" for e in eps_list) + " |"
    lines = [head, "|---|" + "---|" * len(eps_list)]
    for m in METHODS:
        vals = []
        for e in eps_list:
            a = cell[(m, e)]
            vals.append(f"{statistics.mean(a):.1f} ± {statistics.stdev(a) if len(a) > 1 else 0:.1f}")
        lines.append(f"| DP-{m} | " + " | ".join(vals) + " |")
    lines += ["", "Noise multipliers σ (calibrated by the PRV accountant): " + ", ".join(
        f"ε={e:g}: {sigma[('taft', e)]:.2f}" for e in eps_list if not math.isinf(e)) + "."]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    plot(cell, eps_list, out / "accuracy_vs_epsilon.png")
    return table


def plot(cell: dict, eps_list: list[float], path: Path) -> None:
    plt = pyplot()
    xs = list(range(len(eps_list)))
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for m in METHODS:
        means = [statistics.mean(cell[(m, e)]) for e in eps_list]
        stds = [statistics.stdev(cell[(m, e)]) if len(cell[(m, e)]) > 1 else 0 for e in eps_list]
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=f"DP-{m}")
    ax.set_xticks(xs, [f"{e:g}" if not math.isinf(e) else "∞" for e in eps_list])
    ax.set_xlabel("ε (δ = 1e-5)")
    ax.set_ylabel("test top-1 (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = cifar_parser(__doc__, "docs/experiments/dp")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1, 3, 8, math.inf])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    run_and_save(parser.parse_args(), run, summarise)


if __name__ == "__main__":
    main()
