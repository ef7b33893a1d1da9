"""How the cost of training grows with the data: cached vs streamed trunk features at N images.

For each N in `--sizes`, a folder of N synthetic JPEG images (10 classes, `--image-size` px, a class colour plus
noise; decoded from disk as a user's would be) and a fixed validation folder of `--val-n` images. With the bundled
DINOv2 ViT-S/14 (`--tiny`: a random tiny ViT) and k = 1, TAFT, each configuration runs in a fresh Python process,
so that its peak RSS (`ru_maxrss` of that process; of its DataLoader workers beside it) is its own:

  build     : `Classifier.cache_features` of the N images into an empty feature cache (`--cache-dtype`): seconds,
              and the entry's bytes (features.npy; per example too);
  cached    : one epoch of `fit` on that entry (features="cache", which reads it): the training loop's seconds;
  stream wK : one epoch of `fit` streaming the trunk (features="stream", K DataLoader workers; `--workers`).

Printed last, one table: per N the measurements and the stream/cache epoch-time ratios, then the growth exponents
(the least-squares slope of log(quantity) against log(N): 1 is linear) of every time, the disk and the peak RSS.

    python benchmarks/scale.py                                   # N = 1000 4000 16000 on the CPU
    python benchmarks/scale.py --sizes 250 500 1000 --threads 2 --out scale-cpu.json
    python benchmarks/scale.py --device cuda --out scale-gpu.json
    python benchmarks/scale.py --tiny --sizes 10 20 --val-n 10 --workers 1  # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = 10
TRAIN_SEED, VAL_SEED = 0, 1


def write_images(folder: Path, n: int, size: int, seed: int) -> None:
    """n JPEG images of `size` px in `folder/c<class>/`, image i of class i mod 10: its class colour plus noise."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (CLASSES, 3))
    for c in range(CLASSES):
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        noise = rng.integers(-40, 40, (size, size, 3))
        pixels = np.clip(colours[i % CLASSES] + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"c{i % CLASSES}" / f"{i:06d}.jpg", quality=90)


def peak_rss_mib(who: int) -> float:
    """Peak resident set of this process (RUSAGE_SELF) or of its finished children (RUSAGE_CHILDREN), in MiB
    (Linux reports KiB)."""
    return resource.getrusage(who).ru_maxrss / 1024


