"""Cost of a DP-SGD step relative to an ordinary training step (taft, nlft or probe, k = 1 by default) at ViT-S width.

Both steps start from the tail's inputs (cached trunk features: batch × tokens × 384) and end with an AdamW step:
  plain : mean squared loss of the batch, one backward, AdamW;
  ghost : the DP-SGD step taft takes (`taft.privacy.dpsgd.noisy_gradient`): per-example gradient norms and the
          clipped sum by ghost clipping (`taft.privacy.ghost`, in chunks of --chunk examples), Gaussian noise,
          division by the batch size, AdamW;
  vmap  : the same step with the per-example gradients formed (vmap over grad, `via="vmap"`), the reference.
The DP step gets a batch of exactly --batch examples (the expected size of a Poisson batch) so both do the same
work. Times are medians of interleaved repeats (plain, dp, plain, dp, ...) after one warm-up of each.

    python benchmarks/dp_step.py                      # ViT-S width, 65 tokens (112 px), batch 32, taft k = 1
    python benchmarks/dp_step.py --method nlft --tokens 17 --batch 256 --chunk 64
    python benchmarks/dp_step.py --device cuda --repeats 20 --json dp_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from taft.backbones.base import Backbone, ImagePreprocess
from taft.backbones.vit import ViT, ViTConfig
from taft.privacy.dpsgd import noisy_gradient
from taft.model import Classifier
from taft.losses import classification_loss

VIT_S = ViTConfig(dim=384, depth=12, heads=6, mlp_hidden=1536, patch_size=14, pos_grid=37, layerscale=True)


def make_steps(k: int, batch: int, tokens: int, classes: int, chunk: int, device: str, seed: int = 0,
               method: str = "taft") -> dict[str, Callable[[], None]]:
    torch.manual_seed(seed)
    vit = ViT(VIT_S)
    for p in vit.parameters():
        if p.dim() > 1:
            nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    backbone = Backbone("random-vit-s", vit.eval().requires_grad_(False), ImagePreprocess((112, 112), 14))
    names = [str(c) for c in range(classes)]
    models = {m: Classifier(backbone, names, k, method=method).to(device) for m in ("plain", "ghost", "vmap")}
    h = torch.randn(batch, tokens, VIT_S.dim, device=device)
    x, _ = models["plain"].train_inputs(h)  # what fit trains on (a probe's pooled features), computed once like fit
    y = torch.randint(0, classes, (batch,), device=device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def plain_step(clf=models["plain"], opt=torch.optim.AdamW(models["plain"].tail.parameters(), lr=1e-4,
                                                                weight_decay=0.0)):
        opt.zero_grad(set_to_none=True)
        classification_loss(clf.train_logits(x), y).backward()
        opt.step()

    def dp_step(via: str) -> Callable[[], None]:
        clf = models[via]
        opt = torch.optim.AdamW(clf.tail.parameters(), lr=1e-4, weight_decay=0.0)

        def step() -> None:
            grads, _ = noisy_gradient(clf, x, y, clip=1.0, noise_multiplier=1.0,
                                      expected_batch_size=batch, generator=gen, chunk_size=chunk, via=via)
            for name, p in clf.tail.named_parameters():
                p.grad = grads[name]
            opt.step()
        return step

    return {"plain": plain_step, "ghost": dp_step("ghost"), "vmap": dp_step("vmap")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["taft", "nlft", "probe"], default="taft")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=65)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=32, help="examples per per-example-gradient pass")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = make_steps(args.k, args.batch, args.tokens, args.classes, args.chunk, args.device, method=args.method)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {m: [] for m in steps}
    for m, step in steps.items():  # warm-up
        step()
    sync()
    for _ in range(args.repeats):
        for m, step in steps.items():
            t0 = time.perf_counter()
            step()
            sync()
            times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(t) for m, t in times.items()}
    ratios = {"ghost/plain": med["ghost"] / med["plain"], "vmap/plain": med["vmap"] / med["plain"],
              "vmap/ghost": med["vmap"] / med["ghost"]}
    print(f"{args.method} k={args.k}, width {VIT_S.dim}, {args.tokens} tokens, batch {args.batch}, chunk {args.chunk}, "
          f"{args.device}, {args.repeats} repeats")
    for m in steps:
        print(f"  {m:>5}: median {1000 * med[m]:8.1f} ms/step")
    print("  " + "   ".join(f"{name} {r:.2f}x" for name, r in ratios.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_s": med, "ratios": ratios, "times_s": times}, f, indent=1)


if __name__ == "__main__":
    main()
