"""The package's imports point one way, layer by layer (docs/ARCHITECTURE.md), with no cycles and no private
`_name` imported from another module. Parses the source (ast), so function-level (lazy) imports count too;
imports under `if TYPE_CHECKING:` (annotations only, never run) do not."""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first; a module may import only from its own layer or a lower one. The package `taft` itself (its
# __init__, which re-exports the public API) and the entry points sit on top.
LAYERS = [
    ("base", ["taft.errors", "taft.version", "taft.paths", "taft.tensors", "taft.fingerprint", "taft.fileio",
              "taft.progress", "taft.devices", "taft.precision", "taft.losses", "taft.validate", "taft.spec",
              "taft.wording"]),
    ("tangent", ["taft.tangent"]),  # pure math; backbones share its masking and pooling
    ("backbones", ["taft.backbones"]),
    ("data", ["taft.data"]),  # datasets and the feature cache; no model needed
    ("checkpoint", ["taft.checkpoint"]),
    ("model", ["taft.model", "taft.tails"]),
    ("privacy", ["taft.privacy"]),
    ("train", ["taft.train"]),
    ("parallel", ["taft.parallel"]),
    ("store", ["taft.store"]),
    ("cli", ["taft.cli", "taft.demo", "taft.__main__", "taft"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    """Index in LAYERS of the most specific prefix that names `module`."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            covers = module == p or (p != "taft" and module.startswith(p + "."))  # "taft": the package alone
            if covers and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise AssertionError(f"module {module} is in no layer of tests/test_imports.py: add it to LAYERS")
    return best


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "taft").rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported taft module, names taken from it, line) for every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    skip = type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "taft"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "taft":
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            found += [(s, [], node.lineno) for s in submodules]
            taken = [n for n in names if f"{target}.{n}" not in known]
            if taken or not submodules:
                found.append((target, taken, node.lineno))
    return found


def type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines of `if TYPE_CHECKING:` blocks: imports for annotations only, never executed."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def graph() -> tuple[dict[str, set[str]], list[str], list[str]]:
    """(module → imported modules, layer violations, private-name imports)."""
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = defaultdict(set)
    upward, private = [], []
    for name, path in mods.items():
        for target, names, line in imports(path, name, known):
            if target not in known:
                raise AssertionError(f"{name}:{line} imports {target}, which is not a module of the package")
            if target == name:
                continue
            edges[name].add(target)
            # importing taft.a.b first runs taft/a/__init__.py: an edge to it, unless `name` lives inside taft.a
            parts = target.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent in known and not (name == parent or name.startswith(parent + ".")):
                    edges[name].add(parent)
            if layer_of(target) > layer_of(name):
                upward.append(f"{name}:{line} ({LAYERS[layer_of(name)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
            private += [f"{name}:{line} imports {n} from {target}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    return edges, upward, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(modules()):
        if v not in index:
            visit(v)
    return out


def test_imports_point_down_the_layers():
    _, upward, _ = graph()
    assert upward == []


def test_no_import_cycles():
    edges, _, _ = graph()
    assert cycles(edges) == []


def test_no_private_names_across_modules():
    _, _, private = graph()
    assert private == []


def test_tangent_is_pure_math():
    edges, _, _ = graph()
    reach = {t for m, ts in edges.items() if m.startswith("taft.tangent") for t in ts}
    assert not [t for t in reach if t.startswith("taft.backbones")]


def test_checks_see_violations(tmp_path, monkeypatch):
    """The checks themselves: a planted upward import, cycle and private import are all reported."""
    pkg = tmp_path / "taft"
    (pkg / "train").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from taft.train.loop import _secret\n")
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("from taft.errors import TaftError\n_secret = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    edges, upward, private = graph()
    assert upward and "taft.errors:1 (base) imports taft.train.loop (train)" in upward[0]
    assert cycles(edges) == [["taft.errors", "taft.train.loop"]]
    assert private == ["taft.errors:1 imports _secret from taft.train.loop"]


@pytest.mark.parametrize("module", ["taft.checkpoint", "taft.model"])
def test_checkpoint_and_model_load_no_training_or_store(module):
    code = (f"import {module}, sys; print([m for m in sys.modules if m.startswith(('taft.train', 'taft.store', "
            "'taft.privacy', 'taft.parallel'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
