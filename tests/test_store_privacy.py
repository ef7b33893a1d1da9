"""DP stores: per-shard DP-SGD ledgers, the parallel-composed guarantee in the manifest and the composed checkpoint,
forgetting (drop recomputes, retrain composes the shard's releases sequentially), refusals, CLI.

Tiny random ViT and data of tests/test_store.py (36 examples, unequal shards of 16, 12 and 8); σ given (no
calibration) and the RDP accountant keep it fast. Everything runs in-process.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from dataclasses import replace

import pytest


from taft import TaftError
from taft.checkpoint import read_checkpoint_metadata
from taft.fileio import read_json
from taft.cli import main
from taft.privacy import MECHANISM, DPConfig, PrivacyLedger, sequential_composition
from taft.privacy.ledger import PARALLEL, SEQUENTIAL
from taft.store import ModelStore, ShardPlan
from taft.store.manifest import Manifest, load_manifest
from taft.store.layout import StoreLayout
from taft.store.report import write_report
from taft.store.create import dp_shard_seed, releases, shard_dp
from taft.train import TrainConfig
from helpers import make_classes
from test_store import CONFIG, INLINE, QUIET, create, tiny_features

pytestmark = pytest.mark.usefixtures("one_thread")

DP = DPConfig(noise_multiplier=1.0, delta=1e-3, clip=1.0, accountant="rdp", seed=11)
FAST = ["--image-size", "28", "--epochs", "1", "--quiet", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def data():
    return tiny_features()


def unequal_plan(ids) -> ShardPlan:
    ids = sorted(ids)
    return ShardPlan("random", 0, (tuple(ids[:16]), tuple(ids[16:28]), tuple(ids[28:])))


@pytest.fixture(scope="module")
def base_dp_store(data, tmp_path_factory) -> Path:
    bb, cf = data
    return create(tmp_path_factory.mktemp("dp-store") / "s", cf, bb, CONFIG, plan=unequal_plan(cf.ids), dp=DP)


@pytest.fixture
def dp_store(base_dp_store, tmp_path) -> Path:
    return Path(shutil.copytree(base_dp_store, tmp_path / "s"))


def manifest(root: Path) -> Manifest:
    return load_manifest(StoreLayout(root))


def shard_meta(root: Path, index: int) -> dict:
    return read_checkpoint_metadata(ModelStore(root).shard_path(index))


def composed_meta(root: Path) -> dict:
    return read_checkpoint_metadata(ModelStore(root).composed_path)


# ------------------------------------------------------------------------------------------------------ ledgers
def test_sequential_composition_sums_and_flattens():
    def run(eps, n=10):
        return PrivacyLedger(epsilon=eps, delta=1e-5, n=n, noise_multiplier=1.0, sample_rate=0.1, steps=5, clip=1.0,
                             accountant="rdp", libraries={"opacus": "1.6.0"}, notes=["a"])

    two = sequential_composition([run(1.0, 10), run(2.0, 8).to_dict()])
    assert two.mechanism == SEQUENTIAL and two.epsilon == 3.0 and two.delta == 2e-5 and two.n == 8
    assert len(two.components) == 2 and "2 releases" in two.summary()
    three = sequential_composition([two, run(0.5, 7)])
    assert len(three.components) == 3 and three.epsilon == 3.5 and three.delta == pytest.approx(3e-5)
    assert PrivacyLedger.from_dict(json.loads(json.dumps(three.to_dict()))) == three
    assert not sequential_composition([run(1.0), run(None)]).private
    assert releases(None) == 0 and releases(run(1.0).to_dict()) == 1 and releases(three.to_dict()) == 3


def test_dp_seeds_are_derived_per_shard_and_release():
    seeds = {dp_shard_seed(11, i, r) for i in range(4) for r in range(3)}
    assert len(seeds) == 12 and all(0 <= s < 2**62 for s in seeds)
    assert dp_shard_seed(11, 2, 1) == dp_shard_seed(11, 2, 1) != dp_shard_seed(12, 2, 1)
    assert shard_dp(DP, 1, 0).seed == dp_shard_seed(11, 1, 0)
    unseeded = DPConfig(noise_multiplier=1.0, delta=1e-3)
    assert shard_dp(unseeded, 1, 0) is unseeded and shard_dp(None, 1, 0) is None


# -------------------------------------------------------------------------------------------------------- create
def test_dp_store_records_shard_ledgers_and_their_parallel_composition(base_dp_store, capsys):
    root = base_dp_store
    m = manifest(root)
    assert m.dp == DP.to_dict()
    shards = [PrivacyLedger.from_dict(s.privacy) for s in m.shards]
    for s, led in zip(m.shards, shards):
        assert led.mechanism == MECHANISM and led.n == s.n and led.private and led.seeded
        assert led.noise_multiplier == 1.0 and led.sample_rate == pytest.approx(4 / s.n)
        assert led.steps == CONFIG.epochs * math.ceil(s.n / 4) and led.delta == DP.delta
        meta = shard_meta(root, s.index)
        assert meta["privacy"] == s.privacy
        assert set(meta["metrics"]) <= {"method", "tangent_blocks", "epochs", "steps", "lr", "n_train"}
    assert len({led.epsilon for led in shards}) == 3  # unequal shards, unequal q: the max means something
    store = PrivacyLedger.from_dict(m.privacy)
    assert store.mechanism == PARALLEL and store.epsilon == max(led.epsilon for led in shards)
    assert store.delta == DP.delta and store.n == 36 and len(store.components) == 3
    assert composed_meta(root)["privacy"] == m.privacy
    info = ModelStore(root).info()
    assert info["privacy"] == m.privacy and info["dp"] == m.dp and info["shards"][0]["privacy"]
    assert ModelStore(root).verify().ok

    assert main(["info", str(ModelStore(root).composed_path)]) == 0
    assert f"privacy      (ε={store.epsilon:.4g}, δ=0.001)-DP: {PARALLEL} (3 shards)" in capsys.readouterr().out
    assert main(["store", "info", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"privacy      (ε={store.epsilon:.4g}" in out and f"ε={shards[2].epsilon:.4g}" in out


def test_report_has_a_privacy_section(base_dp_store, tmp_path):
    text = write_report(base_dp_store, tmp_path / "report").read_text()
    assert "## Privacy" in text and "parallel composition" in text and "| 2 | trained |" in text


def test_a_store_without_dp_has_no_privacy_entries(data, tmp_path):
    bb, cf = data
    ids = sorted(cf.ids)
    plan = ShardPlan("random", 0, (tuple(ids[:18]), tuple(ids[18:])))
    root = create(tmp_path / "s", cf, bb, TrainConfig(lr=1e-2, epochs=1, batch_size=8), plan=plan)
    m = manifest(root)
    on_disk = read_json(StoreLayout(root).manifest, "manifest")
    assert "dp" not in on_disk and "privacy" not in on_disk and all("privacy" not in s for s in on_disk["shards"])
    assert "privacy" not in composed_meta(root) and "privacy" not in ModelStore(root).info()
    assert "final_train_loss" in shard_meta(root, 0)["metrics"]


# ------------------------------------------------------------------------------------------------------ forget
def test_drop_recomputes_the_guarantee_over_the_remaining_shards(dp_store):
    m = manifest(dp_store)
    eps = [s.privacy["epsilon"] for s in m.shards]
    worst = eps.index(max(eps))
    ModelStore(dp_store).forget([m.shards[worst].ids[0]], "drop", execution=QUIET)
    m2 = manifest(dp_store)
    rest = [i for i in range(3) if i != worst]
    assert m2.privacy["epsilon"] == max(eps[i] for i in rest) < m.privacy["epsilon"]
    assert [c["n"] for c in m2.privacy["components"]] == [m.shards[i].n for i in rest]
    assert composed_meta(dp_store)["privacy"] == m2.privacy
    assert ModelStore(dp_store).verify().ok


def test_retrain_composes_the_shard_releases_sequentially(dp_store, data):
    bb, cf = data
    m = manifest(dp_store)
    victim = m.shards[1].ids[0]
    ModelStore(dp_store).forget([victim], "retrain", features=cf, backbone=bb, execution=INLINE)
    m2 = manifest(dp_store)
    old, new = m.shards[1].privacy, m2.shards[1].privacy
    led = PrivacyLedger.from_dict(new)
    assert led.mechanism == SEQUENTIAL and len(led.components) == 2 and led.components[0] == old
    run = PrivacyLedger.from_dict(led.components[1])
    assert run.mechanism == MECHANISM and run.n == 11 and led.n == 11 and run.seeded
    assert led.epsilon == pytest.approx(old["epsilon"] + run.epsilon) and led.delta == pytest.approx(2 * DP.delta)
    for i in (0, 2):  # untouched shards keep their ledger and file
        assert m2.shards[i].privacy == m.shards[i].privacy
        assert m2.shards[i].sha256 == m.shards[i].sha256
    assert shard_meta(dp_store, 1)["privacy"] == new
    assert m2.privacy["epsilon"] == max(s.privacy["epsilon"] for s in m2.shards)
    assert m2.privacy["delta"] == pytest.approx(2 * DP.delta)
    assert composed_meta(dp_store)["privacy"] == m2.privacy
    assert ModelStore(dp_store).verify().ok


# ------------------------------------------------------------------------------------------------------ refusals
def test_dp_refuses_size_weighting_and_too_small_shards(data, tmp_path, dp_store):
    bb, cf = data
    with pytest.raises(TaftError, match="size weighting is not allowed with DP"):
        create(tmp_path / "a", cf, bb, CONFIG, shards=3, dp=DP, weighting="size")
    with pytest.raises(TaftError, match=r"not below 1/n = 0.0625 for shard 0 of n=16"):
        create(tmp_path / "b", cf, bb, CONFIG, plan=unequal_plan(cf.ids),
               dp=DPConfig(noise_multiplier=1.0, delta=0.1))
    with pytest.raises(TaftError, match="too few for DP-SGD"):
        create(tmp_path / "c", cf, bb, CONFIG, plan=unequal_plan(cf.ids),
               dp=DPConfig(noise_multiplier=1.0, delta=1e-3, expected_batch_size=10))
    assert not any((tmp_path / d).exists() for d in "abc")  # refused before anything was written
    with pytest.raises(TaftError, match="size weighting is not allowed with DP"):
        ModelStore(dp_store).compose(weighting="size")
    with pytest.raises(TaftError, match="size weighting is not allowed with DP"):
        ModelStore(dp_store).compose(weighting="size", out=tmp_path / "x.safetensors")


def test_export_of_a_dp_subset_carries_its_guarantee(dp_store, tmp_path):
    out = ModelStore(dp_store).compose(shards=[0, 1], out=tmp_path / "sub.safetensors")
    led = read_checkpoint_metadata(out)["privacy"]
    shards = manifest(dp_store).shards
    assert led["epsilon"] == max(shards[i].privacy["epsilon"] for i in (0, 1)) and len(led["components"]) == 2


# --------------------------------------------------------------------------------------------------------- CLI
def test_cli_shards_train_with_dp(tmp_path, capsys):
    data = make_classes(tmp_path / "data", classes=("ant", "bee", "cow"), per_class=4)
    store = tmp_path / "store"
    dp_args = ["--dp", "--noise-multiplier", "1.0", "--delta", "1e-2", "--accountant", "rdp",
               "--expected-batch-size", "3"]
    assert main(["shards", "train", "--min-steps", "0", "--data", str(data), "--shards", "2", "--executor", "inline", "--store",
                 str(tmp_path / "size"), "--weighting", "size", *FAST, *dp_args]) == 2
    assert "size weighting is not allowed with DP" in capsys.readouterr().err
    assert main(["shards", "train", "--min-steps", "0", "--data", str(data), "--shards", "2", "--executor", "inline", "--store",
                 str(store), *FAST, *dp_args]) == 0
    assert "privacy: (ε=" in capsys.readouterr().out
    m = manifest(store)
    assert m.dp["seed"] is None and all(not s.privacy["seeded"] for s in m.shards)  # fresh secret seeds
    assert [s.privacy["n"] for s in m.shards] == [6, 6] and m.privacy["n"] == 12
    assert main(["store", "info", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"privacy      (ε={m.privacy['epsilon']:.4g}, δ=0.01)-DP: {PARALLEL} (2 shards)" in out
    assert main(["store", "info", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["privacy"] == m.privacy
    assert main(["info", str(store / "composed.safetensors")]) == 0
    assert "privacy      (ε=" in capsys.readouterr().out
    ids = tmp_path / "ids.txt"
    ids.write_text(m.shards[0].ids[0] + "\n")
    assert main(["forget", str(store), "--ids", str(ids), "--mode", "drop", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "dropped shard [0]" in out and f"privacy: (ε={m.shards[1].privacy['epsilon']:.4g}" in out


def test_a_dp_store_without_a_rate_takes_the_default_of_its_smallest_shard(data, tmp_path):
    """The default DP rate follows the expected batch (`dp_lr`); a store records one rate for every shard: its
    smallest shard's, so that no shard trains at a rate too large for its batch."""
    from taft.privacy.config import expected_batch_size
    from taft.train.config import DP_FULL_LR_BATCH, DP_LR_EXPONENT

    bb, cf = data
    plan = unequal_plan(cf.ids)  # shards of 16, 12 and the rest
    root = create(tmp_path / "s", cf, bb, replace(CONFIG, lr=None), plan=plan, dp=DP)
    smallest = min(len(s) for s in plan.shards)
    batch = expected_batch_size(DP, smallest, CONFIG.batch_size)
    want = 1.0 * min(1.0, batch / DP_FULL_LR_BATCH) ** DP_LR_EXPONENT
    assert manifest(root).config.lr == pytest.approx(want, rel=1e-12) and want < 0.1
    recorded = [read_checkpoint_metadata(ModelStore(root).shard_path(s.index))["train_config"]["lr"]
                for s in manifest(root).shards]
    assert recorded == [manifest(root).config.lr] * len(plan.shards)
