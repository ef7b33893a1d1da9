"""Helpers shared by several test modules (tests/ is on sys.path): `from helpers import ...`.

The fixtures take effect in a module that imports them (`# noqa: F401` there); `conftest.py` registers this module
for pytest's assertion rewriting."""

from __future__ import annotations

import pytest
import torch

from taft.cli import main


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TAFT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add latency (a lot of it on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def bad(capsys, argv: list[str], message: str) -> None:
    """`taft argv` fails with exit status 2 and one line on stderr, `taft: error: ...` containing `message`."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("taft: error:") and message in err and err.count("\n") == 1, err
