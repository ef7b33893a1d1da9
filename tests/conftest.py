import os
import tempfile

import pytest

# tests/helpers.py holds assertions shared by several test modules: rewrite them as in the test modules.
pytest.register_assert_rewrite("helpers")

# Converted weights are cached per test session, never in the user's cache.
os.environ.setdefault("TAFT_CACHE", tempfile.mkdtemp(prefix="taft-test-cache-"))


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
