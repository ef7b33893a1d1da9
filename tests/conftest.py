"""Fixtures shared by the test modules: the bundled backbones (real weights) and tiny random ones. Helpers and
tiny data builders are in helpers.py."""

import os
import tempfile

import pytest

# tests/helpers.py holds assertions shared by several test modules: rewrite them as in the test modules.
pytest.register_assert_rewrite("helpers")

# Converted weights are cached per test session, never in the user's cache.
os.environ.setdefault("TAFT_CACHE", tempfile.mkdtemp(prefix="taft-test-cache-"))


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Each test its own taft cache (TAFT_CACHE in its tmp_path). Opt in per module:
    `pytestmark = pytest.mark.usefixtures("isolated_cache")`."""
    monkeypatch.setenv("TAFT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module of tiny tensors (more threads only add latency on a busy machine)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def dinov2_56():
    """The bundled DINOv2 ViT-S/14 at 56×56 px (4×4 patches + CLS)."""
    from taft import load_backbone

    return load_backbone("dinov2-vits14", image_size=56)


@pytest.fixture(scope="session")
def minilm():
    """The bundled all-MiniLM-L6-v2 text encoder (float32, max_length 256)."""
    from taft import load_backbone

    return load_backbone("minilm-l6")


@pytest.fixture(scope="module")
def tiny_vit():
    """A random pre-norm ViT (helpers.TINY_VIT: width 32, 3 blocks) at 12 px, float32, seed 0."""
    import torch

    from helpers import TINY_VIT
    from reference import random_backbone

    return random_backbone(TINY_VIT, 12, seed=0, dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny_bert():
    """A random post-norm BERT (helpers.TINY_BERT: width 24, 3 blocks; float64) with MiniLM's tokenizer at 32
    tokens."""
    import torch

    from helpers import TINY_BERT
    from reference import random_text_backbone
    from taft.backbones.assets import minilm_dir
    from taft.backbones.base import Backbone
    from taft.backbones.tokenizer import TextTokenizer

    random = random_text_backbone(TINY_BERT, seed=0, dtype=torch.float64)
    tokenizer = TextTokenizer(minilm_dir() / "tokenizer.json", 32)
    return Backbone(name=random.name, model=random.model, preprocess=tokenizer.preprocess, tokenizer=tokenizer)
