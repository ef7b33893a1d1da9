"""Experiment: a store that grows. A store of --shards shards on the first --base-per-class training images of each
class, then --additions additions of the next --add-per-class images per class each (`ModelStore.add`: new shards at the
store's mean shard size, nothing retrained). After each step: the composed model's top-1 on the test images and the wall
time of the addition, next to a store built once on the same images with the same number of shards (`ModelStore.create`)
and the time of that full rebuild (after the additions --rebuild-at lists; default all). Shards train one after another
in this process (inline), so the times compare the work done, not a pool's scheduling.

    python experiments/store_growth.py --data ../shared/data/cifar10-mini --base-per-class 600 \\
        --add-per-class 100 --additions 4 --shards 8 --test-per-class 200 --threads 2 \\
        --out docs/experiments/store_growth
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from common import RunLog, image_parser, load_features, pyplot, run_and_save
from taft.model import Classifier
from taft.parallel import Execution
from taft.store import SHARD_MIN_STEPS, ModelStore
from taft.train import TrainConfig, evaluate


def parts(features, base: int, add: int, additions: int) -> list:
    """[the base set, addition 1, ...]: per class, the first `base` ids, then `add` more for each addition."""
    by_class: dict[int, list[str]] = {}
    for i, y in zip(features.ids, features.labels):
        by_class.setdefault(int(y), []).append(i)
    cuts = [0, base] + [base + add * j for j in range(1, additions + 1)]
    return [features.select([i for ids in by_class.values() for i in ids[a:b]]) for a, b in zip(cuts, cuts[1:])]


def composed_top1(root: Path, backbone, test) -> float:
    return evaluate(ModelStore(root).load_composed(backbone).classifier, test).top1


def run(args: argparse.Namespace) -> dict:
    args.train_per_class = args.base_per_class + args.add_per_class * args.additions
    backbone, train_f, test_f = load_features(args)
    steps = parts(train_f, args.base_per_class, args.add_per_class, args.additions)
    model = Classifier(backbone, list(train_f.class_names), 1, method="taft", head_seed=args.seed)
    config = TrainConfig(epochs=args.epochs, seed=args.seed)
    inline = Execution("inline", progress=False)
    threads = args.threads or torch.get_num_threads()  # every shard in this process, with all its threads
    log = RunLog(Path(args.out), args)
    work = Path(args.out) / "stores"
    grown = work / "incremental"
    if not log.has(step=0):
        shutil.rmtree(work, ignore_errors=True)
        t = time.perf_counter()
        ModelStore.create(grown, steps[0], model, config, shards=args.shards, threads=threads,
                          min_steps=args.min_steps, execution=inline)
        seconds = time.perf_counter() - t
        log.add({"step": 0, "n": len(steps[0]), "shards": args.shards, "incremental_top1": composed_top1(
            grown, backbone, test_f), "rebuilt_top1": None, "add_s": None, "rebuild_s": seconds})
    for j in range(1, len(steps)):
        if log.has(step=j):
            continue
        t = time.perf_counter()
        result = ModelStore(grown).add(steps[j], execution=inline)
        add_s = time.perf_counter() - t
        union = train_f.select([i for part in steps[:j + 1] for i in part.ids])
        shards = ModelStore(grown).manifest.plan.num_shards
        row = {"step": j, "n": len(union), "shards": shards, "new_shards": result.shards,
               "incremental_top1": composed_top1(grown, backbone, test_f), "rebuilt_top1": None,
               "add_s": None if result.resumed else add_s,  # an addition finished before an interruption: untimed
               "rebuild_s": None}
        if args.rebuild_at is None or j in args.rebuild_at:
            rebuilt = work / f"rebuilt-{j}"
            shutil.rmtree(rebuilt, ignore_errors=True)
            t = time.perf_counter()
            ModelStore.create(rebuilt, union, model, config, shards=shards, threads=threads,
                              min_steps=args.min_steps, execution=inline)
            row.update(rebuild_s=time.perf_counter() - t, rebuilt_top1=composed_top1(rebuilt, backbone, test_f))
            shutil.rmtree(rebuilt)
        log.add(row)
    return log.result()


def summarise(result: dict, out: Path) -> str:
    lines = ["| step | images | shards | incremental top-1 % | rebuilt top-1 % | addition s | rebuild s "
             "| rebuild / addition |", "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        rebuilt = "-" if r["rebuilt_top1"] is None else f"{100 * r['rebuilt_top1']:.1f}"
        add = "-" if r["add_s"] is None else f"{r['add_s']:.0f}"
        rebuild = "-" if r["rebuild_s"] is None else f"{r['rebuild_s']:.0f}"
        ratio = "-" if r["add_s"] is None or r["rebuild_s"] is None else f"{r['rebuild_s'] / r['add_s']:.1f}×"
        lines.append(f"| {r['step']} | {r['n']} | {r['shards']} | {100 * r['incremental_top1']:.1f} | {rebuilt} | "
                     f"{add} | {rebuild} | {ratio} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    plt = pyplot()
    if plt is not None:
        runs = result["runs"]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([r["n"] for r in runs], [100 * r["incremental_top1"] for r in runs], "o-", label="incremental (add)")
        later = [r for r in runs if r["rebuilt_top1"] is not None]
        ax.plot([r["n"] for r in later], [100 * r["rebuilt_top1"] for r in later], "s--", label="rebuilt")
        ax.set_xlabel("training images")
        ax.set_ylabel("composed test top-1 (%)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=120)
        plt.close(fig)
    return table


def main() -> None:
    parser = image_parser(__doc__, "docs/experiments/store_growth")
    parser.add_argument("--base-per-class", type=int, default=600)
    parser.add_argument("--add-per-class", type=int, default=100)
    parser.add_argument("--additions", type=int, default=4)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rebuild-at", type=int, nargs="+", metavar="STEP",
                        help="build the comparison store only after these additions (default: after each)")
    parser.add_argument("--min-steps", type=int, default=SHARD_MIN_STEPS, help="per shard (default the store's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    run_and_save(parser.parse_args(), run, summarise)


if __name__ == "__main__":
    main()
