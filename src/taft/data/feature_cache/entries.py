"""What taft's on-disk cache holds (`taft cache list`) and removing entries by age (`taft cache clear`).

Entries: each trunk-feature entry (`features/<digest>/`, see `taft.data.feature_cache`), each converted backbone
(`backbones/<file>`), and anything else at the top of the cache. An entry's age is that of its newest file (the
last time it was written); every entry can be rebuilt from its source on the next use.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from taft.paths import cache_dir
from taft.errors import TaftError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class CacheEntry:
    path: Path
    kind: str  # "features", "features (incomplete)", "backbone" or "other"
    size: int  # bytes
    modified: float  # newest file's mtime (seconds since the epoch)
    description: str

    def to_dict(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "size_bytes": self.size,
                "modified": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.modified)),
                "description": self.description}


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]


def _features_description(meta: dict) -> str:
    key = meta.get("key", {})
    inner = key.get("key", {}) if isinstance(key, dict) else {}
    transform = key.get("transform") if isinstance(key, dict) else None
    kind = "text" if isinstance(transform, dict) and "text" in transform else "images"
    classes = meta.get("class_names", [])
    return (f"{meta.get('n')} {kind} × {tuple(meta.get('feature_shape', ()))} {meta.get('dtype')}, "
            f"{len(classes)} classes ({', '.join(classes[:4])}{', …' if len(classes) > 4 else ''}), trunk of "
            f"{inner.get('trunk_blocks')} blocks of backbone {str(inner.get('backbone'))[:12]}…")


def _entry(path: Path, kind: str, description: str) -> CacheEntry:
    files = _files(path)
    stats = [f.stat() for f in files]
    modified = max((s.st_mtime for s in stats), default=path.stat().st_mtime)
    return CacheEntry(path, kind, sum(s.st_size for s in stats), modified, description)


def cache_entries(root: Path | None = None) -> list[CacheEntry]:
    """Every entry of the cache at `root` (default `cache_dir()`), oldest first."""
    root = root if root is not None else cache_dir()
    out = []
    for top in sorted(root.iterdir()) if root.is_dir() else []:
        if top.name == "features" and top.is_dir():
            for d in sorted(p for p in top.iterdir() if p.is_dir()):
                try:
                    meta = json.loads((d / "meta.json").read_text())
                    out.append(_entry(d, "features", _features_description(meta)))
                except (OSError, ValueError, AttributeError):
                    out.append(_entry(d, "features (incomplete)", "an interrupted or running build"))
        elif top.name == "backbones" and top.is_dir():
            for f in sorted(top.iterdir()):
                out.append(_entry(f, "backbone", f"converted weights {f.name}"))
        else:
            out.append(_entry(top, "other", top.name))
    return sorted(out, key=lambda e: e.modified)


def parse_age(text: str) -> float:
    """Seconds in an age like "90s", "30m", "12h", "7d", "2w" (a bare number is days)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise TaftError(f"an age is a number with a unit s, m, h, d or w, like 12h, 7d or 2w; got {text!r}")
    return float(m.group(1)) * UNITS[m.group(2) or "d"]


def clear_cache(older_than: float | None = None, root: Path | None = None,
                now: float | None = None) -> list[CacheEntry]:
    """Remove the entries last written more than `older_than` seconds ago (all when None); returns them."""
    now = time.time() if now is None else now
    removed = []
    for e in cache_entries(root):
        if older_than is None or now - e.modified > older_than:
            if e.path.is_dir():
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                e.path.unlink(missing_ok=True)
            removed.append(e)
    return removed


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover
