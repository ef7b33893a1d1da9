"""Experiment: accuracy vs privacy budget ε for DP-TAFT, DP-NLFT and DP-probe on CIFAR-10 mini or Fashion-MNIST.

Bundled DINOv2 ViT-S/14, k = 1, δ = 1e-5, clip C = 1, Poisson sampling, PRV accountant, the DP-SGD defaults
(`taft.train.config.DP_RECIPE`: SGD with momentum, `dp_epochs(ε)` epochs (5 below ε = 3, 10 from it), expected
batch min(n, max(32, min(1024, n/10))));
ε = inf is ordinary (non-private) training with the non-private defaults (10 epochs unless --epochs is given). Trunk
features are cached once (the trunk is public pretrained weights; DP covers the trained tail). Runs are saved as
they finish and a rerun with the same --out skips them; they run in the order of --epsilons, then seeds, then
--methods.

    python experiments/dp_accuracy.py --dataset fashion-mnist --image-size 56 --train-per-class 6000 \
        --test-per-class 1000 --epsilons 8 inf 1 3 --seeds 0 --epochs 5 --threads 1 --out docs/experiments/dp_fashion
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from common import RunLog, fit_model, image_parser, load_features, pyplot, run_and_save
from taft.privacy import DPConfig
from taft.spec import METHODS
from taft.train import TrainConfig, evaluate


def run(args: argparse.Namespace) -> dict:
    backbone, train_f, test_f = load_features(args)
    log = RunLog(Path(args.out), args)
    for eps in args.epsilons:
        for seed in args.seeds:
            for method in args.methods:
                if log.has(method=method, epsilon_target=eps, seed=seed):
                    continue
                cfg = TrainConfig(epochs=args.epochs, seed=seed)
                dp = None if math.isinf(eps) else DPConfig(clip=args.clip, epsilon=eps, delta=args.delta,
                                                           seed=1000 + seed)
                result = fit_model(backbone, train_f.class_names, train_f, cfg, method=method, head_seed=seed, dp=dp)
                ledger = result.privacy
                log.add({"method": method, "epsilon_target": eps, "seed": seed,
                         "top1": evaluate(result.classifier, test_f).top1,
                         "epsilon_spent": ledger["epsilon"] if ledger else math.inf,
                         "noise_multiplier": ledger["noise_multiplier"] if ledger else 0.0,
                         "expected_batch_size": ledger["expected_batch_size"] if ledger else cfg.batch_size,
                         "epochs": result.config.epochs, "steps": result.metrics["steps"],
                         "train_s": result.metrics["train_time_s"]})
    return log.result()


def summarise(result: dict, out: Path) -> str:
    eps_list = sorted(result["args"]["epsilons"])
    methods = [m for m in METHODS if m in result["args"]["methods"]]
    cell: dict[tuple[str, float], list[float]] = {}
    sigma: dict[float, float] = {}  # the same for every method: it depends on ε, δ, q and the steps only
    for r in result["runs"]:
        cell.setdefault((r["method"], r["epsilon_target"]), []).append(100 * r["top1"])
        sigma[r["epsilon_target"]] = r["noise_multiplier"]
    head = "| method | " + " | ".join(f"ε = {e:g}" for e in eps_list) + " |"
    lines = [head, "|---|" + "---|" * len(eps_list)]
    for m in methods:
        vals = []
        for e in eps_list:
            a = cell.get((m, e))
            if not a:
                vals.append("not run")
                continue
            vals.append(f"{statistics.mean(a):.1f} ± {statistics.stdev(a) if len(a) > 1 else 0:.1f}")
        lines.append(f"| DP-{m} | " + " | ".join(vals) + " |")
    lines += ["", "Noise multipliers σ (calibrated by the PRV accountant): " + ", ".join(
        f"ε={e:g}: {sigma[e]:.2f}" for e in eps_list if not math.isinf(e) and e in sigma) + "."]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    plot(cell, methods, eps_list, out / "accuracy_vs_epsilon.png")
    return table


def plot(cell: dict, methods: list[str], eps_list: list[float], path: Path) -> None:
    plt = pyplot()
    xs = list(range(len(eps_list)))
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for m in methods:
        done = [(x, cell[(m, e)]) for x, e in zip(xs, eps_list) if cell.get((m, e))]
        means = [statistics.mean(a) for _, a in done]
        stds = [statistics.stdev(a) if len(a) > 1 else 0 for _, a in done]
        ax.errorbar([x for x, _ in done], means, yerr=stds, marker="o", capsize=3, label=f"DP-{m}")
    ax.set_xticks(xs, [f"{e:g}" if not math.isinf(e) else "∞" for e in eps_list])
    ax.set_xlabel("ε (δ = 1e-5)")
    ax.set_ylabel("test top-1 (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = image_parser(__doc__, "docs/experiments/dp")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1, 3, 8, math.inf])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="default: the recipe's (under DP-SGD 5 below ε = 3, else 10)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    run_and_save(parser.parse_args(), run, summarise)


if __name__ == "__main__":
    main()
