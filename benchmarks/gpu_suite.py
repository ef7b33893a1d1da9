"""The GPU suite: one command that checks and measures taft on a CUDA GPU, section by section, in about 8 minutes.

Sections (`--sections`, comma-separated, in this order by default), each with its own time box (`--budget`
scales them all) so that a slow or failing one does not cost the others their results; the JSON is written after
every section:
  tests        the CUDA tests (tests/test_devices.py -k cuda) in a pytest subprocess: passed / failed / skipped
  correctness  on the device: the tangent tail against torch.func.jvp (float64, and float32 against float64),
               pruned = unpruned (outputs and gradients), ghost clipping = clipped per-example gradients,
               resident = streamed = host-fed features (identical weights where training repeats bit for bit; a
               second host run tells), a checkpoint saved on the device loads on the CPU with the same content hash
  steps        training-step cost (benchmarks/step_cost.py's steps): probe / nlft / taft / jvp (last block pruned,
               the default) and taft in full, at 112 and 224 px, k = 1, 2, 4, batch 32 and 256, float32 and bf16
               autocast, eager; then taft and nlft compiled at k = 1; TAFT/NLFT ratios; peak GPU memory per method
  features     the trunk-feature build (`cache_features`: decode, preprocess, trunk, write) in images/s, float32 and
               bf16, and the trunk's forward alone on device-resident batches
  dp           the DP-SGD step (benchmarks/dp_step.py): ghost clipping and vmap against a plain step
  accuracy     probe / NLFT-1 / TAFT-1 at 224 and 112 px on the CIFAR-10 images of the assets, with the library's
               default recipes (no tuning; the test split is read once per model); at 224 px also NLFT-1 and
               TAFT-1 streamed with crop-flip augmentation

Real weights and images come from `--assets` (written by benchmarks/gpu_assets.py); without them the steps, dp and
correctness sections run as usual (random weights), the features section uses a random ViT-S/14 and synthetic
images, and the accuracy section is skipped. `--tiny` runs every section at toy sizes with a random tiny ViT and
synthetic images (the smoke test, `--tiny --device cpu`, takes seconds).

    PYTHONPATH=src python3 benchmarks/gpu_suite.py --assets .gpu_assets --out $OUT/gpu --device cuda
    PYTHONPATH=src python benchmarks/gpu_suite.py --tiny --device cpu --out /tmp/gpu-smoke
Writes OUT/gpu_suite.json (every section's results), OUT/pytest.log and OUT/pytest.xml (the tests section) and
OUT/table.txt (the summary table, also printed last).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path[:0] = [str(BENCHMARKS), str(REPO / "tests")]  # the sibling benchmarks and tests/reference.py

import dp_step  # noqa: E402
import step_cost  # noqa: E402
import train_throughput  # noqa: E402
from timing import is_cuda, median_ms  # noqa: E402

from taft.backbones import load_backbone  # noqa: E402
from taft.backbones.base import Backbone  # noqa: E402
from taft.backbones.trunk import Trunk  # noqa: E402
from taft.backbones.vit import ViTConfig  # noqa: E402
from taft.checkpoint import checkpoint_content_sha256, content_sha256  # noqa: E402
from taft.data import ImageDataset, ImageRecord  # noqa: E402
from taft.data.images import ArrayImage  # noqa: E402
from taft.data.trunk_features import cache_features  # noqa: E402
from taft.devices import resolve_device, synchronize  # noqa: E402
from taft.errors import AssetMissingError  # noqa: E402
from taft.model import Classifier, TangentModel, load_checkpoint  # noqa: E402
from taft.precision import under_autocast  # noqa: E402
from taft.privacy.dpsgd import clipped_sum  # noqa: E402
from taft.tails import PlainTail  # noqa: E402
from taft.train import Compute, TrainConfig, evaluate, fit  # noqa: E402

SECTIONS = ("tests", "correctness", "steps", "features", "dp", "accuracy")
BUDGET_S = {"tests": 100, "correctness": 40, "steps": 150, "features": 35, "dp": 30, "accuracy": 110}  # 465 s
GRACE_S = 20  # past its time box, a section is stopped by an alarm
JSON_FILE, TABLE_FILE = "gpu_suite.json", "table.txt"
BACKBONE_FILE, DATA_FILE = "dinov2-vits14-f16.safetensors", "cifar10.npz"  # as benchmarks/gpu_assets.py writes
DEPENDENCIES = ("torch", "numpy", "safetensors", "onnx", "tqdm", "pillow", "tokenizers")  # pyproject's


@dataclass(frozen=True)
class Sizes:
    """Every size the sections use: `FULL` on a GPU, `TINY` for the smoke run."""

    vit: ViTConfig  # the backbone's shape when weights are random
    step_px: tuple[int, ...]
    step_ks: tuple[int, ...]
    step_batches: tuple[int, ...]
    compile_rows: tuple[tuple[int, int, int, str], ...]  # (px, k, batch, autocast), in order of interest
    compile_backend: str  # torch.compile's backend: "inductor" (the default) on a GPU; "eager" (tracing only) tiny
    repeats: int
    warmup: int
    check_vit: ViTConfig  # the correctness checks' random ViT (float64)
    check_tokens: int
    build_n: int
    trunk_batch: int
    dp_tokens: tuple[int, ...]
    dp_batch: int
    dp_chunk: int
    accuracy_px: tuple[int, ...]
    synthetic_per_class: int  # tiny: synthetic images per class and split for the accuracy section
    epochs: int | None  # None: the library's default


VIT_S = ViTConfig(dim=384, depth=12, heads=6, mlp_hidden=1536, patch_size=14, pos_grid=37, layerscale=True)
TINY_VIT = ViTConfig(dim=32, depth=3, heads=2, mlp_hidden=64, patch_size=14, pos_grid=4, layerscale=True)
FULL = Sizes(vit=VIT_S, step_px=(112, 224), step_ks=(1, 2, 4), step_batches=(32, 256),
             compile_rows=((112, 1, 32, "none"), (224, 1, 32, "none"), (224, 1, 32, "bf16"), (112, 1, 32, "bf16"),
                           (224, 1, 256, "none"), (224, 1, 256, "bf16")), compile_backend="inductor",
             repeats=10, warmup=3, check_vit=ViTConfig(dim=64, depth=4, heads=4, mlp_hidden=128, patch_size=14,
                                                       pos_grid=4, layerscale=True),
             check_tokens=17, build_n=1024, trunk_batch=256, dp_tokens=(65, 257), dp_batch=256, dp_chunk=64,
             accuracy_px=(224, 112), synthetic_per_class=0, epochs=None)
TINY = Sizes(vit=TINY_VIT, step_px=(28,), step_ks=(1, 2), step_batches=(2,), compile_rows=((28, 1, 2, "none"),),
             compile_backend="eager",
             repeats=1, warmup=1, check_vit=TINY_VIT, check_tokens=5, build_n=8, trunk_batch=4, dp_tokens=(5,),
             dp_batch=4, dp_chunk=2, accuracy_px=(56, 28), synthetic_per_class=3, epochs=1)


# ------------------------------------------------------------------------------------------------ time boxes
class SectionTimeout(Exception):
    """A section ran past its time box (raised by the alarm, or by `Deadline.check`)."""


class Deadline:
    """A section's time box: `left()` seconds remain; loops ask `enough(estimate)` before starting more work."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def enough(self, estimate: float = 0.0) -> bool:
        return self.left() > estimate


@contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise `SectionTimeout` in the main thread after `seconds` (a hard stop behind the cooperative deadline;
    a no-op where SIGALRM does not exist)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(signum, frame):
        raise SectionTimeout(f"stopped after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Context:
    """What every section gets: the device, sizes, assets (None: none), a scratch folder and the output folder."""

    device: torch.device
    sizes: Sizes
    tiny: bool
    assets: Path | None
    scratch: Path
    out: Path
    classes: int = 10


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (NaN anywhere gives NaN, which fails every tolerance)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def verdict(error: float, tol: float) -> dict:
    return {"rel_error": error, "tol": tol, "ok": bool(error <= tol)}  # NaN <= tol is False


# ------------------------------------------------------------------------------------------------ data + backbones
def random_backbone(ctx: Context, px: int) -> Backbone:
    return train_throughput.random_backbone(ctx.sizes.vit, px)


def real_backbone(ctx: Context, px: int) -> Backbone | None:
    """The packed DINOv2 ViT-S/14 at `px` (None in tiny mode or without assets)."""
    if ctx.tiny or ctx.assets is None or not (ctx.assets / BACKBONE_FILE).is_file():
        return None
    return load_backbone(ctx.assets / BACKBONE_FILE, image_size=px)


def packed_images(ctx: Context) -> dict[str, ImageDataset] | None:
    """{"train", "test"}: the packed CIFAR-10 images as datasets without a transform (None without assets)."""
    path = None if ctx.assets is None else ctx.assets / DATA_FILE
    if ctx.tiny or path is None or not path.is_file():
        return None
    npz = np.load(path)
    classes = [str(c) for c in npz["class_names"]]
    digest = f"gpu-assets-{path.stat().st_size}-{int(path.stat().st_mtime)}"
    out = {}
    for split in ("train", "test"):
        images, labels, ids = npz[f"{split}_images"], npz[f"{split}_labels"], npz[f"{split}_ids"]
        records = [ImageRecord(str(i), int(y), ArrayImage(images, n)) for n, (i, y) in enumerate(zip(ids, labels))]
        out[split] = ImageDataset(records, classes, source_digest=f"{digest}-{split}")
    return out


def synthetic(ctx: Context, n: int, px: int, seed: int) -> ImageDataset:
    """`n` synthetic images (class-coloured noise) without a transform."""
    return train_throughput.synthetic_images(n, ctx.classes, px, None, seed=seed)


# ------------------------------------------------------------------------------------------------ tests
def section_tests(ctx: Context, deadline: Deadline, record: dict) -> str:
    """The CUDA tests of tests/test_devices.py in a pytest subprocess; counts and the names of what failed."""
    xml, log = ctx.out / "pytest.xml", ctx.out / "pytest.log"
    cmd = [sys.executable, "-m", "pytest", "tests/test_devices.py", "-k", "cuda", "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    try:  # the CLI test trains the bundled backbone, which the GPU machine has no package for
        from taft.backbones.dinov2_onnx import onnx_file
        onnx_file()
    except AssetMissingError as e:
        cmd += ["--deselect", "tests/test_devices.py::test_cuda_cli_train_and_shards"]
        record["deselected"] = {"test_cuda_cli_train_and_shards": f"needs the bundled DINOv2 weights: {e}"}
    paths = [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    record["command"] = " ".join(cmd)
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=max(deadline.left(), 5))
            record["returncode"] = proc.returncode
        except subprocess.TimeoutExpired:
            record["returncode"] = None
            record["error"] = "pytest ran past the time box"
    if not xml.is_file():
        record["error"] = record.get("error", "pytest wrote no report") + "; see pytest.log"
        return "failed"
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    problems = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = case.get("name")
        outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), None)
        key = {"failure": "failed", "error": "errors", "skipped": "skipped", None: "passed"}[outcome]
        counts[key] += 1
        if outcome in ("failure", "error"):
            problems[name] = (case.find(outcome).get("message") or "")[:300]
    record.update(counts, failures=problems)
    return "ok" if counts["failed"] == counts["errors"] == 0 and record["returncode"] in (0, 5) else "failed"


