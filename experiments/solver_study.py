"""Experiment: conjugate gradient (`taft.train.solver`) against Adam at equal passes over the training data, on
validation data only (the same split as experiments/recipe_study.py; no test data is read).

TAFT k=1 is trained by conjugate gradient on the κ = 15 squared loss for each λ of --regs (the proximity term
λ‖Δw‖²), --iterations iterations from Δw = 0 with the same seeded base head as the Adam runs; the table reports it
after each of --report-at iterations (CG does not depend on when it stops, so one run gives them all). A CG run of
k iterations takes k + 1 passes over the training data (one for b = Jᵀt/N). Adam's row is read from a
recipe_study.py results file (--adam-results, --adam-variant): one epoch is one pass. Results are written after
every run; a rerun with the same --out skips the λ already there.

    python experiments/solver_study.py --data ../shared/data/cifar10-mini/train --image-size 112 \
        --train-per-class 300 --val-per-class 100 --iterations 30 --regs 0 1e-4 1e-3 --threads 1 \
        --out docs/experiments/solver
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from common import RunLog, pyplot
from recipe_study import load_split, split_parser
from taft.model import Classifier
from taft.train import TrainConfig
from taft.train.examples import Examples, Prepared
from taft.train.solver import conjugate_gradient


def run_cg(reg: float, args: argparse.Namespace, backbone, train_f, val_f) -> dict:
    """One CG run of --iterations at λ = `reg`: its convergence report."""
    config = TrainConfig(reg=reg, seed=args.seed)
    classifier = Classifier(backbone, list(train_f.class_names), 1, method="taft", pooling="cls", head_seed=args.seed)
    train, val = (Prepared(classifier, Examples(f, what)) for f, what in ((train_f, "training data"),
                                                                       (val_f, "validation data")))
    history = conjugate_gradient(classifier, config, train, val, iterations=args.iterations, tol=args.tol,
                                 batch_size=args.batch_size, progress=args.progress)
    return {"reg": reg, "history": history, "val_top1": history[-1]["val_top1"]}


def adam_reference(args: argparse.Namespace) -> dict | None:
    """The Adam run of --adam-variant in --adam-results (None when the file is absent)."""
    path = Path(args.adam_results)
    if not path.is_file():
        return None
    runs = [r for r in json.loads(path.read_text())["runs"] if r["variant"] == args.adam_variant]
    if not runs:
        raise SystemExit(f"{path} has no run of variant {args.adam_variant!r}")
    r = runs[0]
    return {"variant": r["variant"], "source": str(path), "val_top1": r["val_top1"], "passes": r["epochs"],
            "train_s": r["train_s"], "final_train_loss": r["final_train_loss"], "curve": r["curve"]}


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = RunLog(out, args)
    backbone, features = load_split(args, [1])
    train_f, val_f = features[1]
    print(f"train {len(train_f)} / val {len(val_f)} examples; λ in {args.regs}, {args.iterations} iterations",
          flush=True)
    for reg in args.regs:
        if not log.has(reg=reg):
            log.add(run_cg(reg, args, backbone, train_f, val_f))
    return {**log.result(), "adam": adam_reference(args), "n_train": len(train_f), "n_val": len(val_f)}


def summarise(result: dict, out: Path) -> str:
    lines = ["| solver | λ | iterations | passes | val top-1 | objective | rel. ‖∇L‖ | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        for rec in r["history"]:
            if rec["iteration"] in result["args"]["report_at"] or rec is r["history"][-1]:
                lines.append(f"| CG | {r['reg']:g} | {rec['iteration']} | {rec['passes']} | "
                             f"{100 * rec['val_top1']:.1f} | {rec['objective']:.3f} | {rec['grad_norm']:.3f} | "
                             f"{rec['elapsed_s']:.0f} |")
    adam = result["adam"]
    if adam is not None:
        lines.append(f"| Adam ({adam['variant']}) | 0 | - | {adam['passes']} | {100 * adam['val_top1']:.1f} | "
                     f"{adam['final_train_loss']:.3f} (last epoch's batches) | - | {adam['train_s']:.0f} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    plot(result, out / "convergence.png")
    return table


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, (acc, obj) = plt.subplots(1, 2, figsize=(10, 4))
    for r in result["runs"]:
        passes = [rec["passes"] for rec in r["history"]]
        acc.plot(passes, [100 * rec["val_top1"] for rec in r["history"]], marker=".", label=f"CG λ={r['reg']:g}")
        obj.plot(passes, [rec["objective"] for rec in r["history"]], marker=".", label=f"CG λ={r['reg']:g}")
    adam = result["adam"]
    if adam is not None:
        acc.plot(range(1, len(adam["curve"]) + 1), [100 * a for a in adam["curve"]], marker="s", color="k",
                 label="Adam (recipe default)")
        obj.plot([adam["passes"]], [adam["final_train_loss"]], "ks", label="Adam, last epoch's mean batch loss")
    acc.set(xlabel="passes over the training data", ylabel="val top-1 (%)", title="validation accuracy")
    obj.set(xlabel="passes over the training data", ylabel="L (squared loss + λ‖Δw‖²)", yscale="log",
            title="training objective")
    for ax in (acc, obj):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = split_parser(__doc__)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--report-at", type=int, nargs="+", default=[9, 10, 30],
                        help="iterations shown in the table (and the last one)")
    parser.add_argument("--regs", type=float, nargs="+", default=[0.0, 1e-4, 1e-3], help="λ of each CG run")
    parser.add_argument("--tol", type=float, default=0.0, help="stop when ‖∇L‖ falls below tol × its start")
    parser.add_argument("--batch-size", type=int, default=256, help="how a pass is split (same result)")
    parser.add_argument("--seed", type=int, default=0, help="the base head's seed (as the Adam run's)")
    parser.add_argument("--adam-results", default="docs/experiments/recipe/cifar-k1/results.json")
    parser.add_argument("--adam-variant", default="method=taft,lr=0.001,warmup=0.1,head_lr=0.01")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per run")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    (Path(args.out) / "results.json").write_text(json.dumps(result, indent=1))
    print(summarise(result, Path(args.out)))


if __name__ == "__main__":
    main()
