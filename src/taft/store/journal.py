"""The operation journal (`pending.json`) and the append-only audit log (`audit.jsonl`).

pending.json is written (atomically) before an operation changes anything, and removed after it has committed and
cleaned up. It holds: op_id (unique), op ("create" | "forget" | "compose" | "retrain" | "add" | "import"), request (what
was asked; a rerun with an equal request resumes the operation), time (the operation's timestamp, also the `created` of
the files it writes, so a rerun writes identical bytes), base_generation, audit (the log entry to append at the end) and
completed ({shard index: {file, sha256}} for shards already trained, reused by a rerun). An operation has committed iff
the manifest's `last_op` is its op_id.

audit.jsonl: one JSON object per line, appended after commit: time, op, op_id, the ids or shards touched,
generation and the resulting composed sha256. Appending is idempotent per op_id, so finishing an operation twice
logs it once. A torn last line (a crash mid-append) is dropped by `verify --repair`.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from taft.errors import TaftError
from taft.fileio import fsync_dir, now, read_json, write_json
from taft.store.layout import StoreLayout
from taft.store.manifest import ShardFile
from taft.wording import counted


@dataclass
class Pending:
    """The journal of the operation in progress (see the module doc). `request` is what was asked (per op:
    create {plan, config, fingerprint, threads, weighting, data, backbone[, dp]}; forget {ids, mode}; compose
    {weighting, subset}; retrain {shards}; add {data, shards, plan, source, readd_forgotten}; import {checkpoints,
    data, source, readd_forgotten}); `audit` the log entry's fields; `completed` the shard files already written."""

    op_id: str
    op: str
    request: dict[str, Any]
    time: str
    base_generation: int
    audit: dict[str, Any]
    completed: dict[int, ShardFile] = field(default_factory=dict)

    @classmethod
    def new(cls, op: str, request: dict[str, Any], base_generation: int, audit: dict[str, Any]) -> Pending:
        return cls(uuid.uuid4().hex, op, request, now(), base_generation, audit)

    def to_dict(self) -> dict[str, Any]:
        return {"op_id": self.op_id, "op": self.op, "request": self.request, "time": self.time,
                "base_generation": self.base_generation, "audit": self.audit,
                "completed": {str(i): f.to_dict() for i, f in sorted(self.completed.items())}}

    @classmethod
    def from_dict(cls, d: Any) -> Pending:
        if not isinstance(d, dict) or not {"op_id", "op", "request", "time", "completed"} <= set(d):
            raise TaftError("it is not a JSON object with op_id, op, request, time and completed")
        try:
            return cls(str(d["op_id"]), str(d["op"]), dict(d["request"]), str(d["time"]),
                       int(d.get("base_generation", 0)), dict(d.get("audit", {})),
                       {int(i): ShardFile.from_dict(f) for i, f in d["completed"].items()})
        except (AttributeError, TypeError, ValueError) as e:
            raise TaftError(f"{type(e).__name__}: {e}") from e

    def describe(self) -> str:
        """The operation in words."""
        if self.op == "forget":
            ids = counted(len(self.request["ids"]), "id")
            return f"forget of {ids} (mode {self.request['mode']}) started {self.time}"
        if self.op in ("add", "import"):
            what = counted(self.audit.get("n", 0), "example")
            return f"{'addition' if self.op == 'add' else 'import'} of {what} started {self.time}"
        return f"{self.op} started {self.time}"

    def progress(self) -> str | None:
        """The shards finished so far, in words ("1 of 8 shards finished"), for an operation that trains."""
        if not self.trains():
            return None
        return f"{len(self.completed)} of {counted(len(self.audit.get('shards', [])), 'shard')} finished"

    def trains(self) -> bool:
        """Whether the operation trains shards (a creation, a retrain, a forget in retrain mode)."""
        return (self.op in ("create", "retrain", "add")
                or (self.op == "forget" and self.request.get("mode") == "retrain"))


def read_pending(layout: StoreLayout) -> Pending | None:
    if not layout.pending.exists():
        return None
    d = read_json(layout.pending, "operation journal")
    try:
        return Pending.from_dict(d)
    except TaftError as e:
        raise TaftError(f"operation journal {layout.pending} is malformed ({e})") from e


def write_pending(layout: StoreLayout, pending: Pending) -> None:
    write_json(layout.pending, pending.to_dict())


def clear_pending(layout: StoreLayout) -> None:
    layout.pending.unlink(missing_ok=True)
    fsync_dir(layout.root)


def read_audit(layout: StoreLayout) -> tuple[list[dict[str, Any]], int | None]:
    """(entries, byte offset where a torn or corrupt tail starts, or None if the log is whole)."""
    if not layout.audit.exists():
        return [], None
    raw = layout.audit.read_bytes()
    entries, offset = [], 0
    for line in raw.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            return entries, offset
        try:
            entry = json.loads(line)
        except ValueError:
            return entries, offset
        if not isinstance(entry, dict):
            return entries, offset
        entries.append(entry)
        offset += len(line)
    return entries, None


def truncate_audit(layout: StoreLayout, offset: int) -> None:
    with open(layout.audit, "rb+") as f:
        f.truncate(offset)
        os.fsync(f.fileno())


def append_audit(layout: StoreLayout, entry: dict[str, Any]) -> None:
    """Append `entry` (one line, fsync'd) unless an entry with its op_id is already there. A torn tail is cut
    first, so a new line never joins a half-written one."""
    entries, torn = read_audit(layout)
    if torn is not None:
        truncate_audit(layout, torn)
    if entry.get("op_id") and any(e.get("op_id") == entry["op_id"] for e in entries):
        return
    line = json.dumps(entry, ensure_ascii=False, sort_keys=True, allow_nan=False) + "\n"
    with open(layout.audit, "ab") as f:
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def audit_noop(layout: StoreLayout, op: str, **fields: Any) -> None:
    append_audit(layout, {"time": now(), "op": op, "op_id": uuid.uuid4().hex, "noop": True, **fields})


__all__ = ["Pending", "append_audit", "audit_noop", "clear_pending", "counted", "read_audit", "read_pending",
           "truncate_audit", "write_pending"]
