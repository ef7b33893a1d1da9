"""The per-run training curve: training loss and validation top-1 per epoch, as `training_curve.png` beside
metrics.jsonl. Written only when matplotlib is installed (`pip install 'taft-torch[plot]'`); otherwise skipped."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from taft.fileio import atomic_write

CURVE_NAME = "training_curve.png"


def plot_training_curve(history: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Plot `history` (metrics.jsonl records: epoch, train_loss, val_top1) to the PNG `path` (atomically);
    returns the path, or None when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    epochs = [r["epoch"] for r in history]
    val = [(r["epoch"], 100 * r["val_top1"]) for r in history if r.get("val_top1") is not None]
    fig = Figure(figsize=(8, 3.2))
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [r["train_loss"] for r in history], marker="o")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="training loss")
    if val:
        acc_ax.plot(*zip(*val), marker="o", color="tab:green")
        acc_ax.set(xlabel="epoch", ylabel="top-1 (%)", title="validation top-1")
    else:
        acc_ax.text(0.5, 0.5, "no validation data", ha="center", va="center", transform=acc_ax.transAxes)
        acc_ax.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path
