"""The `taft` the README test puts on PATH: the real command line (`taft.cli.main`) at tiny sizes.

Rewrites, applied to every README command (nothing else changes; the data files are the test's tiny stand-ins):
- train, shards train, demo: one epoch, `--quiet`; vision backbones at 28 px (`--image-size 28`).
- shards train, forget, store resume: in this process (`--executor inline`; the executors have their own tests).
- shards train: `--min-steps 0` (the one epoch is all a tiny shard trains).
- a known dataset (`--dataset`, and the demo): `--per-class N` becomes 6 (added when absent, for the demo
  `--train-per-class 6 --test-per-class 3`); Fashion-MNIST is read from `$README_TEST_FASHION_MNIST` (a tiny IDX
  folder). Bundled backbones and Rotten Tomatoes are the real ones.

For the README's Python blocks (`tiny_python`): the known datasets of `taft.data` keep the first 6 examples per
class, Fashion-MNIST from `$README_TEST_FASHION_MNIST`.
"""

from __future__ import annotations

import os
import sys

from taft.cli import main

PER_CLASS = "6"


def _value(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv[:-1] else None


def tiny(argv: list[str]) -> list[str]:
    """`argv` with the rewrites of the module doc."""
    argv = list(argv)
    command = argv[:2] if argv[:1] == ["shards"] else argv[:1]
    text = _value(argv, "--backbone") == "minilm-l6" or "--text" in argv
    fashion = os.environ["README_TEST_FASHION_MNIST"]
    if command in (["train"], ["shards", "train"]):
        argv += ["--epochs", "1", "--quiet"] + ([] if text else ["--image-size", "28"])
    if command in (["shards", "train"], ["forget"], ["store", "resume"]) or argv[:2] == ["store", "resume"]:
        argv += ["--executor", "inline"]
    if command == ["shards", "train"]:
        argv += ["--min-steps", "0"]
    if command == ["demo"]:
        argv += ["--train-per-class", PER_CLASS, "--test-per-class", "3", "--epochs", "1"]
        argv += [] if text else ["--image-size", "28", "--data-dir", fashion]
    elif "--dataset" in argv:
        if "--per-class" in argv:
            argv[argv.index("--per-class") + 1] = PER_CLASS
        else:
            argv += ["--per-class", PER_CLASS]
        if _value(argv, "--dataset") == "fashion-mnist" and "--data-dir" not in argv:
            argv += ["--data-dir", fashion]
    return argv


def tiny_python(monkeypatch) -> None:
    """Patch `taft.data`'s known datasets to their first `PER_CLASS` examples per class (see the module doc)."""
    import taft.data

    rotten_tomatoes, fashion_mnist = taft.data.rotten_tomatoes, taft.data.fashion_mnist
    monkeypatch.setattr(taft.data, "rotten_tomatoes",
                        lambda *a, **kw: rotten_tomatoes(*a, **kw).per_class(int(PER_CLASS)))
    monkeypatch.setattr(taft.data, "fashion_mnist", lambda data_dir=None, *a, **kw: fashion_mnist(
        data_dir or os.environ["README_TEST_FASHION_MNIST"], *a, **kw).per_class(int(PER_CLASS)))


if __name__ == "__main__":
    sys.exit(main(tiny(sys.argv[1:])))
