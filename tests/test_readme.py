"""Every shell block of README.md runs as written, in order, in one fresh directory (issue 14, defect 4); so does
every Python block, in order, in one namespace (as a reader pastes them into one session), in another directory.

The blocks are the README's ```bash fences, run line by line in one directory: a plain `taft ...` (or
`.venv/bin/taft ...`) command runs in this process (no interpreter start per command) as the real command line at
tiny sizes (`tests/readme_shim.py` lists its rewrites), and any other line, or one using shell syntax (pipes,
`&&`, redirections, variables), runs in `bash -euo pipefail` with that same tiny `taft` on PATH. Beside it are
tiny stand-ins for the README's data: `my_images/`, `my_test_images/`, `photo1.jpg`, `photo2.png`, `reviews.csv`,
`reviews_test.jsonl`, `ids.txt` and a Fashion-MNIST IDX folder. A block that cannot run here is marked in the
README by the line `<!-- readme-test: skip: <reason> -->` right before its fence (setup that installs system
packages, the test suite itself, benchmarks with their own smoke tests); anything else must run. The Python blocks
read the same `my_images/` and `my_test_images/` (tiny class folders) and the known datasets at 6 examples per class
(`readme_shim.tiny_python`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_classes, make_idx
from readme_shim import tiny, tiny_python
from taft.cli import main

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!--\s*readme-test:\s*skip:\s*(.+?)\s*-->")
FENCE = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)
PYTHON_FENCE = re.compile(r"^```python\n(.*?)^```", re.M | re.S)


def readme_blocks(text: str, fence: re.Pattern = FENCE) -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) of each ```bash block (or `fence`'s), in order."""
    blocks = []
    for m in fence.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        blocks.append((text[:m.start()].count("\n") + 1, m.group(1), skip.group(1) if skip else None))
    return blocks


def test_blocks_are_found_and_skips_have_reasons():
    blocks = readme_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 5 and sum(skip is None for *_, skip in blocks) >= 4
    sample = "x\n<!-- readme-test: skip: needs sudo -->\n```bash\nfoo\n```\n\n```bash\nbar\n```\n"
    assert readme_blocks(sample) == [(3, "foo\n", "needs sudo"), (7, "bar\n", None)]


def sandbox(root: Path) -> dict[str, str]:
    """The README's data as tiny stand-ins in `root`, and the environment the blocks run in."""
    make_classes(root / "my_images", classes=("ant", "bee", "cow"), per_class=14)  # > one batch of 32 (DP)
    make_classes(root / "my_test_images", classes=("ant", "bee", "cow"), per_class=2)
    make_classes(root / "week2", classes=("ant", "bee", "cow"), per_class=2, prefix="w2-")
    for name in ("photo1.jpg", "photo2.png"):
        (root / name).write_bytes((root / "my_test_images" / "ant" / "0.png").read_bytes())
    rows = [("a gripping, beautifully shot film", "pos"), ("dull and far too long", "neg")] * 4
    (root / "reviews.csv").write_text("text,label\n" + "".join(f'"{t}",{y}\n' for t, y in rows))
    (root / "reviews_test.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    (root / "ids.txt").write_text("ant/0.png\nbee/3.png\n")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    shim = bin_dir / "taft"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT / 'tests' / 'readme_shim.py'} \"$@\"\n")
    shim.chmod(0o755)
    env = os.environ.copy()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env["README_TEST_FASHION_MNIST"] = str(make_idx(make_idx(root / "fashion-mnist", "train", 6), "test", 3))
    return env


SHELL_SYNTAX = re.compile(r"[|&;<>$`(){}*?]")


def commands(code: str) -> list[str]:
    """The block's commands: its lines, backslash continuations joined, blank and comment-only lines dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [line for line in joined.splitlines() if shlex.split(line, comments=True)]


def run_line(line: str, cwd: Path, env: dict[str, str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of one README command (see the module doc)."""
    argv = shlex.split(line, comments=True)
    if argv[0] in ("taft", ".venv/bin/taft") and not SHELL_SYNTAX.search(line.split("#", 1)[0]):
        capsys.readouterr()
        try:
            status = main(tiny(argv[1:]))
        except SystemExit as e:  # argparse
            status = e.code if isinstance(e.code, int) else 2
        return status, capsys.readouterr().err
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", line], cwd=cwd, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stderr


def test_commands_are_split_like_the_shell():
    assert commands("a \\\n  b  # note\n\n# only a comment\nc '#not'\n") == ["a    b  # note", "c '#not'"]


@pytest.mark.slow
def test_readme_shell_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    env = sandbox(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("README_TEST_FASHION_MNIST", env["README_TEST_FASHION_MNIST"])
    ran = 0
    for start, code, skip in readme_blocks((ROOT / "README.md").read_text()):
        if skip is not None:
            continue
        for line in commands(code):
            status, err = run_line(line, tmp_path, env, capsys)
            assert status == 0, f"README.md block at line {start}: `{line}` failed:\n{err[-3000:]}"
            ran += 1
    assert ran >= 15


def test_python_blocks_are_found():
    blocks = readme_blocks((ROOT / "README.md").read_text(), PYTHON_FENCE)
    assert len(blocks) >= 4 and all(skip is None for *_, skip in blocks)
    sample = "<!-- readme-test: skip: needs a GPU -->\n```python\nx = 1\n```\n```bash\ny\n```\n"
    assert readme_blocks(sample, PYTHON_FENCE) == [(2, "x = 1\n", "needs a GPU")]


@pytest.mark.slow
def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch, capsys):
    make_classes(tmp_path / "my_images", classes=("ant", "bee", "cow"), per_class=4)
    make_classes(tmp_path / "my_test_images", classes=("ant", "bee", "cow"), per_class=2)
    make_classes(tmp_path / "week2", classes=("ant", "bee", "cow"), per_class=2, prefix="w2-")
    make_classes(tmp_path / "partner_images", classes=("ant", "cow"), per_class=3, prefix="p-")
    monkeypatch.setenv("README_TEST_FASHION_MNIST", str(make_idx(make_idx(tmp_path / "fm", "train", 6), "test", 3)))
    monkeypatch.chdir(tmp_path)
    tiny_python(monkeypatch)
    namespace: dict = {"__name__": "__readme__"}
    ran = 0
    for start, code, skip in readme_blocks((ROOT / "README.md").read_text(), PYTHON_FENCE):
        if skip is not None:
            continue
        exec(compile(code, f"README.md block at line {start}", "exec"), namespace)
        ran += 1
    assert ran >= 4
    assert (tmp_path / "runs" / "mine" / "checkpoint.safetensors").is_file()  # the last block's run directory
    lines = capsys.readouterr().out.splitlines()
    printed = [float(line) for line in lines if re.fullmatch(r"[0-9.e-]+", line)]
    assert len(printed) == 3 and all(0.0 <= top1 <= 1.0 for top1 in printed)  # the three evaluate(...).top1
    assert "[0, 1, 2, 3] ['add', 'import']" in lines  # the living store's members and additions
    store = json.loads((tmp_path / "stores" / "reviews" / "manifest.json").read_text())
    assert len(store["forgotten"]) == 1 and [s["status"] for s in store["shards"]] == ["trained", "trained"]
    living = json.loads((tmp_path / "stores" / "living" / "manifest.json").read_text())
    assert [a["op"] for a in living["additions"]] == ["add", "import"] and len(living["forgotten"]) == 2
    assert (tmp_path / "runs" / "store-minus-partner.safetensors").is_file()
