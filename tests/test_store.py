"""The model store: shard plans, exact composition, forgetting (drop / retrain), verify and repair, bad input.

Tiny random ViT (tests/reference.py) on 36 synthetic 12 px images of 4 classes; everything runs in-process.
The helpers at the top are shared by test_store_crash.py, test_store_privacy.py, test_parallel.py, test_ray.py and
test_legacy_stores.py.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import CLASSES, TINY_VIT
from reference import random_backbone
from taft import Classifier, FingerprintMismatchError, TaftError
from taft.backbones.base import Backbone
from taft.checkpoint import read_checkpoint, read_checkpoint_metadata
from taft.data import ImageDataset, ImageRecord
from taft.data.images import ArrayImage
from taft.data.trunk_features import cache_features
from taft.model import load_checkpoint
from taft.store import Execution, ModelStore, ShardPlan, compose_checkpoints, make_plan, read_ids
from taft.store.delta_sum import composition_weights
from taft.store.layout import StoreLayout
from taft.store.manifest import load_manifest
from taft.store.plan import shard_seed
from taft.train import TrainConfig

CONFIG = TrainConfig(lr=1e-2, epochs=2, batch_size=4)
K = 3
INLINE = Execution("inline", progress=False)
QUIET = Execution(progress=False)


def tiny_backbone(dtype: torch.dtype = torch.float32):
    return random_backbone(TINY_VIT, 12, seed=0, dtype=dtype)


def tiny_images(n_per_class: int = 9) -> ImageDataset:
    """12 px RGB images whose colour depends on the class, ids 'img/<i>'."""
    rng = np.random.default_rng(0)
    colours = np.array([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30]])
    labels = np.repeat(np.arange(4), n_per_class)
    arr = np.clip(colours[labels][:, None, None, :] + rng.integers(-40, 40, (len(labels), 12, 12, 3)), 0, 255)
    records = [ImageRecord(f"img/{i:03d}", int(y), ArrayImage(arr.astype(np.uint8), i)) for i, y in enumerate(labels)]
    return ImageDataset(records, CLASSES, tiny_backbone().preprocess, source_digest="store-test-v1")


def tiny_model(bb: Backbone, **spec) -> Classifier:
    """The stores' model: k = 1 on `bb` for the 4 classes (`spec`: method, head_seed, head_init)."""
    return Classifier(bb, CLASSES, 1, **spec)


def create(root: Path, train, bb: Backbone, config: TrainConfig = CONFIG, *, spec: dict | None = None,
           min_steps: int = 0, execution: Execution = INLINE, **kw) -> Path:
    """`ModelStore.create` of `tiny_model(bb, **spec)` on `train` (inline, no step minimum unless given); the
    store's root."""
    return ModelStore.create(root, train, tiny_model(bb, **(spec or {})), config, min_steps=min_steps,
                             execution=execution, **kw).root


def tiny_features(dtype: torch.dtype = torch.float32):
    """(backbone in `dtype`, its trunk features in the session's feature cache). The cache holds float32; a
    float32 copy of the trunk computes them (same fingerprint: fingerprints hash values as float32)."""
    bb = tiny_backbone(dtype)
    bb32 = Backbone(bb.name, copy.deepcopy(bb.model).float(), bb.preprocess)
    return bb, cache_features(tiny_images(), bb32, 1, progress=False)


