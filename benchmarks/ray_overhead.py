"""Wall time of one K-shard store trained through the inline, process-pool and Ray executors, and the overhead of
Ray over the process pool as a ratio (target ≤ 1.15× for shards of ≥ 30 s).

The same store (plan, seeds, threads per shard) goes through each executor, so every composed Δw must be
bit-identical (checked and printed). The trunk features are cached once before any timing and shared by all
runs (bundled DINOv2 ViT-S/14, k = 1). Ray runs on a local instance started before its timed run, as on a cluster
where Ray is already up; the start-up time is printed separately. The process pool's time includes starting its
workers (it has no long-lived form). Shard time ≈ inline wall time / K (inline runs the shards one after another).

    python benchmarks/ray_overhead.py --data ../shared/data/cifar10-mini --per-class 400 --epochs 12
    python benchmarks/ray_overhead.py --synthetic 6 --image-size 28 --shards 2 --epochs 1    # smoke size
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from taft import load_backbone
from taft.data import ImageDataset, ImageRecord, image_folder
from taft.data.images import ArrayImage
from taft.parallel import Execution
from taft.store import ModelStore
from taft.checkpoint import read_checkpoint
from taft.model import Classifier
from taft.train import TrainConfig

EXECUTORS = ("inline", "process", "ray")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="CIFAR-10 mini (its train/ folder of class sub-folders is used)")
    src.add_argument("--synthetic", type=int, metavar="N", help="N random images per class (10 classes) instead")
    p.add_argument("--per-class", type=int, default=400, help="the first N training images per class (--data)")
    p.add_argument("--image-size", type=int, default=56)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--workers", type=int, default=2, help="process-pool workers; Ray gets workers × threads CPUs")
    p.add_argument("--threads", type=int, default=1, help="torch threads per shard (same for every executor)")
    p.add_argument("--executors", nargs="+", choices=EXECUTORS, default=list(EXECUTORS))
    p.add_argument("--json", type=Path, help="also write the results here")
    return p


def synthetic_images(n_per_class: int, preprocess) -> ImageDataset:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), n_per_class)
    arr = rng.integers(0, 256, (len(labels), 32, 32, 3), dtype=np.uint8)
    records = [ImageRecord(f"synthetic/{i:05d}", int(y), ArrayImage(arr, i)) for i, y in enumerate(labels)]
    return ImageDataset(records, [f"class{c}" for c in range(10)], preprocess, source_digest="ray-overhead-v1")


def start_ray(cpus: int) -> tuple[float, bool]:
    """(seconds to start a local Ray instance, whether it was started here); 0 when one is already up."""
    import ray

    if ray.is_initialized():
        return 0.0, False
    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return time.perf_counter() - t0, True


def run(args: argparse.Namespace) -> dict:
    backbone = load_backbone("dinov2-vits14", image_size=args.image_size)
    if args.data is not None:
        dataset = image_folder(args.data / "train").per_class(args.per_class)  # the model's preprocessing
    else:
        dataset = synthetic_images(args.synthetic, backbone.preprocess)
    model = Classifier(backbone, dataset.class_names, 1, method="taft")
    t0 = time.perf_counter()
    features = model.cache_features(dataset, progress=False)
    feature_s = time.perf_counter() - t0
    config = TrainConfig(epochs=args.epochs, seed=0)
    work = Path(tempfile.mkdtemp(prefix="taft-ray-bench-"))
    walls: dict[str, float] = {}
    composed = {}
    ray_start_s, started = 0.0, False
    try:
        for kind in args.executors:
            if kind == "ray":
                ray_start_s, started = start_ray(args.workers * args.threads)
            t0 = time.perf_counter()
            execution = Execution(kind, workers=args.workers if kind == "process" else None, progress=False)
            store = ModelStore.create(work / kind, features, model, config, shards=args.shards, threads=args.threads,
                                      min_steps=0, execution=execution)
            walls[kind] = time.perf_counter() - t0
            composed[kind] = read_checkpoint(store.composed_path).tensors
    finally:
        if started:
            import ray

            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    first = next(iter(composed.values()))
    identical = all(sorted(c) == sorted(first) and all(torch.equal(c[k], first[k]) for k in c)
                    for c in composed.values())
    out = {"n": len(dataset), "shards": args.shards, "epochs": args.epochs, "image_size": args.image_size,
           "workers": args.workers, "threads": args.threads, "feature_cache_s": feature_s, "wall_s": walls,
           "ray_start_s": ray_start_s if "ray" in walls else None, "identical": bool(identical),
           "load_average": list(os.getloadavg()), "cores": os.cpu_count()}
    if "inline" in walls:
        out["shard_s"] = walls["inline"] / args.shards
    if "ray" in walls and "process" in walls:
        out["ray_over_process"] = walls["ray"] / walls["process"]
    return out


def report(r: dict) -> str:
    lines = [f"{r['shards']} shards of {r['n'] // r['shards']} examples ({r['n']} images at {r['image_size']} px, "
             f"{r['epochs']} epochs), {r['workers']} workers × {r['threads']} thread(s); features cached once in "
             f"{r['feature_cache_s']:.1f} s; load average {' '.join(f'{x:.2f}' for x in r['load_average'])} on "
             f"{r['cores']} cores"]
    lines += [f"  {kind:<8} {s:8.1f} s" for kind, s in r["wall_s"].items()]
    if "shard_s" in r:
        lines.append(f"  shard time ≈ {r['shard_s']:.1f} s (inline wall / K)")
    if r.get("ray_start_s"):
        lines.append(f"  Ray start-up (not in its wall time): {r['ray_start_s']:.1f} s")
    if "ray_over_process" in r:
        lines.append(f"  Ray / process pool: {r['ray_over_process']:.3f}×")
    lines.append(f"  composed Δw bit-identical across executors: {'yes' if r['identical'] else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    result = run(args)
    print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    if not result["identical"]:
        sys.exit("the executors trained different Δw")
    return result


if __name__ == "__main__":
    main()
