"""Location of taft's on-disk cache (converted weights, trunk features)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$TAFT_CACHE` if set, else `~/.cache/taft`; created on first use."""
    root = Path(os.environ.get("TAFT_CACHE") or Path.home() / ".cache" / "taft")
    root.mkdir(parents=True, exist_ok=True)
    return root
