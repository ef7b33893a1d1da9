"""What a store command says when it is interrupted: how to complete the operation."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from taft.errors import TaftError


def how_to_continue(store: Path) -> str | None:
    """What an interrupted operation on `store` kept and how to complete it, in one line (None: none pending)."""
    from taft.store.journal import read_pending
    from taft.store.layout import StoreLayout

    try:
        pending = read_pending(StoreLayout(store))
    except TaftError:
        return None
    if pending is None:
        return None
    what = "the store's creation" if pending.op == "create" else f"the {pending.describe()}"
    kept = f"; {pending.progress()} and kept" if pending.trains() else ""
    return f"{what} was interrupted{kept}: rerun the same command, or `taft store resume {store}`, to complete it"


@contextlib.contextmanager
def interruptible(store: Path) -> Iterator[None]:
    """On Ctrl-C (or SIGTERM) during a store operation, say on stderr how to complete it, then stop."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        line = how_to_continue(store)
        if line is not None:
            print(f"taft: {line}", file=sys.stderr)
        raise