# ------------------------------------------------------------------------------------------------ correctness
def check_model(ctx: Context, k: int, prune: bool = True) -> TangentModel:
    """A float64 tangent model over a random ViT (realistic weight scales) with a non-zero Δw, on the device."""
    from reference import random_backbone as reference_backbone, randomize_delta

    cfg = ctx.sizes.check_vit
    model = TangentModel(reference_backbone(cfg, cfg.patch_size * 2, seed=0), ctx.classes, tangent_blocks=k,
                         seed=1, prune_last_block=prune).double()
    randomize_delta(model, 0.05)  # on the CPU: its noise is drawn there
    return model.to(ctx.device)


def features(ctx: Context, batch: int, dim: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, ctx.sizes.check_tokens, dim, generator=gen, dtype=dtype).to(ctx.device)


def check_jvp(ctx: Context) -> dict:
    """taft's tail (float64, and float32) against f(w0) + J Δw by torch.func.jvp of the plain tail in float64."""
    from reference import reference_linearized

    out = {}
    for k in (1, 2):
        model = check_model(ctx, k)
        h = features(ctx, 8, model.config.dim)
        f0, jd = reference_linearized(model, h)
        with torch.no_grad():
            ours64 = model.tail(h)
            ours32 = copy.deepcopy(model).float().tail(h.float())
        out[f"k{k}"] = {"float64": verdict(rel(ours64, f0 + jd), 1e-10),
                        "float64_tangent": verdict(rel(ours64 - f0, jd), 1e-9),
                        "float32": verdict(rel(ours32, f0 + jd), 1e-4),
                        "float32_tangent": verdict(rel(ours32 - f0, jd), 1e-3)}
    return out