def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def composed_delta(root: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(ModelStore(root).composed_path).tensors


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def data():
    return tiny_features()


@pytest.fixture(scope="module")
def base_store(data, tmp_path_factory) -> Path:
    bb, cf = data
    return create(tmp_path_factory.mktemp("store") / "s", cf, bb, CONFIG, shards=K)


@pytest.fixture
def store(base_store, tmp_path) -> Path:
    """A private copy of the module's store."""
    return Path(shutil.copytree(base_store, tmp_path / "s"))


# ------------------------------------------------------------------------------------------------------- plans
def test_random_plan_is_balanced_stratified_deterministic_and_order_free():
    ids = [f"x{i}" for i in range(40)]
    labels = [i % 4 for i in range(40)]
    plan = make_plan(ids, labels, 3, seed=5)
    assert sorted(plan.ids) == sorted(ids) and plan.num_shards == 3
    sizes = [len(s) for s in plan.shards]
    assert max(sizes) - min(sizes) <= 1
    y = dict(zip(ids, labels))
    for s in plan.shards:
        per_class = [sum(y[i] == c for i in s) for c in range(4)]
        assert min(per_class) >= 3 and max(per_class) <= 4  # 10 per class over 3 shards
        assert list(s) == sorted(s)
    order = np.random.default_rng(0).permutation(40)
    assert make_plan([ids[i] for i in order], [labels[i] for i in order], 3, seed=5) == plan
    assert make_plan(ids, labels, 3, seed=6) != plan


def test_class_plan_puts_whole_classes_in_shards_and_bad_plans_fail():
    ids = [f"x{i}" for i in range(20)]
    labels = [i % 5 for i in range(20)]
    plan = make_plan(ids, labels, 2, seed=0, kind="class")
    y = dict(zip(ids, labels))
    classes = [{y[i] for i in s} for s in plan.shards]
    assert not classes[0] & classes[1] and classes[0] | classes[1] == set(range(5))
    with pytest.raises(TaftError, match="5 classes into 6"):
        make_plan(ids, labels, 6, kind="class")
    with pytest.raises(TaftError, match="20 examples into 21"):
        make_plan(ids, labels, 21)
    with pytest.raises(TaftError, match="duplicate"):
        make_plan(["a", "a"], [0, 1], 1)
    with pytest.raises(TaftError, match="kind"):
        make_plan(ids, labels, 2, kind="hash")


def test_plan_without_keeps_every_other_id_in_its_shard_and_round_trips():
    plan = make_plan([f"x{i}" for i in range(30)], [i % 3 for i in range(30)], 4, seed=1)
    gone = [plan.shards[0][0], plan.shards[2][1]]
    smaller = plan.without(gone)
    assert all(set(a) - set(gone) == set(b) for a, b in zip(plan.shards, smaller.shards))
    assert ShardPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert len({shard_seed(0, i) for i in range(100)}) == 100 and shard_seed(0, 3) == shard_seed(0, 3)


def test_composition_weights():
    assert composition_weights([3, 1], "uniform") == [0.5, 0.5]
    assert composition_weights([3, 1], "size") == [0.75, 0.25]
    with pytest.raises(TaftError, match="weighting"):
        composition_weights([1], "median")


# ------------------------------------------------------------------------------------------------- composition
@pytest.mark.parametrize("method", ["taft", "probe"])
def test_composed_logits_are_the_weighted_mean_of_the_shard_logits(tmp_path, method):
    """Float64 end to end: f_lin is linear in Δw (a probe's logits in its head), so Σ α_i Δw_i gives
    Σ α_i logits_i up to rounding (~1e-15 relative; 1e-10 leaves room for accumulating a few thousand terms)."""
    bb, cf = tiny_features(torch.float64)
    root = create(tmp_path / "s64", cf, bb, CONFIG, spec={"method": method}, shards=K)
    store = ModelStore(root)
    feats = torch.from_numpy(np.asarray(cf.features, dtype=np.float64))
    with torch.no_grad():
        logits = [store.load_shard(i, bb).classifier.logits(feats) for i in range(K)]
        sizes = [s.n for s in store.manifest.shards]
        for weighting, shards in (("uniform", None), ("size", None), ("uniform", [0, 2]), ("size", [1, 2])):
            out = ModelStore(root).compose(weighting, shards, out=tmp_path / f"{weighting}.safetensors")
            clf = load_checkpoint(out, bb).classifier
            assert clf.dtype == torch.float64
            used = shards or list(range(K))
            alphas = composition_weights([sizes[i] for i in used], weighting)
            expected = sum(a * logits[i] for a, i in zip(alphas, used))
            torch.testing.assert_close(clf.logits(feats), expected, rtol=1e-10, atol=1e-10)
            assert not torch.allclose(expected, logits[used[0]], atol=1e-3)  # the shards really differ


def test_store_files_and_the_composed_model_is_an_ordinary_checkpoint(store, data):
    bb, cf = data
    layout = StoreLayout(store)
    for f in (layout.manifest, layout.composed, layout.forgotten, layout.audit):
        assert f.is_file(), f
    assert not layout.pending.exists() and not layout.temp_files()
    m = load_manifest(layout)
    for key in ("format_version", "backbone", "backbone_fingerprint", "fingerprint", "tangent_blocks",
                "class_names", "preprocess", "train_config", "plan", "shards", "forgotten"):
        assert key in m.to_dict()
    assert [s.seed for s in m.shards] == [shard_seed(CONFIG.seed, i) for i in range(K)]
    for s in m.shards:
        path = layout.path(s.file)
        assert path.name.startswith(f"shard-{s.index:03d}-") and s.sha256.startswith(path.name[10:26])
        meta = read_checkpoint_metadata(path)
        assert meta["train_config"]["head_seed"] == tiny_model(bb).spec.head_seed and meta["data"]["ids"] == s.ids
    clf, meta = load_checkpoint(layout.composed, bb)
    assert meta["method"] == "taft" and meta["fingerprint"] == m.model.fingerprint
    assert sorted(meta["data"]["ids"]) == sorted(cf.ids) and meta["data"]["count"] == len(cf.ids)
    assert meta["composition"]["alphas"] == [1 / K] * K
    assert json.loads(layout.forgotten.read_text()) == []
    assert [e["op"] for e in ModelStore(store).audit()] == ["create"]
    info = ModelStore(store).info()
    assert info["plan"]["k"] == K and info["composition"]["members"] == [0, 1, 2] and info["pending"] is None


def test_compose_refuses_mixed_fingerprints_and_unusable_shards(store, data, tmp_path):
    bb, cf = data
    other = create(tmp_path / "other", cf, bb, CONFIG, spec={"head_seed": 1}, shards=K)
    a, b = ModelStore(store).shard_path(0), ModelStore(other).shard_path(1)
    with pytest.raises(FingerprintMismatchError, match="different base weights") as e:
        compose_checkpoints([a, b], tmp_path / "mixed.safetensors")
    m1, m2 = load_manifest(StoreLayout(store)), load_manifest(StoreLayout(other))
    assert m1.model.fingerprint[:16] in str(e.value) and m2.model.fingerprint[:16] in str(e.value)
    assert not (tmp_path / "mixed.safetensors").exists()
    ok = compose_checkpoints([a, ModelStore(store).shard_path(1)], tmp_path / "two.safetensors", weighting="size")
    assert load_checkpoint(ok, bb).metadata["data"]["count"] == 24
    with pytest.raises(TaftError, match="do not exist"):
        ModelStore(store).compose(shards=[0, 7])
    with pytest.raises(TaftError, match="inside the store"):
        ModelStore(store).compose(out=store / "composed.safetensors")
    ModelStore(store).forget([load_manifest(StoreLayout(store)).shards[1].ids[0]], "drop", execution=QUIET)
    with pytest.raises(TaftError, match=r"shards 1 \(dropped\) hold no trained model"):
        ModelStore(store).compose(shards=[0, 1])


def test_compose_subset_is_committed_and_kept_through_forgets(store):
    before = ModelStore(store).manifest.generation
    ModelStore(store).compose(weighting="size", shards=[0, 2])
    m = ModelStore(store).manifest
    assert m.generation == before + 1 and m.composed.shards == [0, 2]
    assert read_checkpoint_metadata(ModelStore(store).composed_path)["composition"]["weighting"] == "size"
    ModelStore(store).forget([m.shards[2].ids[0]], "drop", execution=QUIET)
    m = ModelStore(store).manifest
    assert m.composed.shards == [0] and m.composition.subset == [0, 2]
    assert ModelStore(store).verify().ok


# ---------------------------------------------------------------------------------------------------- forgetting
def test_forget_retrain_equals_a_store_built_from_scratch_without_the_ids(store, data, tmp_path):
    bb, cf = data
    m = load_manifest(StoreLayout(store))
    gone = [m.shards[0].ids[0], m.shards[0].ids[3], m.shards[2].ids[5]]
    old = {i: read_checkpoint(ModelStore(store).shard_path(i)).tensors for i in range(K)}
    result = ModelStore(store).forget(gone, "retrain", backbone=bb, execution=INLINE)
    assert result.forgotten == sorted(gone) and result.shards == [0, 2] and not result.noop
    plan = m.plan.without(gone)
    scratch = create(tmp_path / "scratch", cf.select([i for i in cf.ids if i not in gone]), bb, CONFIG,
                     plan=plan)
    assert same_tensors(composed_delta(store), composed_delta(scratch))  # bit-identical
    for i in range(K):
        mine = read_checkpoint(ModelStore(store).shard_path(i)).tensors
        assert same_tensors(mine, read_checkpoint(ModelStore(scratch).shard_path(i)).tensors)
        assert same_tensors(mine, old[i]) == (i == 1)  # only the shards holding the ids were retrained
    m2 = load_manifest(StoreLayout(store))
    assert m2.forgotten == sorted(gone) and all(not set(gone) & set(s.ids) for s in m2.shards)
    assert not set(gone) & set(read_checkpoint_metadata(ModelStore(store).composed_path)["data"]["ids"])
    assert json.loads(StoreLayout(store).forgotten.read_text()) == sorted(gone)
    entry = ModelStore(store).audit()[-1]
    assert entry["op"] == "forget" and entry["ids"] == sorted(gone) and entry["shards"] == [0, 2]
    assert entry["composed_sha256"] == m2.composed.sha256
    assert len(StoreLayout(store).shard_files()) == K  # the old files of shards 0 and 2 were removed
    assert ModelStore(store).verify().ok


def test_forget_drop_removes_the_shards_and_later_training_excludes_forgotten_ids(store, data):
    bb, _ = data
    m = load_manifest(StoreLayout(store))
    dropped_file = StoreLayout(store).path(m.shards[1].file)
    gone = [m.shards[1].ids[2]]
    r = ModelStore(store).forget(gone, "drop", execution=QUIET)
    assert r.shards == [1] and r.mode == "drop"
    m = load_manifest(StoreLayout(store))
    assert m.shards[1].status == "dropped" and m.shards[1].file is None
    assert not dropped_file.exists()
    assert m.composed.shards == [0, 2]
    assert sorted(read_checkpoint_metadata(ModelStore(store).composed_path)["data"]["ids"]) == \
        sorted(m.shards[0].ids + m.shards[2].ids)
    # retraining another shard later: the forgotten id is not in any training data
    r = ModelStore(store).forget([m.shards[0].ids[0]], "retrain", backbone=bb, execution=INLINE)
    m = load_manifest(StoreLayout(store))
    assert len(m.forgotten) == 2 and r.shards == [0]
    for s in m.shards:
        if s.file:
            ids = read_checkpoint(StoreLayout(store).path(s.file)).ids
            assert not set(ids) & set(m.forgotten)
    # forgetting every id of a shard in retrain mode leaves it empty; dropping the rest leaves no composed model
    r = ModelStore(store).forget(m.shards[2].ids, "retrain", backbone=bb, execution=INLINE)
    m = load_manifest(StoreLayout(store))
    assert m.shards[2].status == "empty" and m.composed.shards == [0]
    ModelStore(store).forget(m.shards[0].ids[:1], "drop", execution=QUIET)
    m = load_manifest(StoreLayout(store))
    assert m.composed is None and not StoreLayout(store).composed.exists()
    with pytest.raises(TaftError, match="no composed model"):
        ModelStore(store).load_composed(bb)
    assert ModelStore(store).verify().ok


def test_unknown_ids_change_nothing(store):
    before = file_hashes(store)
    with pytest.raises(TaftError, match=r"2 ids are not in the store, e\.g\. \['nope-1', 'nope-2'\]"):
        ModelStore(store).forget(["nope-2", "img/000", "nope-1"], "retrain", execution=QUIET)
    many = [f"zz{i:02d}" for i in range(15)]
    with pytest.raises(TaftError, match="15 ids") as e:
        ModelStore(store).forget(many, "drop", execution=QUIET)
    assert "zz09" in str(e.value) and "zz10" not in str(e.value)  # up to 10 listed
    with pytest.raises(TaftError, match="mode"):
        ModelStore(store).forget(["img/000"], "erase", execution=QUIET)
    with pytest.raises(TaftError, match="no ids"):
        ModelStore(store).forget([], "drop", execution=QUIET)
    assert file_hashes(store) == before
    with pytest.raises(TaftError, match="no such directory"):
        ModelStore(store.parent / "absent").forget(["img/000"], "drop", execution=QUIET)
    assert not (store.parent / "absent").exists()


def test_forgetting_twice_is_a_logged_noop(store):
    ids = [load_manifest(StoreLayout(store)).shards[0].ids[0]]
    ModelStore(store).forget(ids, "drop", execution=QUIET)
    before = {k: v for k, v in file_hashes(store).items() if k != "audit.jsonl"}
    r = ModelStore(store).forget(ids, "drop", execution=QUIET)
    assert r.noop and r.already == ids and r.forgotten == []
    assert {k: v for k, v in file_hashes(store).items() if k != "audit.jsonl"} == before
    last = ModelStore(store).audit()[-1]
    assert last["op"] == "forget" and last["noop"] is True and last["already"] == ids


def test_read_ids_accepts_lines_and_json(tmp_path):
    (tmp_path / "a.txt").write_text("img/001\n\n img/002 \n")
    (tmp_path / "b.json").write_text('["img/003", "img/004"]')
    assert read_ids(tmp_path / "a.txt") == ["img/001", "img/002"]
    assert read_ids(tmp_path / "b.json") == ["img/003", "img/004"]
    (tmp_path / "c.json").write_text('[{"id": 1}]')
    with pytest.raises(TaftError, match="list of strings"):
        read_ids(tmp_path / "c.json")


# -------------------------------------------------------------------------------------------- verify and repair
def test_verify_repairs_what_needs_no_training(store):
    layout = StoreLayout(store)
    assert ModelStore(store).verify().ok
    sha = load_manifest(layout).composed.sha256
    layout.composed.unlink()
    (layout.shards_dir / "shard-009-0123456789abcdef.safetensors").write_bytes(b"stray")
    (layout.shards_dir / ".shard-001-x.tmp").write_bytes(b"half")
    layout.forgotten.write_text('["img/000"]')
    with open(layout.audit, "ab") as f:
        f.write(b'{"op": "tor')
    report = ModelStore(store).verify()
    assert not report.ok and len(report.problems) == 4, report.problems
    assert all("--repair" in p for p in report.problems)
    report = ModelStore(store).verify(repair=True)
    assert report.ok and len(report.repaired) == 4, report.lines()
    assert load_manifest(layout).composed.sha256 == sha
    assert hashlib.sha256(layout.composed.read_bytes()).hexdigest() == sha  # recomputed byte for byte
    assert not layout.temp_files() and len(layout.shard_files()) == K
    assert json.loads(layout.forgotten.read_text()) == [] and len(ModelStore(store).audit()) == 1
    assert ModelStore(store).verify().ok


def test_a_corrupt_shard_stops_a_forget(store):
    layout = StoreLayout(store)
    path = layout.path(load_manifest(layout).shards[1].file)
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(TaftError, match="does not match its hash"):
        ModelStore(store).forget([load_manifest(layout).shards[0].ids[0]], "drop", execution=QUIET)


def test_verify_reports_a_corrupt_shard_and_repair_retrains_it_exactly(store):
    layout = StoreLayout(store)
    before = load_manifest(layout)
    path = layout.path(before.shards[1].file)
    original = read_checkpoint(path).tensors
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    report = ModelStore(store).verify()
    assert not report.ok and "shard 1" in report.problems[0] and "corrupt" in report.problems[0]
    assert report.lost_shards == [1]
    report = ModelStore(store).verify(repair=True, backbone=tiny_backbone())  # as recorded: ids, seed, recipe
    assert report.ok and any("retrained 1 shard [1] as recorded: the composed model is bit-identical" in r
                             for r in report.repaired), report.lines()
    after = load_manifest(layout)
    assert same_tensors(read_checkpoint(layout.path(after.shards[1].file)).tensors, original)
    assert after.composed.content_sha256 == before.composed.content_sha256 and after.generation == before.generation + 1
    assert ModelStore(store).audit()[-1]["op"] == "retrain" and ModelStore(store).verify().ok


def test_create_refuses_bad_settings(data, tmp_path, store):
    bb, cf = data
    for spec, match in (({"method": "nlft"}, "linear"), ({"head_init": "probe"}, "w0")):
        with pytest.raises(TaftError, match=match):
            create(tmp_path / "x", cf, bb, CONFIG, spec=spec, shards=2)
    with pytest.raises(TaftError, match="already holds a model store"):
        create(store, cf, bb, CONFIG, shards=2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(TaftError, match="not empty"):
        create(tmp_path / "full", cf, bb, CONFIG, shards=2)
    plan = make_plan(cf.ids[:-1], cf.labels[:-1], 2)
    with pytest.raises(TaftError, match="plan's ids differ"):
        create(tmp_path / "y", cf, bb, CONFIG, plan=plan)
    with pytest.raises(FingerprintMismatchError):
        ModelStore(store).forget([cf.ids[0]], "retrain", backbone=random_backbone(TINY_VIT, 12, seed=3,
                                                                                  dtype=torch.float32),
                                 execution=INLINE)


def test_forget_retrain_with_size_dependent_schedules_is_bit_identical(data, tmp_path):
    """With min_steps a shard's epochs depend on its size: forgetting shrinks shard 0, which then trains more
    epochs, and the store still equals one built from scratch without the ids."""
    bb, cf = data
    cfg = replace(CONFIG, min_steps=25)
    store = create(tmp_path / "s", cf, bb, cfg, min_steps=cfg.min_steps, shards=K)
    m = load_manifest(StoreLayout(store))
    gone = m.shards[0].ids[:4]
    before = shard_epochs(store)
    ModelStore(store).forget(gone, "retrain", backbone=bb, execution=INLINE)
    scratch = create(tmp_path / "scratch", cf.select([i for i in cf.ids if i not in gone]), bb, cfg,
                     min_steps=cfg.min_steps, plan=m.plan.without(gone))
    assert same_tensors(composed_delta(store), composed_delta(scratch))
    sizes = [len(s.ids) for s in load_manifest(StoreLayout(store)).shards]
    epochs = shard_epochs(store)
    assert epochs == [cfg.epochs_for(n) for n in sizes] and epochs[0] > before[0] and epochs[1:] == before[1:]


def shard_epochs(store: Path) -> list[int]:
    """The epochs each shard of `store` trained (its checkpoint's metrics)."""
    return [read_checkpoint_metadata(ModelStore(store).shard_path(i))["metrics"]["epochs"] for i in range(K)]


def test_shards_that_lack_classes_are_warned_about_in_one_line():
    import warnings

    from taft.store.create import warn_uncovered

    ids = [f"{c}/{i}" for c in "abc" for i in range(4)]
    labels = [k for k in range(3) for _ in range(4)]
    with pytest.warns(UserWarning, match=r"^6 of 6 shards lack some of the data's 3 classes \(6 have fewer examples "
                                         r"than classes\), e\.g\. shard 0: 2 examples of 2 classes; fewer shards"):
        warn_uncovered(make_plan(ids, labels, 6, 0), ids, labels)
    with pytest.warns(UserWarning, match=r"^3 of 5 shards lack .*\(3 have fewer examples than classes\)"):
        warn_uncovered(make_plan(ids, labels, 5, 0), ids, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_uncovered(make_plan(ids, labels, 4, 0), ids, labels)  # 3 examples each, one of every class
        warn_uncovered(make_plan(ids, labels, 3, 0, "class"), ids, labels)  # whole classes per shard, by design
