"""Check a store against its manifest and, with `repair=True`, fix what can be fixed without training.

Checked: the manifest (format, invariants: `check_manifest`); the journal (an operation that committed but was not
finished is finished on repair; one that did not commit is reported, and its finished shard files are kept so a
rerun reuses them); every shard file (present, SHA-256 as in the manifest, fingerprint and ids as listed);
composed.safetensors (present and matching its hash, else recomputed from the manifest's shards on repair: the
bytes are reproducible); forgotten.json (equal to the manifest's list, else rewritten); audit.jsonl (whole lines;
a torn last line is cut on repair; the last committed operation is logged); stray files (unreferenced shard files,
temp files of interrupted writes, a composed file the manifest does not have: removed on repair).

Not repairable here (reported): a missing or corrupt manifest, a missing audit log; a missing or damaged shard
file is listed in `VerifyReport.lost_shards`, which `ModelStore.verify(repair=True)` retrains as recorded
(`taft.store.retrain`; not in a DP store).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from taft.errors import TaftError
from taft.checkpoint import read_checkpoint
from taft.store.commit import collect_garbage, compose_into, finish, unreferenced, write_forgotten
from taft.store.journal import read_audit, read_pending, truncate_audit
from taft.fileio import sha256_file
from taft.store.layout import StoreLayout
from taft.store.manifest import Manifest, load_manifest, save_manifest


@dataclass
class VerifyReport:
    """ok: no problem is left. problems: what is wrong (and was not repaired); repaired: what repair fixed;
    notes: facts worth knowing (e.g. an interrupted operation waiting to be rerun)."""

    root: Path
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    lost_shards: list[int] = field(default_factory=list)  # trained shards whose file is missing or damaged

    def lines(self) -> list[str]:
        out = [f"store {self.root}: {'OK' if self.ok else 'PROBLEMS FOUND'}"]
        out += [f"  repaired: {r}" for r in self.repaired]
        out += [f"  problem: {p}" for p in self.problems]
        out += [f"  note: {n}" for n in self.notes]
        return out


def verify(root: str | Path, repair: bool = False) -> VerifyReport:
    """Verify (and with `repair`, fix) the store at `root`; see the module doc. `TaftError` if it is not a
    directory or an operation is running on it."""
    layout = StoreLayout(root)
    if not layout.root.is_dir():
        raise TaftError(f"no model store at {layout.root} (not a directory)")
    report = VerifyReport(layout.root)
    with layout.locked(wait=False):
        _verify(layout, report, repair)
    report.ok = not report.problems
    return report


def _verify(layout: StoreLayout, r: VerifyReport, repair: bool) -> None:
    def fix(problem: str, action: Callable[[], str | None], hint: str) -> None:
        if repair:
            done = action()
            r.repaired.append(f"{problem}: {done or hint}")
        else:
            r.problems.append(f"{problem} (taft store verify --repair: {hint})")

    try:
        pending = read_pending(layout)
    except TaftError as e:
        r.problems.append(str(e))
        return
    if not layout.manifest.exists():
        if pending is not None and pending.op == "create":
            r.problems.append(f"the store is being created: its creation (started {pending.time}) was interrupted "
                              f"before it committed, {pending.progress()}; rerun the same `taft shards train` "
                              f"command, or `taft store resume {layout.root}`, to finish it")
        else:
            r.problems.append("no manifest.json: this is not a model store")
        return
    try:
        m = load_manifest(layout)
    except TaftError as e:
        r.problems.append(str(e))
        return
    keep: list[str] = []
    if pending is not None and m.last_op == pending.op_id:
        fix(f"the {pending.describe()} committed but did not finish its cleanup",
            lambda: (finish(layout, m, pending), "finished it (forgotten.json, audit log, old files)")[1],
            "finish it")
        pending = None if repair else pending
    elif pending is not None:
        r.notes.append(f"an interrupted {pending.describe()} did not commit: the store is as before it. Rerun it "
                       f"(or `taft store resume {layout.root}`) to complete it")
        keep = [e.file for e in pending.completed.values()]

    shards_ok = True
    for s in m.shards:
        if not s.file:
            continue
        path = layout.path(s.file)
        if not path.is_file():
            lost = "is missing"
        elif sha256_file(path) != s.sha256:
            lost = "does not match its hash (corrupt)"
        else:
            f = read_checkpoint(path)
            lost = (None if f.fingerprint == m.model.fingerprint and sorted(f.ids or []) == s.ids
                    else "holds another model or other ids than the manifest lists")
        if lost is not None:
            how = ("restore the file" if m.dp is not None or not m.retrainable(s.index)
                   else "repair retrains it as recorded, or restore the file")
            r.problems.append(f"shard {s.index}'s file {s.file} {lost}; {how}")
            r.lost_shards.append(s.index)
            shards_ok = False

    composed = m.composed
    if composed is not None:
        path = layout.path(composed.file)
        state = "is missing" if not path.is_file() else (
            "does not match its hash" if sha256_file(path) != composed.sha256 else None)
        if state is None:
            meta = read_checkpoint(path).meta
            want = sorted(i for j in m.members() for i in m.shards[j].ids)
            ids = meta.get("data", {}).get("ids")
            if (ids is not None and sorted(ids) != want) or meta.get("fingerprint") != m.model.fingerprint:
                state = "holds other data or another model than the manifest lists"
        if state is not None:
            if shards_ok:
                fix(f"composed.safetensors {state}", lambda: _recompose(layout, m), "recompute it from the shards")
            else:
                r.problems.append(f"composed.safetensors {state}, and cannot be recomputed until the shards are "
                                  "restored")

    try:
        listed = json.loads(layout.forgotten.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        listed = None
    if listed != sorted(m.forgotten):
        fix("forgotten.json is missing or differs from the manifest", lambda: write_forgotten(layout, m),
            "rewrite it from the manifest")

    if not layout.audit.exists():
        r.problems.append("audit.jsonl is missing (the store's history cannot be rebuilt)")
    else:
        entries, torn = read_audit(layout)
        if torn is not None:
            fix("audit.jsonl ends with a torn or corrupt line", lambda: truncate_audit(layout, torn),
                "cut it off")
        if m.last_op and pending is None and not any(e.get("op_id") == m.last_op for e in entries):
            r.problems.append(f"audit.jsonl does not log the last committed operation ({m.last_op})")

    stray = unreferenced(layout, m, keep)
    if stray:
        names = ", ".join(layout.relative(p) for p in stray[:5]) + (" …" if len(stray) > 5 else "")
        fix(f"{len(stray)} files not referenced by the manifest ({names})",
            lambda: (collect_garbage(layout, m, keep), "removed them")[1], "remove them")


def _recompose(layout: StoreLayout, m: Manifest) -> str:
    entry = compose_into(layout, m, m.composed.created)
    if entry is not None and entry.sha256 != m.composed.sha256:
        save_manifest(layout, replace(m, composed=entry))  # other library versions write other bytes
        return "recomputed it from the shards (new hash recorded in the manifest)"
    return "recomputed it from the shards (same hash as the manifest's)"
