"""Experiment: task arithmetic. Two models trained on disjoint class subsets of the same classes list (task A:
CIFAR-10's vehicles, task B: its animals; each on its own examples, with the full head), merged with weights
(1, 1), (0.5, 0.5) and (1, -1): top-1 on A's test classes, B's and all, next to a model trained on the union. TAFT
merges exactly (`taft.store.merge_checkpoints`: θ0 + Σ wᵢ(θᵢ − θ0)); the same arithmetic on NLFT weights is only
an approximation of what combining the two functions would give.

    python experiments/task_arithmetic.py --data ../shared/data/cifar10-mini --train-per-class 200 \\
        --test-per-class 100 --epochs 10 --threads 2 --out docs/experiments/task_arithmetic
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import RunLog, fit_model, image_parser, load_images, run_and_save
from taft.data.trunk_features import cache_features
from taft.store import merge_checkpoints
from taft.train import TrainConfig, evaluate

VEHICLES = "airplane,automobile,ship,truck"
WEIGHTS = ((1.0, 1.0), (0.5, 0.5), (1.0, -1.0))


def of_classes(features, names: set[str]):
    """The examples of `features` whose class is in `names`."""
    return features.select([i for i, y in zip(features.ids, features.labels) if features.class_names[y] in names])


def merged_nlft(models, weights):
    """θ0 + Σ wᵢ(θᵢ − θ0) of NLFT models' tail weights (θ0: the shared pretrained tail), loaded into a copy."""
    base = models[0].derive()  # the same spec and base head, trained tensors at w0
    theta0 = base.trainable_state_dict()
    merged = {k: theta0[k] + sum(w * (m.trainable_state_dict()[k] - theta0[k]) for m, w in zip(models, weights))
              for k in theta0}
    base.load_delta_state_dict(merged)
    return base


def run(args: argparse.Namespace) -> dict:
    backbone, train_ds, test_ds = load_images(args)
    train_f, test_f = (cache_features(ds, backbone, 1) for ds in (train_ds, test_ds))
    task_a = set(args.task_a.split(","))
    unknown = task_a - set(train_f.class_names)
    if unknown or not task_a < set(train_f.class_names):
        raise SystemExit(f"--task-a must be some, not all, of the classes {train_f.class_names}; got {sorted(task_a)}")
    task_b = set(train_f.class_names) - task_a
    tests = {"A": of_classes(test_f, task_a), "B": of_classes(test_f, task_b), "all": test_f}
    cfg = TrainConfig(epochs=args.epochs, seed=args.seed)
    log = RunLog(Path(args.out), args)
    work = Path(args.out) / "checkpoints"
    for method in ("taft", "nlft"):
        if log.has(method=method):
            continue
        fitted = {name: fit_model(backbone, train_f.class_names, data, cfg, method=method, head_seed=args.seed)
                  for name, data in (("A", of_classes(train_f, task_a)), ("B", of_classes(train_f, task_b)),
                                     ("union", train_f))}
        scores = {name: {t: evaluate(r.classifier, d).top1 for t, d in tests.items()} for name, r in fitted.items()}
        for weights in WEIGHTS:
            name = f"{weights[0]:g}·A + {weights[1]:g}·B"
            models = [fitted["A"].classifier, fitted["B"].classifier]
            if method == "taft":
                paths = [m.save(work / f"{method}-{t}.safetensors", train_ids=fitted[t].train_ids)
                         for m, t in zip(models, "AB")]
                merged = type(models[0]).load(merge_checkpoints(paths, weights, work / "merged.safetensors"),
                                              backbone)
            else:
                merged = merged_nlft(models, weights)
            scores[name] = {t: evaluate(merged, d).top1 for t, d in tests.items()}
        log.add({"method": method, "scores": scores})
    return log.result()


def summarise(result: dict, out: Path) -> str:
    lines = ["| method | model | top-1 on A's classes | on B's classes | on all |", "|---|---|---|---|---|"]
    for r in result["runs"]:
        exact = "TAFT (exact)" if r["method"] == "taft" else "NLFT (approximate)"
        for name, s in r["scores"].items():
            lines.append(f"| {exact} | {name} | {100 * s['A']:.1f} | {100 * s['B']:.1f} | {100 * s['all']:.1f} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    return table


def main() -> None:
    parser = image_parser(__doc__, "docs/experiments/task_arithmetic")
    parser.add_argument("--task-a", default=VEHICLES, help="the classes of task A, comma-separated (B: the rest)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    run_and_save(parser.parse_args(), run, summarise)


if __name__ == "__main__":
    main()