def measure(spec: dict) -> dict:
    """Run one configuration (`spec`) in this process; returns its measurements (see the module doc)."""
    import torch

    import taft
    from taft.data import image_folder
    from taft.train import Compute, FeatureSource, TrainConfig, fit

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["tiny"]:
        from train_throughput import TINY, random_backbone  # a sibling: this file runs as a script here

        backbone = random_backbone(TINY, spec["image_size"])
    else:
        backbone = taft.load_backbone(spec["backbone"], image_size=spec["image_size"])
    train = image_folder(spec["images"], backbone.preprocess)
    val = image_folder(spec["val"], backbone.preprocess)
    model = taft.Classifier(backbone, train.class_names, 1, method="taft")
    dtype = getattr(torch, spec["cache_dtype"])
    device = torch.device(spec["device"])
    if spec["phase"] == "build":
        model.to(device).cache_features(val, root=spec["cache"], dtype=dtype, progress=False)  # untimed
        t0 = time.perf_counter()
        entry = model.cache_features(train, root=spec["cache"], dtype=dtype, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        features_bytes = (entry.path / "features.npy").stat().st_size
        out = {"build_s": seconds, "cache_bytes": features_bytes, "bytes_per_example": features_bytes / len(entry),
               "entry_bytes": sum(f.stat().st_size for f in entry.path.iterdir())}
    else:
        mode = "cache" if spec["phase"] == "cached" else "stream"
        source = FeatureSource(mode=mode, loader_workers=spec["workers"], cache_dtype=dtype,
                               cache_root=spec["cache"])
        result = fit(model, train, TrainConfig(epochs=1, batch_size=spec["batch_size"]), val=val, features=source,
                     progress=False, compute=Compute(device=device))
        out = {"epoch_s": result.metrics["train_time_s"], "fit_s": result.metrics["wall_time_s"],
               "feed": result.metrics["compute"]["feed"]["train"]}
    return {**out, "peak_rss_mib": peak_rss_mib(resource.RUSAGE_SELF),
            "workers_peak_rss_mib": peak_rss_mib(resource.RUSAGE_CHILDREN)}


def in_fresh_process(spec: dict) -> dict:
    """`measure(spec)` in a new Python process (its output's last line is the result's JSON)."""
    done = subprocess.run([sys.executable, __file__, "--measure", json.dumps(spec)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode:
        raise RuntimeError(f"{spec['phase']} at N={spec['n']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) against log(x) (None with fewer than 2 points)."""
    if len(xs) < 2:
        return None
    lx, ly = np.log(xs), np.log(ys)
    return float(np.polyfit(lx, ly, 1)[0])


def table(rows: list[dict], workers: list[int]) -> tuple[str, dict]:
    """The printed table and the growth exponents."""
    streams = [f"stream_w{w}" for w in workers]
    head = ["N", "build s", "cache MiB", "B/example", "cached epoch s", *[f"{s} epoch s" for s in streams],
            *[f"{s}/cache" for s in streams], "peak RSS MiB (build/cached/" + "/".join(streams) + ")"]
    lines = [" | ".join(head)]
    for r in rows:
        cached = r["cached"]["epoch_s"]
        peaks = "/".join(f"{r[p]['peak_rss_mib']:.0f}" for p in ["build", "cached", *streams])
        build = r["build"]
        lines.append(" | ".join([str(r["n"]), f"{build['build_s']:.1f}", f"{build['cache_bytes'] / 2**20:.1f}",
                                 f"{build['bytes_per_example']:.0f}", f"{cached:.2f}",
                                 *[f"{r[s]['epoch_s']:.2f}" for s in streams],
                                 *[f"{r[s]['epoch_s'] / cached:.2f}" for s in streams], peaks]))
    ns = [r["n"] for r in rows]
    quantities = {"build time": [r["build"]["build_s"] for r in rows],
                  "cache bytes": [r["build"]["cache_bytes"] for r in rows],
                  "cached epoch time": [r["cached"]["epoch_s"] for r in rows],
                  **{f"{s} epoch time": [r[s]["epoch_s"] for r in rows] for s in streams},
                  **{f"peak RSS {p}": [r[p]["peak_rss_mib"] for r in rows] for p in ["build", "cached", *streams]}}
    exponents = {name: slope(ns, ys) for name, ys in quantities.items()}
    lines.append("growth exponents (slope of log quantity vs log N): " + ", ".join(
        f"{name} {e:.2f}" if e is not None else f"{name} -" for name, e in exponents.items()))
    return "\n".join(lines), exponents


def main(argv: list[str] | None = None) -> dict:
    from taft.devices import resolve_device
    from taft.train import FeatureSource, TrainConfig

    default_dtype = str(FeatureSource().cache_dtype).removeprefix("torch.")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000], help="numbers of training images")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="streaming DataLoader workers to time")
    ap.add_argument("--image-size", type=int, help="px (default 112; --tiny 28)")
    ap.add_argument("--val-n", type=int, default=50, help="validation images (fit's evaluation; default 50)")
    ap.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    ap.add_argument("--cache-dtype", choices=["float32", "float16"], default=default_dtype)
    ap.add_argument("--threads", type=int, help="torch CPU threads of each measuring process")
    ap.add_argument("--backbone", default="dinov2-vits14",
                    help="registry name or weights file (on the GPU machine: "
                         ".gpu_assets/dinov2-vits14-f16.safetensors from benchmarks/gpu_assets.py; default "
                         "dinov2-vits14)")
    ap.add_argument("--tiny", action="store_true", help="a random tiny ViT at 28 px: a smoke run")
    ap.add_argument("--out", help="write the results (JSON) here")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # one configuration, in a fresh process
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return {}
    if min(args.sizes + [args.val_n]) < CLASSES:
        ap.error(f"--sizes and --val-n must be at least {CLASSES} (one image per class)")
    size = args.image_size or (28 if args.tiny else 112)
    device = str(resolve_device(args.device))
    load = os.getloadavg()
    print(f"{'tiny random ViT' if args.tiny else args.backbone} at {size} px, k=1, taft, sizes {args.sizes}, "
          f"device {device}, cache {args.cache_dtype}, threads {args.threads or 'default'}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="taft-scale-") as tmp:
        root = Path(tmp)
        write_images(root / "val", args.val_n, size, VAL_SEED)
        for n in args.sizes:
            images = root / f"n{n}"
            write_images(images, n, size, TRAIN_SEED)
            base = {"n": n, "images": str(images), "val": str(root / "val"), "cache": str(root / f"cache{n}"),
                    "image_size": size, "tiny": args.tiny, "backbone": args.backbone, "device": device,
                    "threads": args.threads,
                    "cache_dtype": args.cache_dtype, "batch_size": args.batch_size, "workers": 0}
            row: dict = {"n": n}
            for phase, workers in [("build", 0), ("cached", 0), *[("stream", w) for w in args.workers]]:
                name = phase if phase != "stream" else f"stream_w{workers}"
                row[name] = in_fresh_process({**base, "phase": phase, "workers": workers})
                print(f"N={n} {name}: {json.dumps(row[name])}", flush=True)
            rows.append(row)
    text, exponents = table(rows, args.workers)
    print(text)
    out = {"args": vars(args), "device": device, "image_size": size, "load_average_start": load,
           "load_average_end": os.getloadavg(), "rows": rows, "exponents": exponents}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
