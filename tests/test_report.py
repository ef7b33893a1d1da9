"""`taft report`: a Markdown page with plots of a store (sizes, accuracy, audit log)."""

from __future__ import annotations

import json
import re

from taft.cli import main
from taft.store import ModelStore
from test_store_cli import cli_store, store  # noqa: F401  (fixtures)


def test_report_lists_shards_accuracy_and_audit(store, capsys, tmp_path):
    data, root = store
    (tmp_path / "ids.txt").write_text("ant/0.png\n")
    assert main(["forget", str(root), "--ids", str(tmp_path / "ids.txt"), "--mode", "drop"]) == 0
    out = tmp_path / "report"
    assert main(["report", str(root), "--data", str(data), "--out", str(out), "--quiet"]) == 0
    text = (out / "report.md").read_text()
    for png in ("shard_sizes.png", "accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in text
    for s in ModelStore(root).manifest.shards:
        assert re.search(rf"\| {s.index} \| {s.status} \| {s.n} \|", text)
    audit = ModelStore(root).audit()
    assert len(audit) >= 2 and sum(line.startswith("| 20") for line in text.splitlines()) == len(audit)
    composed = ModelStore(root).manifest.composed  # both hashes, labelled, in the report and the audit log
    assert f"content sha256 `{composed.content_sha256[:16]}…` (tensors), file sha256 `{composed.sha256[:16]}…`" in text
    assert audit[-1]["composed_content_sha256"] == composed.content_sha256
    assert f"`{composed.content_sha256[:12]}` / `{composed.sha256[:12]}`" in text
    acc = json.loads((out / "accuracy.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(root / "composed.safetensors"), "--data", str(data), "--quiet"]) == 0
    shown = float(re.search(r"top-1 ([\d.]+)%", capsys.readouterr().out).group(1))
    assert abs(shown - 100 * acc["composed"]) < 0.01 and f"{100 * acc['composed']:.2f}%" in text


def test_report_without_data_has_no_accuracy(store, tmp_path):
    _, root = store
    assert main(["report", str(root), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "## Accuracy" not in text and "## Audit log" in text and not (tmp_path / "r" / "accuracy.png").exists()
