"""Training-step cost of the tangent tail against non-linear fine-tuning and generic torch.func.jvp linearization.

One training step = forward + backward with respect to the trainable parameters, given the trunk's features,
squared loss on scaled one-hot targets. Methods, measured side by side on the same inputs:
  (a) nlft : the same k blocks + norm + head trained non-linearly, fused attention (SDPA);
  (b) taft : our tangent tail (one forward pass carrying primal and tangent; gradient by backprop at w0);
  (c) jvp  : generic linearization, torch.func.jvp of the plain tail (written-out softmax attention) + autograd.
Times are medians of interleaved repeats (a, b, c, a, b, c, ...). Memory: on a GPU, the peak allocated during a
step (CUDA allocator statistics); on the CPU, which keeps no such statistics, the bytes autograd saves for backward.

    python benchmarks/step_cost.py                 # ViT-S width, 65 tokens (112 px), batch 32, k = 1, 2, 4
    python benchmarks/step_cost.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn
from torch.func import functional_call, jvp

from taft.backbones.base import Backbone, ImagePreprocess
from taft.backbones.vit import ViT, ViTConfig
from taft.model import TangentModel
from taft.train import PlainTail

VIT_S = ViTConfig(dim=384, depth=12, heads=6, mlp_hidden=1536, patch_size=14, pos_grid=37, layerscale=True)
METHODS = ("nlft", "taft", "jvp")


def make_step(method: str, k: int, batch: int, tokens: int, classes: int, device: str, seed: int = 0):
    """A closure running one training step of `method` (all tensors already on `device`)."""
    torch.manual_seed(seed)
    vit = ViT(VIT_S)
    for name, p in vit.named_parameters():
        if p.dim() > 1:
            nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    backbone = Backbone("random-vit-s", vit.eval().requires_grad_(False), ImagePreprocess((112, 112), 14))
    model = TangentModel(backbone, classes, tangent_blocks=k, seed=seed).to(device)
    h = torch.randn(batch, tokens, VIT_S.dim, device=device)
    target = 15.0 * nn.functional.one_hot(torch.randint(0, classes, (batch,)), classes).float().to(device)

    if method == "taft":
        params = list(model.parameters())

        def step():
            for p in params:
                p.grad = None
            ((model.tail(h) - target) ** 2).mean().backward()
        return step

    plain = model.materialize()
    tail = PlainTail(plain.vit, k, plain.head, "cls").to(device)  # CLS pooling, norm on token 0 as in the tail
    for block in tail.blocks.values():
        block.attn.impl = "sdpa" if method == "nlft" else "manual"
    if method == "nlft":
        params = list(tail.parameters())

        def step():
            for p in params:
                p.grad = None
            ((tail(h) - target) ** 2).mean().backward()
        return step

    base = {n: p.detach() for n, p in tail.named_parameters()}
    delta = {n: torch.zeros_like(p, requires_grad=True) for n, p in base.items()}

    def step():
        for p in delta.values():
            p.grad = None
        f0, jd = jvp(lambda w: functional_call(tail, w, (h,)), (base,), (delta,))
        ((f0 + jd - target) ** 2).mean().backward()
    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_all(k: int, args) -> dict[str, float]:
    steps = {m: make_step(m, k, args.batch, args.tokens, args.classes, args.device) for m in METHODS}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for m, step in steps.items():
            sync(args.device)
            t0 = time.perf_counter()
            step()
            sync(args.device)
            times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


def saved_bytes(step) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass during one step (activations, plus
    any weights the backward needs): the dominant part of a training step's peak memory."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values())


def peak_memory(method: str, k: int, args) -> float:
    """CUDA: peak bytes allocated during one step beyond what was allocated before it. CPU (no allocator
    statistics): bytes saved for backward, see `saved_bytes`."""
    step = make_step(method, k, args.batch, args.tokens, args.classes, args.device)
    step()  # gradients allocated once, so only the step's own memory is counted
    if not args.device.startswith("cuda"):
        return saved_bytes(step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=65, help="65 = CLS + 8×8 patches (112 px at patch 14)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({args.threads} threads)"
    print(f"# step cost: ViT-S width, {args.tokens} tokens, batch {args.batch}, device {device_name}, "
          f"torch {torch.__version__}, median of {args.repeats} interleaved repeats")
    mem_kind = "peak MiB" if args.device.startswith("cuda") else "saved MiB"
    print(f"{'k':>2} {'nlft ms':>9} {'taft ms':>9} {'jvp ms':>9} {'b/a':>6} {'c/b':>6}   {mem_kind}: "
          f"{'nlft':>7} {'taft':>7} {'jvp':>7}")
    rows = []
    for k in args.ks:
        t = time_all(k, args)
        mem = {m: peak_memory(m, k, args) / 2**20 for m in METHODS}
        row = {"k": k, **{f"{m}_ms": 1e3 * t[m] for m in METHODS}, **{f"{m}_mib": mem[m] for m in METHODS},
               "taft_over_nlft": t["taft"] / t["nlft"], "jvp_over_taft": t["jvp"] / t["taft"]}
        rows.append(row)
        print(f"{k:>2} {row['nlft_ms']:9.1f} {row['taft_ms']:9.1f} {row['jvp_ms']:9.1f} "
              f"{row['taft_over_nlft']:6.2f} {row['jvp_over_taft']:6.2f} "
              f"{'':>{len(mem_kind) + 5}}{mem['nlft']:7.1f} {mem['taft']:7.1f} {mem['jvp']:7.1f}", flush=True)
    print("targets: b/a <= 1.75 (GEMM floor 5/3), c/b >= 1.2")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
