"""`taft report`: a Markdown page with PNG plots describing a store: shard sizes, the privacy guarantee (DP
stores), per-shard and composed accuracy on labelled data (when given), and the audit log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from taft.data.feature_cache import CachedFeatures
from taft.devices import resolve_device
from taft.errors import TaftError
from taft.fileio import atomic_write
from taft.privacy import PrivacyLedger, describe
from taft.store.manifest import Manifest
from taft.store.store import ModelStore
from taft.train import evaluate


def _bar_png(path: Path, labels: list[str], values: list[float], ylabel: str, title: str,
             line: tuple[str, float] | None = None) -> None:
    try:
        import matplotlib
    except ImportError:
        raise TaftError("plots need matplotlib: pip install 'taft-torch[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(labels) + 2), 3.2))
    ax.bar(labels, values, color="#4a7")
    if line is not None:
        ax.axhline(line[1], color="#a33", linestyle="--", label=line[0])
        ax.legend(loc="lower right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def accuracies(store: ModelStore, data: CachedFeatures, device: torch.device | str | None = None) -> dict[str, Any]:
    """Top-1 of every trained shard and of the composed model on `data` (trunk features of the store's k),
    evaluated on `device` (default the CPU)."""
    where = resolve_device(device)
    shards = {}
    for s in store.manifest.shards:
        if s.trained:
            shards[s.index] = evaluate(store.load_shard(s.index).classifier.to(where), data).top1
    composed = evaluate(store.load_composed().classifier.to(where), data).top1 if store.composed_path else None
    return {"shards": shards, "composed": composed, "n": len(data)}


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def privacy_lines(info: dict[str, Any]) -> list[str]:
    """The "Privacy" section of a DP store's report: the guarantee, the DP-SGD settings, each shard's ledger."""
    dp = info["dp"]
    budget = (f"target ε = {dp['epsilon']:g}" if dp.get("epsilon") is not None
              else f"noise multiplier σ = {dp['noise_multiplier']:g}")
    guarantee = describe(info["privacy"]) if info["privacy"] else "none (no shard composed)"
    lines = ["## Privacy", "", f"- guarantee of the composed model: {guarantee}",
             f"- every shard trained with DP-SGD on its own disjoint data: {budget} per shard, δ = {dp['delta']:g}, "
             f"clip C = {dp['clip']:g}, {dp['accountant']} accountant; the store's guarantee is the max over the "
             "composed shards (parallel composition); a retrained shard accounts for all its releases (sums of ε "
             "and δ)", "",
             "| shard | status | ε | δ | releases | σ | q | steps |", "|---|---|---|---|---|---|---|---|"]
    for s in info["shards"]:
        if not s.get("privacy"):
            lines.append(f"| {s['index']} | {s['status']} | - | - | 0 | - | - | - |")
            continue
        led = PrivacyLedger.from_dict(s["privacy"])
        runs = [PrivacyLedger.from_dict(c) for c in led.components] if led.components is not None else [led]
        lines.append(f"| {s['index']} | {s['status']} | {_fmt(led.epsilon)} | {led.delta:g} | {len(runs)} | "
                     f"{', '.join(_fmt(r.noise_multiplier) for r in runs)} | "
                     f"{', '.join(_fmt(r.sample_rate) for r in runs)} | "
                     f"{', '.join(_fmt(r.steps, 'd') for r in runs)} |")
    return lines + [""]


def origin(m: Manifest, index: int) -> str:
    """How shard `index` joined the store: "created", "added <time>", "imported <time>" (+ "drop-only")."""
    a = m.addition_of(index)
    if a is None:
        return "created"
    return f"{'added' if a.op == 'add' else 'imported'} {a.time}" + ("" if a.retrainable else " (drop-only)")


def write_report(store_root: str | Path, out_dir: str | Path, data: CachedFeatures | None = None,
                 device: torch.device | str | None = None) -> Path:
    """Write `out_dir/report.md` (+ shard_sizes.png, accuracy.png with `data`, evaluated on `device`); returns the
    Markdown path."""
    store = ModelStore(store_root)
    info = store.info()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = store.manifest.shards
    lines = [f"# taft store report: `{info['store']}`", "",
             f"- model: {info['method']} on `{info['backbone']}`, k = {info['tangent_blocks']}, "
             f"{len(info['class_names'])} classes, fingerprint `{info['fingerprint'][:16]}…`",
             f"- plan: {info['plan']['kind']}, {info['plan']['k']} shards over {info['plan']['n']} examples "
             f"(seed {info['plan']['seed']}); {info['forgotten']} ids forgotten",
             "- composed: " + (f"content sha256 `{str(info['composed'].get('content_sha256'))[:16]}…` (tensors), file "
                                f"sha256 `{info['composed']['sha256'][:16]}…`, from shards "
                                f"{info['composed']['shards']} ({info['composition']['weighting']} weights)"
                                if info["composed"] else "none"),
             f"- generation {info['generation']}, updated {info['updated']}", "",
             "## Shards", "", "| shard | status | examples | seed | origin | file |", "|---|---|---|---|---|---|"]
    m = store.manifest
    lines += [f"| {s.index} | {s.status} | {s.n} | {s.seed} | {origin(m, s.index)} | {s.file or '-'} |"
              for s in shards]
    _bar_png(out / "shard_sizes.png", [str(s.index) for s in shards], [s.n for s in shards], "examples",
             "shard sizes")
    lines += ["", "![shard sizes](shard_sizes.png)", ""]
    if "dp" in info:
        lines += privacy_lines(info)
    if data is not None:
        acc = accuracies(store, data, device)
        lines += ["## Accuracy", "", f"Top-1 on {acc['n']} labelled examples.", "", "| model | top-1 |", "|---|---|"]
        lines += [f"| shard {i} | {100 * a:.2f}% |" for i, a in acc["shards"].items()]
        if acc["composed"] is not None:
            lines.append(f"| **composed** | **{100 * acc['composed']:.2f}%** |")
        _bar_png(out / "accuracy.png", [str(i) for i in acc["shards"]], [100 * a for a in acc["shards"].values()],
                 "top-1 (%)", "shard models vs composed",
                 line=("composed", 100 * acc["composed"]) if acc["composed"] is not None else None)
        lines += ["", "![accuracy](accuracy.png)", ""]
        atomic_write(out / "accuracy.json", lambda p: p.write_text(json.dumps(acc, indent=1)))
    lines += ["## Audit log", "", "| time | operation | details | composed: content sha256 / file sha256 |",
              "|---|---|---|---|"]
    hashes = ("composed_content_sha256", "composed_sha256")  # older entries recorded the file's only
    for e in store.audit():
        details = {k: v for k, v in e.items() if k not in ("time", "op", "op_id", *hashes)}
        text = json.dumps(details, ensure_ascii=False)
        shown = " / ".join(f"`{str(e.get(k) or '-')[:12]}`" for k in hashes)
        lines.append(f"| {e.get('time', '')} | {e.get('op', '')} | {text[:160]}{'…' if len(text) > 160 else ''} "
                     f"| {shown} |")
    report = out / "report.md"
    atomic_write(report, lambda p: p.write_text("\n".join(lines) + "\n"))
    return report