def check_pruning(ctx: Context) -> dict:
    """The pruned tail (token 0 through the last block) against the full one: logits and Δw gradients."""
    out = {}
    for k in (1, 2):
        pruned, full = check_model(ctx, k, prune=True), check_model(ctx, k, prune=False)
        h = features(ctx, 8, pruned.config.dim)
        target = torch.randn(8, ctx.classes, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        grads, logits = {}, {}
        for name, model in (("pruned", pruned), ("full", full)):
            model.tail.zero_grad(set_to_none=True)
            logits[name] = model.tail(h)
            ((logits[name] - target.to(ctx.device)) ** 2).mean().backward()
            grads[name] = {n: p.grad for n, p in model.tail.named_parameters()}
        worst = max(rel(grads["pruned"][n], g) for n, g in grads["full"].items())
        out[f"k{k}"] = {"logits": verdict(rel(logits["pruned"], logits["full"]), 1e-10),
                        "gradients_worst": verdict(worst, 1e-10)}
    return out


def check_ghost(ctx: Context) -> dict:
    """Ghost clipping's clipped sum against the clipped sum of formed (vmap) per-example gradients, float64, with
    the clip norm at the median norm (some examples clipped, some not)."""
    from reference import random_backbone as reference_backbone

    cfg = ctx.sizes.check_vit
    bb = reference_backbone(cfg, cfg.patch_size * 2, seed=0)
    names = [str(c) for c in range(ctx.classes)]
    out = {}
    for method, k in (("taft", 2), ("nlft", 1), ("probe", 1)):
        clf = Classifier(bb, names, k, method=method).double()
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for p in clf.tail.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        clf = clf.to(ctx.device)
        x = features(ctx, 12, cfg.dim)
        y = (torch.arange(12) % ctx.classes).to(ctx.device)
        inputs, _ = clf.train_inputs(x)
        _, _, norms = clipped_sum(clf, inputs, y, 1.0, chunk_size=4, via="vmap")
        clip = float(norms.median())
        expected, _, expected_norms = clipped_sum(clf, inputs, y, clip, chunk_size=4, via="vmap")
        total, _, ghost_norms = clipped_sum(clf, inputs, y, clip, chunk_size=4, via="ghost")
        worst = max(rel(total[n], e) for n, e in expected.items())
        out[method] = {"norms": verdict(rel(ghost_norms, expected_norms), 1e-10),
                       "clipped_sum_worst": verdict(worst, 1e-10), "clipped": int((expected_norms > clip).sum())}
    return out


def tiny_cached(ctx: Context, k: int = 1):
    """Cached trunk features of 32 synthetic images through a tiny random ViT (float32)."""
    bb = train_throughput.random_backbone(TINY_VIT, 28)
    ds = train_throughput.synthetic_images(32, 4, 28, bb.preprocess)
    return bb, cache_features(ds, bb, k, root=ctx.scratch / "correctness-cache", progress=False)


def check_feeds(ctx: Context) -> dict:
    """fit with the features resident on the device, streamed, and read from the host: identical weights (SHA-256)
    where the device's training repeats bit for bit, which a second host run tells (CUDA's memory-efficient
    attention backward sums over key splits in no fixed order); otherwise equal to float32 rounding (1e-4)."""
    bb, cf = tiny_cached(ctx)
    out = {}
    for method in ("taft", "nlft"):
        tensors = {}
        for feed in ("host", "host-again", "resident", "stream"):
            clf = Classifier(bb, cf.class_names, 1, method=method)
            result = fit(clf, cf, TrainConfig(epochs=2, batch_size=8), progress=False,
                         compute=Compute(device=ctx.device, feed=feed.removesuffix("-again")))
            tensors[feed] = result.classifier.trainable_state_dict()
        sha = {feed: content_sha256(t) for feed, t in tensors.items()}
        repeatable = sha["host"] == sha["host-again"]
        worst = max(rel(t[n], tensors["host"][n]) for t in tensors.values() for n in t)
        same = len(set(sha.values())) == 1
        out[method] = {"repeatable": repeatable, "identical": same, "worst_rel": worst,
                       "ok": same if repeatable else worst <= 1e-4, "sha256": sha}
    return out


def check_checkpoint(ctx: Context) -> dict:
    """A model trained and saved on the device loads on the CPU with the same tensors and content hash."""
    bb, cf = tiny_cached(ctx)
    result = fit(Classifier(bb, cf.class_names, 1), cf, TrainConfig(epochs=1, batch_size=8), progress=False,
                 compute=Compute(device=ctx.device), run_dir=ctx.scratch / "checkpoint-run")
    saved = checkpoint_content_sha256(result.checkpoint)
    on_cpu = load_checkpoint(result.checkpoint, bb, device="cpu").classifier
    again = on_cpu.save(ctx.scratch / "checkpoint-cpu.safetensors")
    trained = content_sha256(result.classifier.trainable_state_dict())
    loaded = content_sha256(on_cpu.trainable_state_dict())
    same = saved == checkpoint_content_sha256(again) and trained == loaded
    return {"ok": same, "saved_sha256": saved, "resaved_on_cpu_sha256": checkpoint_content_sha256(again),
            "trained_tensors_sha256": trained, "loaded_tensors_sha256": loaded,
            "device_of_trained_model": str(result.classifier.device)}


def oks(tree) -> Iterator[bool]:
    """Every `ok` value in a nested result."""
    if isinstance(tree, dict):
        if "ok" in tree:
            yield bool(tree["ok"])
        for value in tree.values():
            yield from oks(value)


def all_ok(tree) -> bool:
    """Whether a nested result has at least one `ok` and all of them are true."""
    found = list(oks(tree))
    return bool(found) and all(found)


def section_correctness(ctx: Context, deadline: Deadline, record: dict) -> str:
    checks = {"tail_vs_jvp": check_jvp, "pruned_vs_unpruned": check_pruning, "ghost_vs_per_example": check_ghost,
              "resident_vs_streamed": check_feeds, "checkpoint_device_to_cpu": check_checkpoint}
    for name, check in checks.items():
        if not deadline.enough():
            record[name] = {"ok": False, "error": "not run: the time box ran out"}
            continue
        try:
            record[name] = check(ctx)
        except Exception as e:  # one failing check does not stop the others
            record[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
    return "ok" if all(all_ok(record[n]) for n in checks) else "failed"


# ------------------------------------------------------------------------------------------------ step cost
def build_steps(ctx: Context, backbone: Backbone, px: int, k: int, batch: int,
                compiled: bool) -> dict[str, Callable[[], None]]:
    """Training-step closures on the same features and targets: probe (its head on pooled features), nlft (plain
    tail, fused attention), taft (tangent tail), jvp (torch.func.jvp of the plain tail; eager only), all with the
    last block pruned (the default), and taft-full (unpruned; eager only). `compiled`: taft and nlft only, their
    tail modules through torch.compile."""
    cfg = ctx.sizes.vit
    tokens = (px // cfg.patch_size) ** 2 + 1
    h = torch.randn(batch, tokens, cfg.dim, device=ctx.device)
    labels = torch.randint(0, ctx.classes, (batch,))
    target = 15.0 * nn.functional.one_hot(labels, ctx.classes).float().to(ctx.device)
    def maybe(module: nn.Module) -> nn.Module:
        return torch.compile(module, backend=ctx.sizes.compile_backend) if compiled else module

    model = TangentModel(backbone, ctx.classes, tangent_blocks=k, seed=0).to(ctx.device)
    plain = model.materialize()
    steps = {"nlft": step_cost.training_step(maybe(PlainTail(plain.encoder, k, plain.head).to(ctx.device)), h,
                                             target),
             "taft": step_cost.training_step(maybe(model.tail), h, target)}
    if compiled:
        return steps
    probe = Classifier(backbone, [str(c) for c in range(ctx.classes)], k, method="probe").to(ctx.device)
    pooled, _ = probe.train_inputs(h)
    jvp_tail = PlainTail(plain.encoder, k, plain.head).to(ctx.device)
    for block in jvp_tail.blocks.values():
        block.attn.impl = "manual"
    full = TangentModel(backbone, ctx.classes, tangent_blocks=k, seed=0, prune_last_block=False).to(ctx.device)
    return {"probe": step_cost.training_step(probe.tail.head, pooled, target), **steps,
            "jvp": step_cost.jvp_step(jvp_tail, h, target),
            "taft-full": step_cost.training_step(full.tail, h, target)}


def time_row(ctx: Context, steps: dict[str, Callable[[], None]], autocast: str) -> dict:
    """Median ms and peak memory (MiB; on the CPU: saved-for-backward) of each step under `autocast`; a step
    that fails is reported by its error and left out."""
    wrapped, errors = {}, {}
    for name, step in steps.items():
        step = under_autocast(step, autocast, ctx.device)
        try:
            step()
            wrapped[name] = step
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"[:300]
    ms = median_ms(wrapped, ctx.device, ctx.sizes.repeats, ctx.sizes.warmup) if wrapped else {}
    mib = {name: step_cost.step_memory(step, str(ctx.device)) / 2**20 for name, step in wrapped.items()}
    ratios = {}
    for a, b in (("taft", "nlft"), ("jvp", "taft"), ("taft-full", "taft"), ("nlft", "probe")):
        if a in ms and b in ms:
            ratios[f"{a}/{b}"] = ms[a] / ms[b]
    return {"ms": ms, "peak_mib": mib, "ratios": ratios, **({"errors": errors} if errors else {})}


def section_steps(ctx: Context, deadline: Deadline, record: dict) -> str:
    s = ctx.sizes
    record["rows"], record["skipped"] = [], []
    record["memory"] = "peak MiB allocated during a step" if is_cuda(ctx.device) else "MiB saved for backward"
    grid = [(px, k, b, a, False) for px in s.step_px for k in s.step_ks for b in s.step_batches
            for a in ("none", "bf16")]
    grid += [(px, k, b, a, True) for px, k, b, a in s.compile_rows]
    last_compile = 0.0
    backbone = step_cost.random_vit(s.vit, seed=0)  # random weights: the cost does not depend on them
    for px, k, batch, autocast, compiled in grid:
        key = {"px": px, "tokens": (px // s.vit.patch_size) ** 2 + 1, "k": k, "batch": batch, "autocast": autocast,
               "compiled": compiled}
        if not deadline.enough(1.5 * last_compile if compiled else 1.0):
            record["skipped"].append(key)
            continue
        t0 = time.perf_counter()
        if compiled:
            torch._dynamo.reset()
        try:
            row = time_row(ctx, build_steps(ctx, backbone, px, k, batch, compiled), autocast)
        except Exception as e:
            row = {"errors": {"row": f"{type(e).__name__}: {e}"[:300]}}
        row["seconds"] = time.perf_counter() - t0
        if compiled:
            last_compile = row["seconds"]
        record["rows"].append({**key, **row})
        empty_cache(ctx)
    failed = any("errors" in r for r in record["rows"])
    return "failed" if failed else ("partial" if record["skipped"] else "ok")


def empty_cache(ctx: Context) -> None:
    if is_cuda(ctx.device):
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ features
def section_features(ctx: Context, deadline: Deadline, record: dict) -> str:
    """The trunk-feature build (train_throughput.build_speed: a fresh `cache_features`) and the trunk's forward
    alone on device-resident random batches, float32 and bf16, k = 1, at each px."""
    s = ctx.sizes
    images = packed_images(ctx)
    packed = not ctx.tiny and ctx.assets is not None and (ctx.assets / BACKBONE_FILE).is_file()
    record["backbone"] = "dinov2-vits14 (assets, float16 weights in float32)" if packed else "random ViT"
    record["images"] = "CIFAR-10 (assets)" if images else "synthetic"
    record["rows"] = []
    for px in s.step_px:
        if not deadline.enough(5.0):
            record.setdefault("skipped", []).append(px)
            continue
        backbone = real_backbone(ctx, px) or random_backbone(ctx, px)
        backbone.model.to(ctx.device)
        ds = (images["train"].per_class(max(1, s.build_n // ctx.classes)) if images
              else synthetic(ctx, s.build_n, 32, seed=0))
        built = ImageDataset(ds.records, ds.class_names, backbone.preprocess, source_digest=f"build-{px}-{len(ds)}")
        row = {"px": px, "images": len(built), "build_images_per_s": {}, "trunk_images_per_s": {}}
        for autocast in ("none", "bf16"):
            root = tempfile.mkdtemp(dir=ctx.scratch, prefix=f"build-{px}-{autocast}-")
            row["build_images_per_s"][autocast] = train_throughput.build_speed(
                built, backbone, 1, ctx.device, autocast, 256 if not ctx.tiny else 4, root)
        trunk = Trunk(backbone.model, backbone.model.cfg.depth - 1).eval().to(ctx.device)
        x = torch.randn(s.trunk_batch, 3, px, px, device=ctx.device)
        with torch.no_grad():
            ms = median_ms({a: under_autocast(lambda: trunk(x), a, ctx.device) for a in ("none", "bf16")},
                           ctx.device, s.repeats, s.warmup)
        row["trunk_images_per_s"] = {a: s.trunk_batch / (t / 1e3) for a, t in ms.items()}
        record["rows"].append(row)
        empty_cache(ctx)
    return "partial" if record.get("skipped") else "ok"


# ------------------------------------------------------------------------------------------------ dp
def section_dp(ctx: Context, deadline: Deadline, record: dict) -> str:
    """dp_step's plain / ghost / vmap steps (an AdamW step each) at ViT-S width, k = 1."""
    s = ctx.sizes
    record["rows"] = []
    for method in ("taft", "nlft"):
        for tokens in s.dp_tokens:
            if not deadline.enough(3.0):
                record.setdefault("skipped", []).append({"method": method, "tokens": tokens})
                continue
            steps = dp_step.make_steps(1, s.dp_batch, tokens, ctx.classes, s.dp_chunk, str(ctx.device),
                                       method=method)
            ms = median_ms(steps, ctx.device, s.repeats, s.warmup)
            record["rows"].append({"method": method, "tokens": tokens, "batch": s.dp_batch, "chunk": s.dp_chunk,
                                   "ms": ms, "ghost/plain": ms["ghost"] / ms["plain"],
                                   "vmap/plain": ms["vmap"] / ms["plain"]})
            del steps
            empty_cache(ctx)
    return "partial" if record.get("skipped") else "ok"


# ------------------------------------------------------------------------------------------------ accuracy
def section_accuracy(ctx: Context, deadline: Deadline, record: dict) -> str:
    """Probe / NLFT-1 / TAFT-1 test top-1 at each px with the library's default recipe (TrainConfig() resolved
    per method; seed 0), on the packed CIFAR-10 images (tiny: synthetic ones and a random tiny ViT)."""
    s = ctx.sizes
    data = packed_images(ctx)
    if data is None and not ctx.tiny:
        record["error"] = f"no {DATA_FILE} under --assets {ctx.assets}: run benchmarks/gpu_assets.py first"
        return "skipped"
    if data is None:
        n = s.synthetic_per_class * ctx.classes
        both = synthetic(ctx, 2 * n, 32, seed=0)  # one draw of class colours; the first half trains
        data = {split: ImageDataset(records, both.class_names, source_digest=f"synthetic-{split}-{n}")
                for split, records in (("train", both.records[:n]), ("test", both.records[n:]))}
    record.update(train=len(data["train"]), test=len(data["test"]), rows=[])
    config = TrainConfig(seed=0, epochs=s.epochs, **({"batch_size": 4} if ctx.tiny else {}))
    # the cached runs at every px first (cheap), then the streamed, augmented ones at the first px (each epoch
    # runs the trunk): a short time box loses the augmentation rows before the 112-px comparison
    runs = [(px, m, "none") for px in s.accuracy_px for m in ("probe", "nlft", "taft")]
    runs += [(s.accuracy_px[0], m, "crop-flip") for m in ("nlft", "taft")]
    backbones: dict[int, Backbone] = {}
    for px, method, augment in runs:
        if not deadline.enough(10.0 if not ctx.tiny else 0.0):
            record.setdefault("skipped", []).append({"px": px, "method": method, "augment": augment})
            continue
        if px not in backbones:
            backbones[px] = real_backbone(ctx, px) or random_backbone(ctx, px)
        backbone = backbones[px]
        t0 = time.perf_counter()
        model = Classifier(backbone, data["train"].class_names, 1, method=method).to(ctx.device)
        root = ctx.scratch / "accuracy-cache"
        test_f = model.cache_features(data["test"], root=root, batch_size=256, progress=False)
        train = data["train"] if augment != "none" else model.cache_features(
            data["train"], root=root, batch_size=256, progress=False)
        result = fit(model, train, replace(config, augment=augment), progress=False,
                     compute=Compute(device=ctx.device), features="stream" if augment != "none" else "cache")
        top1 = evaluate(result.classifier, test_f).top1
        record["rows"].append({"px": px, "method": method, "augment": augment, "k": 1, "top1": top1,
                               "lr": result.config.lr,
                               "head_lr": result.config.head_lr, "epochs": result.config.epochs,
                               "train_time_s": result.metrics["train_time_s"],
                               "seconds": time.perf_counter() - t0})
        empty_cache(ctx)
    return "partial" if record.get("skipped") else "ok"


SECTION_FUNCTIONS = {"tests": section_tests, "correctness": section_correctness, "steps": section_steps,
                     "features": section_features, "dp": section_dp, "accuracy": section_accuracy}


# ------------------------------------------------------------------------------------------------ report
def environment(ctx: Context) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(ctx.device),
           "tiny": ctx.tiny, "assets": None if ctx.assets is None else str(ctx.assets), "packages": {}}
    for name in DEPENDENCIES:
        try:
            env["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["packages"][name] = None
    if is_cuda(ctx.device):
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}",
                   multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)
    manifest = None if ctx.assets is None else ctx.assets / "manifest.json"
    if manifest is not None and manifest.is_file():
        env["assets_manifest"] = json.loads(manifest.read_text())
    return env


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict) -> str:
    """The summary printed last: each section's status and its main numbers."""
    lines = [f"# GPU suite on {report['environment'].get('gpu', report['environment']['device'])}, "
             f"torch {report['environment']['torch']}"]
    lines.append("section      status    seconds")
    for name, sec in report["sections"].items():
        lines.append(f"{name:<12} {sec['status']:<9} {sec['seconds']:7.1f}")
    sections = report["sections"]
    tests = sections.get("tests", {}).get("result", {})
    if "passed" in tests:
        lines.append(f"\ntests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped" + "".join(f"\n  FAILED {n}: {m[:120]}"
                                                           for n, m in tests.get("failures", {}).items()))
    corr = sections.get("correctness", {}).get("result", {})
    if corr:
        lines.append("\ncorrectness: " + ", ".join(f"{n} {'ok' if all_ok(r) else 'FAILED'}" for n, r in corr.items()))
        for n, r in corr.get("tail_vs_jvp", {}).items():
            if isinstance(r, dict) and "float32" in r:
                lines.append(f"  tail vs jvp {n}: float64 rel {r['float64']['rel_error']:.1e}, float32 rel "
                             f"{r['float32']['rel_error']:.1e} (tangent {r['float32_tangent']['rel_error']:.1e})")
        for n, r in corr.get("resident_vs_streamed", {}).items():
            if isinstance(r, dict) and "repeatable" in r:
                lines.append(f"  feeds {n}: training {'repeats' if r['repeatable'] else 'does NOT repeat'} bit for "
                             f"bit; feeds {'identical' if r['identical'] else 'differ'} (worst rel "
                             f"{r['worst_rel']:.1e})")
    steps = sections.get("steps", {}).get("result", {})
    if steps.get("rows"):
        names = ("probe", "nlft", "taft", "jvp", "taft-full")
        lines.append(f"\nstep ms (median; {steps['memory']} in the last columns; pruned unless -full)")
        lines.append(f"{'px':>4} {'k':>2} {'batch':>5} {'cast':>4} {'comp':>4} "
                     + " ".join(f"{n:>9}" for n in names) + f" {'taft/nlft':>9} {'jvp/taft':>8} "
                     f"{'MiB nlft':>9} {'MiB taft':>9}")
        for r in steps["rows"]:
            ms, mib, ratios = r.get("ms", {}), r.get("peak_mib", {}), r.get("ratios", {})
            lines.append(f"{r['px']:>4} {r['k']:>2} {r['batch']:>5} {r['autocast']:>4} {'yes' if r['compiled'] else 'no':>4} "
                         + " ".join(f"{fmt(ms.get(n), '.2f'):>9}" for n in names)
                         + f" {fmt(ratios.get('taft/nlft'), '.2f'):>9} {fmt(ratios.get('jvp/taft'), '.2f'):>8} "
                         f"{fmt(mib.get('nlft')):>9} {fmt(mib.get('taft')):>9}"
                         + (" ERR " + ",".join(r["errors"]) if r.get("errors") else ""))
        if steps.get("skipped"):
            lines.append(f"  ({len(steps['skipped'])} rows not run: time box)")
    feats = sections.get("features", {}).get("result", {})
    for r in feats.get("rows", []):
        b, t = r["build_images_per_s"], r["trunk_images_per_s"]
        lines.append(f"\nfeatures {r['px']} px ({feats['backbone']}): build {b['none']:.0f} img/s float32, "
                     f"{b['bf16']:.0f} bf16; trunk alone {t['none']:.0f} / {t['bf16']:.0f} img/s")
    for r in sections.get("dp", {}).get("result", {}).get("rows", []):
        lines.append(f"dp {r['method']} {r['tokens']} tokens batch {r['batch']}: plain {r['ms']['plain']:.2f} ms, "
                     f"ghost {r['ghost/plain']:.2f}x, vmap {r['vmap/plain']:.2f}x")
    acc = sections.get("accuracy", {}).get("result", {})
    if acc.get("rows"):
        lines.append(f"\naccuracy ({acc['train']} train / {acc['test']} test images, default recipes, seed 0): top-1 %")
        for px in dict.fromkeys(r["px"] for r in acc["rows"]):
            rows = {r["method"] + ("" if r.get("augment", "none") == "none" else f"+{r['augment']}"): r
                    for r in acc["rows"] if r["px"] == px}
            lines.append(f"  {px:>4} px: " + "  ".join(f"{m} {100 * r['top1']:.1f} ({r['train_time_s']:.0f} s)"
                                                      for m, r in rows.items()))
    return "\n".join(lines)


def write(report: dict, out: Path) -> None:
    tmp = out / (JSON_FILE + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(out / JSON_FILE)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--out", required=True, help="folder for gpu_suite.json, table.txt, pytest.log, pytest.xml")
    ap.add_argument("--assets", help="folder written by benchmarks/gpu_assets.py")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--budget", type=float, default=1.0, help="multiplies every section's time box "
                    f"(seconds: {', '.join(f'{k} {v}' for k, v in BUDGET_S.items())})")
    ap.add_argument("--total", type=float, default=500.0, help="seconds for all sections together (default 500): "
                    "a section gets at most what is left of it")
    ap.add_argument("--tiny", action="store_true", help="toy sizes, a random tiny ViT, synthetic images")
    args = ap.parse_args(argv)
    unknown = [s for s in args.sections.split(",") if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    if is_cuda(device):
        torch.cuda.set_device(device)
    previous_cache = os.environ.get("TAFT_CACHE")
    with tempfile.TemporaryDirectory(prefix="taft-gpu-suite-") as scratch:
        os.environ["TAFT_CACHE"] = str(Path(scratch) / "taft-cache")  # no feature cache outlives the run
        try:
            report = run_sections(args, device, Path(scratch), out)
        finally:
            if previous_cache is None:
                os.environ.pop("TAFT_CACHE", None)
            else:
                os.environ["TAFT_CACHE"] = previous_cache
    summary = table(report)
    (out / TABLE_FILE).write_text(summary + "\n")
    print("\n" + summary)
    return report


def run_sections(args: argparse.Namespace, device: torch.device, scratch: Path, out: Path) -> dict:
    """Run the selected sections in order, each in its time box, writing the JSON after each."""
    ctx = Context(device=device, sizes=TINY if args.tiny else FULL, tiny=args.tiny,
                  assets=Path(args.assets) if args.assets else None, scratch=scratch, out=out)
    report = {"environment": environment(ctx), "args": vars(args), "sections": {}}
    write(report, out)
    end = time.monotonic() + args.total
    for name in args.sections.split(","):
        left = end - time.monotonic()
        budget = min(BUDGET_S[name] * args.budget, left - GRACE_S)
        record: dict = {}
        print(f"[gpu_suite] {name}: time box {budget:.0f} s", flush=True)
        t0 = time.perf_counter()
        try:
            if budget <= 0:
                raise SectionTimeout(f"not started: {left:.0f} s of --total {args.total:.0f} s were left")
            with alarm(budget + GRACE_S):  # the cooperative deadline first; the alarm if a step hangs past it
                status = SECTION_FUNCTIONS[name](ctx, Deadline(budget), record)
        except SectionTimeout as e:
            status, record["error"] = "timeout", str(e)
        except Exception as e:
            status, record["error"] = "error", "".join(traceback.format_exception_only(type(e), e)).strip()
            record["traceback"] = traceback.format_exc()[-3000:]
        synchronize_quietly(device)
        report["sections"][name] = {"status": status, "seconds": time.perf_counter() - t0, "result": record}
        write(report, out)
        print(f"[gpu_suite] {name}: {status} in {time.perf_counter() - t0:.1f} s"
              + (f" ({record['error']})" if "error" in record else ""), flush=True)
    return report


def synchronize_quietly(device: torch.device) -> None:
    try:
        synchronize(device)
        if is_cuda(device):
            torch.cuda.empty_cache()
    except Exception:  # a broken CUDA context shows in the next section's error
        pass


if __name__ == "__main__":
    main()
