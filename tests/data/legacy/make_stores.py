"""Make the legacy store fixtures with taft at commit 0f2bed0: in a checkout of it, run
    PYTHONPATH=src:tests python <this file> <out dir>
then copy <out dir>/plain and <out dir>/dp here (the .lock files removed)."""
import os, shutil, sys
from dataclasses import replace
from pathlib import Path
os.environ["TAFT_CACHE"] = "/tmp/legacy-gen/cache"
import torch
torch.set_num_threads(1)
from test_store import CONFIG, tiny_features
from taft.store import create_store, forget
from taft.privacy import DPConfig
from taft.store.plan import ShardPlan

out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
bb, cf = tiny_features()
plain = create_store(out / "plain", cf, bb, CONFIG, shards=3, executor="inline", threads=1, progress=False)
from taft.store import ModelStore
m = ModelStore(plain).manifest
forget(plain, [m["shards"][1]["ids"][0]], "drop", progress=False)
ids = sorted(cf.ids)
plan = ShardPlan("random", 0, (tuple(ids[:20]), tuple(ids[20:])))
dp = DPConfig(noise_multiplier=1.0, delta=1e-3, clip=1.0, accountant="rdp", seed=11)
create_store(out / "dp", cf, bb, replace(CONFIG, method="probe"), plan=plan, executor="inline", threads=1, dp=dp,
             progress=False)
for p in ("plain", "dp"):
    (out / p / ".lock").unlink(missing_ok=True)
