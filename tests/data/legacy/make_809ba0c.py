"""Writes tests/data/legacy/*-809ba0c.safetensors with taft as of 809ba0c (the last code before the model-centric
API): a taft and an nlft run (k = 1, mean pooling, run seed 3), with their logits on fixed features."""
import sys
from pathlib import Path

import torch

from helpers import TINY_VIT
from reference import random_backbone
from taft.train import TrainConfig, fit

out = Path(sys.argv[1])
bb = random_backbone(TINY_VIT, 12, seed=0, dtype=torch.float32)
feats = torch.randn(8, 10, 32, generator=torch.Generator().manual_seed(0))
labels, ids = torch.arange(8) % 2, [f"x{i}" for i in range(8)]
for method in ("taft", "nlft"):
    cfg = TrainConfig(method=method, tangent_blocks=1, pooling="mean", seed=3, epochs=1, batch_size=4, lr=1e-2)
    r = fit(cfg, bb, (feats, labels, ids), class_names=["a", "b"], run_dir=out / method, progress=False)
    (out / method / "checkpoint.safetensors").rename(out / f"{method}-809ba0c.safetensors")
    torch.save({"logits": r.classifier.logits(feats).detach(), "fingerprint": r.classifier.fingerprint},
               out / f"{method}-809ba0c.expected.pt")
