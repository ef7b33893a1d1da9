"""Stores written by an earlier taft (tests/data/legacy, made at commit 0f2bed0 by make_stores.py there) still open,
verify, compose and forget: a plain taft store of 3 shards with shard 1 dropped, and a DP probe store of 2 shards.
The tiny backbone and data of test_store.py are the ones they were trained with."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import CLASSES
from taft.checkpoint import read_checkpoint
from taft.fileio import canonical_json
from taft.privacy import PrivacyLedger
from taft.privacy.ledger import SEQUENTIAL
from taft.store import ModelStore
from taft.store.delta_sum import composition_weights
from test_store import INLINE, QUIET, tiny_backbone, tiny_features

LEGACY = Path(__file__).resolve().parent / "data" / "legacy"


@pytest.fixture(scope="module")
def data():
    return tiny_features()


@pytest.fixture(params=["plain", "dp"])
def legacy(request, tmp_path) -> ModelStore:
    return ModelStore(shutil.copytree(LEGACY / request.param, tmp_path / request.param))


def test_a_legacy_manifest_reads_into_the_record_and_writes_back_byte_for_byte(legacy):
    m = legacy.manifest
    assert canonical_json(m.to_dict()) + "\n" == legacy.layout.manifest.read_text(encoding="utf-8")
    report = legacy.verify()
    assert report.ok and not report.notes and not report.repaired, report.lines()
    assert m.model.backbone_fingerprint == tiny_backbone().fingerprint and m.model.class_names == tuple(CLASSES)


def test_legacy_stores_load_and_describe_themselves(legacy):
    info = legacy.info()
    clf, meta = legacy.load_composed(tiny_backbone())
    assert clf.class_names == CLASSES and meta["fingerprint"] == info["fingerprint"]
    assert sorted(meta["data"]["ids"]) == sorted(i for j in info["composition"]["members"] for i in legacy.ids(j))
    if legacy.root.name == "plain":
        assert [s["status"] for s in info["shards"]] == ["trained", "dropped", "trained"]
        assert info["forgotten"] == 1 and info["composition"]["members"] == [0, 2] and "privacy" not in info
    else:
        assert info["method"] == "probe" and info["privacy"]["epsilon"] > 0
        assert [s["privacy"]["n"] for s in info["shards"]] == [20, 16]
    assert [e["op"] for e in legacy.audit()][0] == "create"


def test_legacy_stores_compose(legacy, tmp_path):
    m = legacy.manifest
    if legacy.root.name == "plain":
        legacy.compose(weighting="size")
        sizes = [m.shards[i].n for i in (0, 2)]
        assert legacy.manifest.composed.alphas == composition_weights(sizes, "size")
    else:
        legacy.compose(shards=[1])
        assert legacy.manifest.privacy["epsilon"] == m.shards[1].privacy["epsilon"]
    assert legacy.manifest.generation == m.generation + 1 and legacy.audit()[-1]["op"] == "compose"
    out = legacy.compose(shards=[0], out=tmp_path / "shard0.safetensors")
    assert read_checkpoint(out).ids == m.shards[0].ids
    assert legacy.verify().ok


def test_legacy_stores_forget_by_drop_and_retrain(legacy, data):
    bb, cf = data
    m = legacy.manifest
    retrained = 2 if legacy.root.name == "plain" else 1
    gone = m.shards[retrained].ids[0]
    r = legacy.forget([gone], "retrain", features=cf, backbone=bb, execution=INLINE)
    assert r.forgotten == [gone] and r.shards == [retrained]
    after = legacy.manifest
    assert read_checkpoint(legacy.shard_path(retrained)).ids == m.shards[retrained].ids[1:]
    assert after.shards[retrained].sha256 != m.shards[retrained].sha256
    assert after.shards[0].sha256 == m.shards[0].sha256  # untouched
    if legacy.root.name == "dp":
        led = PrivacyLedger.from_dict(after.shards[retrained].privacy)
        assert led.mechanism == SEQUENTIAL and led.components[0] == m.shards[retrained].privacy
    dropped = m.shards[0].ids[0]
    r = legacy.forget([dropped], "drop", execution=QUIET)
    assert r.shards == [0] and legacy.manifest.shards[0].status == "dropped"
    assert legacy.manifest.forgotten == sorted(set(m.forgotten) | {gone, dropped})
    assert legacy.verify().ok and [e["op"] for e in legacy.audit()][-2:] == ["forget", "forget"]
